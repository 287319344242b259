"""Serverless benchmark: the ingress, auto-resume and the idle policy on this machine; prints JSON (last line).

    sudo .venv/bin/python bench/serverless.py [--launches 12] [--rounds 12] [--requests 200] [--idle-vms 4]

Starts its own daemon (fresh data directory; the Debian tarball cache is shared with the tests; idle
timeouts from ``--idle-timeout`` seconds and an idle scheduler pass every ``--check-s``), builds a small
Python app image (``FROM ember:debian-python3``, ``LABEL ember.ready.http=8080``: the warm pool's clones
call its ready hook, so the app's request path is warm when a launch takes one), then measures:

- ``launch_to_first_response_ms``: the run call until the app's first HTTP 200 through the ingress (a new
  connection, an admin key in Authorization: no token call), with a pause between launches for the pool
  to refill; split into the run call and the request.
- ``ingress``: GET / one after another, on one kept-alive connection and on a new connection per request,
  through the ingress from the host and from inside the guest against 127.0.0.1 (the same client script,
  timing itself: ``python3 -c CLIENT``); requests per second and latency, and the ingress's cost per request.
- ``auto_resume_ms``: a VM run with auto-resume is suspended (a suspend call), then one HTTP request through
  the ingress (a new connection) until its response; the first round (a fresh clone's first resume) apart;
  split at the VM's RESUMING and RUNNING events, and beside it the same request made again at once.
- ``idle_detection_late_s``: VMs with the shortest idle timeout, each used (an exec) then left alone: seconds
  from the timeout running out (the exec's end + timeout) to the suspend starting (its SUSPENDING event);
  each VM twice (the second time the exec auto-resumes it).

The app writes its response head and body in one write (a head and a body in two segments cost a kept-alive
request 40 ms: Nagle against a delayed ACK). Every VM is removed at the end, also on Ctrl-C or a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import json
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from ember.sdk import Client, EmberError, IdlePolicy, Request

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import log, machine, own_daemon, pcts, remove_all
from tests.conftest import build

APP = """\
import http.server

BODY = b'{"ok": true}'


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 1 << 16  # the head and the body in one write (flushed after every request)

    def answer(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    do_GET = do_POST = answer  # the ready hook (POST) runs the GET's code: a pool clone is warm for it

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", 8080), Handler).serve_forever()
"""

DOCKERFILE = """\
FROM ember:debian-python3
COPY app.py /app/app.py
LABEL ember.ready.http=8080
CMD ["python3", "/app/app.py"]
"""

# GET / ``n`` times, one after another, on one kept-alive connection, then on a new connection each;
# prints the times. Run on the host (through the ingress) and in the guest (to the app directly).
# argv: host port n [header=value ...]
CLIENT = """\
import http.client, json, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
headers = dict(h.split("=", 1) for h in sys.argv[4:])

def run(fresh):
    conn, times = None, []
    start = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        if conn is None:
            conn = http.client.HTTPConnection(host, port, timeout=30)
        conn.request("GET", "/", headers=headers)
        answer = conn.getresponse()
        answer.read()
        assert answer.status == 200, answer.status
        if fresh:
            conn.close()
            conn = None
        times.append((time.perf_counter() - t) * 1000)
    if conn is not None:
        conn.close()
    return {"seconds": time.perf_counter() - start, "ms": times}

run(False)  # warm: connections, the relay, the app's code
print(json.dumps({"kept_alive": run(False), "new_connection": run(True)}))
"""


@dataclasses.dataclass(frozen=True)
class Ingress:
    host: str
    port: int
    key: str  # an admin API key: Authorization: Bearer

    def headers(self, vm_id: str) -> dict[str, str]:
        return {"Host": f"{vm_id}.localhost:{self.port}", "Authorization": f"Bearer {self.key}"}

    def get(self, vm_id: str) -> None:
        """One GET / on a new connection; raises unless the app answered 200."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request("GET", "/", headers=self.headers(vm_id))
            answer = conn.getresponse()
            body = answer.read()
        finally:
            conn.close()
        if answer.status != 200:
            raise SystemExit(f"the ingress answered {answer.status}: {body[:300]!r}")


def ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def event_times(c: Client, vm_id: str, to_state: str) -> list[float]:
    return [datetime.fromisoformat(e.at).timestamp() for e in c.vms.events(vm_id) if e.to_state == to_state]


def wait_state(c: Client, vm_id: str, want: str, within: float) -> None:
    deadline = time.monotonic() + within
    while (state := c.vms.get(vm_id).state) != want:
        if time.monotonic() > deadline:
            raise SystemExit(f"{vm_id} is {state}, not {want}, after {within:.0f} s")
        time.sleep(0.02)


def launch_to_first_response(c: Client, ingress: Ingress, image: str, launches: int) -> dict[str, Any]:
    total, run, request = [], [], []
    for _ in range(launches):
        time.sleep(1.0)  # an idle moment between users: the warm pool refills
        start = time.perf_counter()
        vm = c.vms.run(image).id
        launched = time.perf_counter()
        ingress.get(vm)
        total.append(ms_since(start))
        run.append((launched - start) * 1000)
        request.append(ms_since(launched))
        c.vms.remove(vm)
    return {**pcts(total), "run_call_ms": pcts(run), "first_request_ms": pcts(request)}


def requests(samples: dict[str, Any]) -> dict[str, Any]:
    return {kind: {"per_s": round(len(s["ms"]) / s["seconds"], 1), "ms": pcts(s["ms"])} for kind, s in samples.items()}


def ingress_overhead(c: Client, ingress: Ingress, vm: str, n: int) -> dict[str, Any]:
    headers = [f"{k}={v}" for k, v in ingress.headers(vm).items()]
    host = subprocess.run(
        [sys.executable, "-c", CLIENT, ingress.host, str(ingress.port), str(n), *headers],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    guest = c.vms.exec(vm, ["python3", "-c", CLIENT, "127.0.0.1", "8080", str(n)], timeout_s=300)
    if guest.exit_code != 0:
        raise SystemExit(f"the guest's client failed: {guest.stderr.decode()[-2000:]}")
    result = {"through_ingress": requests(json.loads(host.stdout)), "in_guest": requests(json.loads(guest.stdout))}
    result["added_ms_p50"] = {
        kind: round(result["through_ingress"][kind]["ms"]["p50"] - result["in_guest"][kind]["ms"]["p50"], 1)
        for kind in ("kept_alive", "new_connection")
    }
    return result


def auto_resume(c: Client, ingress: Ingress, image: str, rounds: int) -> dict[str, Any]:
    """Each round: (ms until the answer, wall-clock start and end of the request, ms of a second request)."""
    vm = c.vms.run(image, idle=IdlePolicy(timeout_s=3600, auto_resume=True)).id
    ingress.get(vm)
    times, spans, again = [], [], []
    for _ in range(rounds + 1):
        c.vms.suspend(vm)
        time.sleep(0.5)  # a request comes some time after the suspend
        start, began = time.perf_counter(), time.time()
        ingress.get(vm)
        times.append(ms_since(start))
        spans.append((began, time.time()))
        start = time.perf_counter()
        ingress.get(vm)  # the same request again, the VM running: what the resume added
        again.append(ms_since(start))
    resumes = event_times(c, vm, "RESUMING")
    resumed = event_times(c, vm, "RUNNING")[1:]  # the first is the launch's
    reasons = {e.reason for e in c.vms.events(vm) if e.to_state == "RESUMING"}
    assert reasons == {"auto_resume"}, f"resumed for {reasons}"
    c.vms.remove(vm)
    # the request's phases (event times have millisecond precision): until the resume began (routing,
    # authorising, waking), the resume (RESUMING to RUNNING), then the relay and the app's answer
    phases: dict[str, list[float]] = {"until_resuming": [], "resuming": [], "after_running": []}
    for (began, ended), resuming, running in zip(spans, resumes, resumed, strict=True):
        for name, (a, b) in zip(phases, ((began, resuming), (resuming, running), (running, ended)), strict=True):
            phases[name].append((b - a) * 1000)
    return {
        **pcts(times[1:]), "first_ms": round(times[0], 1),
        "phases_ms_p50": {name: pcts(values[1:])["p50"] for name, values in phases.items()},
        "first_phases_ms": {name: round(values[0], 1) for name, values in phases.items()},
        "next_request_ms": pcts(again[1:]),
    }  # fmt: skip


def idle_detection(c: Client, image: str, vms: int, timeout_s: int) -> dict[str, Any]:
    late = []
    for _ in range(vms):
        vm = c.vms.run(image, idle=IdlePolicy(timeout_s=timeout_s, auto_resume=True)).id
        for _ in range(2):
            c.vms.exec(vm, ["true"])  # the second time, this resumes it
            idle_from = time.time()
            wait_state(c, vm, "SUSPENDED", timeout_s + 30)
            late.append(max(event_times(c, vm, "SUSPENDING")) - (idle_from + timeout_s))
        c.vms.remove(vm)
    return {**pcts([round(s, 3) for s in late]), "seconds": [round(s, 2) for s in late]}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--launches", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--idle-vms", type=int, default=4)
    parser.add_argument("--idle-timeout", type=int, default=2)
    parser.add_argument("--check-s", type=float, default=0.5)
    args = parser.parse_args()

    settings, daemon = own_daemon("ember-bench-serverless-", 810000)
    settings = daemon.settings = dataclasses.replace(
        daemon.settings, min_idle_s=args.idle_timeout, idle_check_s=args.check_s
    )  # daemon.settings: with the ingress on a free port
    host, _, port = settings.ingress_listen.rpartition(":")
    result: dict[str, Any] = {}
    ctx = settings.data_dir / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    (ctx / "app.py").write_text(APP)
    try:
        daemon.start()
        with Client(settings=settings) as c:
            result["accel"] = c.send(Request("GET", "/v1/info"))["accelerator"]["name"]
            ingress = Ingress(host, int(port), c.keys.create(name="bench-serverless").api_key)
            log("building the app image")
            start = time.perf_counter()
            image, logs = build(c, ctx, "app", on_log=lambda line: log(f"  {line}"))
            if image.get("state") != "CREATED":
                raise SystemExit(f"the build failed: {image.get('error')}\n" + "\n".join(logs[-20:]))
            result["build_s"] = round(time.perf_counter() - start, 1)
            c.vms.remove(c.vms.run("app").id)  # the image's page cache and pool, once

            log(f"{args.launches} launches to the first response through the ingress")
            result["launch_to_first_response_ms"] = launch_to_first_response(c, ingress, "app", args.launches)

            log(f"{args.requests} requests through the ingress and in the guest, kept alive and not")
            vm = c.vms.run("app").id
            result["ingress"] = {"requests": args.requests, **ingress_overhead(c, ingress, vm, args.requests)}
            c.vms.remove(vm)

            log(f"auto-resume by an HTTP request, {args.rounds} rounds after a first")
            result["auto_resume_ms"] = auto_resume(c, ingress, "app", args.rounds)

            log(f"idle detection: {args.idle_vms} VMs, twice each")
            result["idle_detection_late_s"] = {
                "idle_timeout_s": args.idle_timeout, "check_interval_s": args.check_s,
                **idle_detection(c, "app", args.idle_vms, args.idle_timeout),
            }  # fmt: skip
            log(f"removing {remove_all(c)} VMs")
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            with Client(settings=settings) as c, contextlib.suppress(EmberError):
                remove_all(c)  # also after a failure: a stopped daemon leaves its VMs running
        daemon.stop()
        shutil.rmtree(settings.data_dir, ignore_errors=True)
    result["targets"] = {
        "auto_resume_p50<=200ms": result["auto_resume_ms"]["p50"] <= 200,
        "launch_to_first_response_p50<=100ms": result["launch_to_first_response_ms"]["p50"] <= 100,
    }
    result["machine"] = machine()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
