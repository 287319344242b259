"""API benchmark: the multi-tenant REST API under a realistic population; prints JSON (last line).

    sudo .venv/bin/python bench/api.py [--runs 20] [--vms 200] [--tenants 20] [--samples 200] [--seconds 10]

Starts its own daemon (fresh data directory, a TCP listener on loopback, guests of ``--memory-mib``
so that 200 VMs are cheap), builds the base image, then measures:

- ``run_to_first_exec_ms``: through the SDK as a tenant (its key, over TCP): ``run`` a VM and
  get the result of its first ``exec true``, one after another with an idle moment between
  (the warm pool refills), each VM removed after; p50/p95.
- with ``--vms`` VMs across ``--tenants`` tenants (each tenant launches its own share with its own
  key): ``GET /v1/vms`` as root on the socket (every tenant's VMs) and as a tenant (its own),
  and ``GET /v1/vms/{id}`` as a tenant, through the SDK back to back; p50/p95 (target p95 <= 20 ms).
- ``get_rps``: authenticated ``GET /v1/vms/{id}`` per second with a tenant key over TCP, from
  ``--connections`` keep-alive connections for ``--seconds`` (target >= 1,000/s on 2 cores). The
  load comes from a bare HTTP/1.1 client on asyncio in this process (it shares the cores with the
  daemon, and costs a fraction of what httpx does per request); every answer must be a 200 with
  the body's length. The daemon's key rate limit is raised for this run (``rate_limit_per_s`` in
  the output): the figure is the API's throughput, not the limit's. The daemon's CPU over the
  window is reported beside it.

Every VM is removed at the end, also on Ctrl-C or a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import shutil
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ember.sdk import Client, EmberError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import cpu_seconds, log, machine, own_daemon, pcts, prepare_base, remove_all

RATE_LIMIT_PER_S = 1_000_000.0  # the throughput run is not to meet the per-key limit (EMBER_RATE_LIMIT_PER_S)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ms(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def sample(fn: Callable[[], Any], n: int) -> dict[str, float]:
    for _ in range(5):  # connections open, caches warm
        fn()
    return pcts([ms(fn) for _ in range(n)])


def make_tenants(root: Client, n: int) -> dict[str, str]:
    """``n`` tenants with a key each: {tenant: api_key}."""
    keys: dict[str, str] = {}
    for i in range(n):
        name = f"bench-{i:02d}"
        root.tenants.create(name)
        keys[name] = root.keys.create(tenant=name, name="bench").api_key
    return keys


def run_to_first_exec(c: Client, runs: int) -> dict[str, float]:
    times = []
    for _ in range(runs):
        time.sleep(0.5)  # an idle moment between users: the warm pool refills
        start = time.perf_counter()
        vm = c.vms.run("debian")
        result = vm.exec(["true"])
        times.append((time.perf_counter() - start) * 1000)
        assert result.exit_code == 0, result
        vm.remove()
    return pcts(times)


def populate(url: str, keys: dict[str, str], total: int) -> dict[str, list[str]]:
    """``total`` VMs, an equal share launched by each tenant with its own key (4 tenants at a time)."""
    share = total // len(keys)

    def launch(tenant: str) -> tuple[str, list[str]]:
        with Client(url, api_key=keys[tenant]) as c:
            return tenant, [c.vms.run("debian").id for _ in range(share)]

    made: dict[str, list[str]] = {}
    with ThreadPoolExecutor(4) as pool:
        for tenant, ids in pool.map(launch, keys):
            made[tenant] = ids
            log(f"  {sum(map(len, made.values()))} VMs")
    return made


async def hammer(port: int, path: str, token: str, connections: int, seconds: float) -> dict[str, Any]:
    """GET ``path`` back to back on ``connections`` keep-alive connections for ``seconds``."""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    loop = asyncio.get_running_loop()
    ok = 0
    bad: dict[int, int] = {}
    stop_at = loop.time() + seconds

    async def one() -> None:
        nonlocal ok
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while loop.time() < stop_at:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                status = int(lines[0].split(b" ", 2)[1])
                lengths = [
                    int(v) for k, _, v in (x.partition(b":") for x in lines[1:]) if k.lower() == b"content-length"
                ]
                assert lengths, f"an answer without Content-Length: {head!r}"
                await reader.readexactly(lengths[0])
                if status == 200:
                    ok += 1
                else:
                    bad[status] = bad.get(status, 0) + 1
        finally:
            writer.close()

    start = loop.time()
    await asyncio.gather(*(one() for _ in range(connections)))
    elapsed = loop.time() - start
    return {"per_s": round(ok / elapsed, 1), "ok": ok, "errors": bad, "seconds": round(elapsed, 2)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--vms", type=int, default=200)
    parser.add_argument("--tenants", type=int, default=20)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--memory-mib", type=int, default=128)
    args = parser.parse_args()

    settings, daemon = own_daemon("ember-bench-api-", 740000)
    port = free_port()
    settings = daemon.settings = dataclasses.replace(
        settings,
        listen=f"127.0.0.1:{port}",
        memory_mib=args.memory_mib,
        rate_limit_per_s=RATE_LIMIT_PER_S,
        rate_limit_burst=int(RATE_LIMIT_PER_S),
        quota_running_vms=max(settings.quota_running_vms, args.vms // args.tenants + 2),
    )
    url = f"http://127.0.0.1:{port}"
    result: dict[str, Any] = {"vms": args.vms, "tenants": args.tenants, "memory_mib": args.memory_mib}
    try:
        daemon.start()
        with Client(settings=settings) as root:
            result.update(prepare_base(root))
            keys = make_tenants(root, args.tenants)
            first, first_key = next(iter(keys.items()))

            log(f"run to first exec, {args.runs} times (tenant {first}, over TCP)")
            with Client(url, api_key=first_key) as c:
                result["run_to_first_exec_ms"] = run_to_first_exec(c, args.runs)

            log(f"launching {args.vms} VMs across {args.tenants} tenants")
            made = populate(url, keys, args.vms)
            target = made[first][0]
            every = root.vms.list()  # the live VMs of every tenant (root is an admin)
            assert len(every) == args.vms, f"root lists {len(every)} VMs, not {args.vms}"

            log(f"list and get, {args.samples} samples each")
            with Client(url, api_key=first_key) as c:
                own = c.vms.list()
                assert sorted(v.id for v in own) == sorted(made[first]), "a tenant lists other tenants' VMs"
                result["list_all_ms"] = sample(root.vms.list, args.samples)
                result["list_tenant_ms"] = sample(c.vms.list, args.samples)
                result["get_ms"] = sample(lambda: c.vms.get(target), args.samples)

            log(f"authenticated GET /v1/vms/{{id}} for {args.seconds:.0f} s on {args.connections} connections")
            assert daemon.proc is not None
            cpu = cpu_seconds(daemon.proc.pid)
            rps = asyncio.run(hammer(port, f"/v1/vms/{target}", first_key, args.connections, args.seconds))
            rps["daemon_cpu_pct"] = round((cpu_seconds(daemon.proc.pid) - cpu) / rps["seconds"] * 100, 1)
            result["get_rps"] = {**rps, "connections": args.connections, "rate_limit_per_s": RATE_LIMIT_PER_S}
            log(f"removing {remove_all(root)} VMs")
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            with Client(settings=settings) as root, contextlib.suppress(EmberError):
                remove_all(root)  # also after a failure: a stopped daemon leaves its VMs running
        daemon.stop()
        shutil.rmtree(settings.data_dir, ignore_errors=True)
    result["machine"] = machine()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
