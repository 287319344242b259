"""Image build benchmark: measures Dockerfile builds on this machine and prints JSON (last line).

    sudo .venv/bin/python bench/build.py [--rebuilds 3] [--launches 10]

Starts its own daemon (fresh data directory, so no layer cache; the Debian
tarball cache is shared with the tests) and builds a small Python web app from
the built-in ``python:3.11`` base:

- cold build (no layers cached), fully cached rebuild, rebuild after a change
  to the app's one source file;
- image sizes (virtual and on the host);
- launch-to-first-HTTP-response of the app in VMs launched from the image
  (API call to launch, then a tiny static HTTP client exec'd in the guest
  gets the app's answer) against cold boot + app start, as measured when the
  image was captured (cold boot to the agent, then the app until it answered
  its ready hook), plus the same client call.

Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ember.host.binaries import compile_static
from ember.sdk import Client, Request

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import log, machine, own_daemon, pct
from tests.conftest import build as build_through_api

APP = """\
import http.server, json, os, platform
STARTED = {"pid": os.getpid(), "python": platform.python_version()}

class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # Ember's ready hook
        self.send_response(200 if self.path == "/ember/v1/ready" else 404)
        self.end_headers()

    def do_GET(self):
        body = json.dumps(STARTED).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

http.server.ThreadingHTTPServer(("127.0.0.1", 8080), Handler).serve_forever()
# change: 0
"""

DOCKERFILE = """\
FROM python:3.11
WORKDIR /app
COPY hget /usr/local/bin/hget
COPY app.py ./
RUN python3 -m compileall -q /app
LABEL ember.ready.http=8080
CMD ["python3", "/app/app.py"]
"""

HGET_C = r"""
#include <arpa/inet.h>
#include <sys/socket.h>
#include <unistd.h>
int main(void) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(8080), .sin_addr.s_addr = htonl(0x7f000001)};
    if (connect(s, (struct sockaddr *)&a, sizeof a)) return 1;
    static const char req[] = "GET / HTTP/1.0\r\n\r\n";
    if (write(s, req, sizeof req - 1) != sizeof req - 1) return 2;
    char buf[4096];
    ssize_t n;
    while ((n = read(s, buf, sizeof buf)) > 0) if (write(1, buf, (size_t)n) != n) return 3;
    return n < 0 ? 4 : 0;
}
"""


def p50(values: list[float]) -> float:
    return round(statistics.median(values), 2)


def build(c: Client, ctx: Path, name: str) -> tuple[dict[str, Any], float]:
    start = time.perf_counter()
    record, _ = build_through_api(c, ctx, name, on_log=lambda line: log(f"  {line}"))
    seconds = time.perf_counter() - start
    if record.get("state") != "CREATED":
        raise SystemExit(f"build of {name} failed: {record.get('error')}")
    return record, seconds


def first_response_ms(c: Client, image: str) -> tuple[float, float, str]:
    """(ms to launch, ms from launch to the app's first answer, the answer)."""
    start = time.perf_counter()
    vm = c.vms.run(image).id
    launched = time.perf_counter()
    out = c.vms.exec(vm, ["/usr/local/bin/hget"])
    answered = time.perf_counter()
    c.send(Request("DELETE", f"/v1/vms/{vm}"))
    if out.exit_code != 0 or b"200 OK" not in out.stdout:
        raise SystemExit(f"the app did not answer: {out}")
    return (launched - start) * 1000, (answered - start) * 1000, out.stdout.decode().rsplit("\n", 1)[-1]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rebuilds", type=int, default=3)
    parser.add_argument("--launches", type=int, default=10)
    args = parser.parse_args()

    settings, daemon = own_daemon("ember-bench-build-", 770000)
    data = settings.data_dir
    ctx = data / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    (ctx / "app.py").write_text(APP)
    compile_static(HGET_C.encode(), ctx / "hget")
    result: dict[str, Any] = {"base": "python:3.11 (built-in)"}
    result["base_tarball_cached"] = (settings.cache_dir / "python-3.11-bookworm.tar").exists()
    try:
        daemon.start()
        with Client(settings=settings) as c:
            result["accel"] = c.send(Request("GET", "/v1/info"))["accelerator"]["name"]
            log("cold build (no layer cache)")
            cold, seconds = build(c, ctx, "bench")
            details = cold["build"]
            result["cold_build_s"] = round(seconds, 2)
            result["cold_build_steps_s"] = {f"{s['text'][:40]}": round(s["seconds"], 2) for s in details["steps"]}
            captures = [(details["cold_boot_s"], details["ready_s"])]

            log(f"{args.rebuilds} fully cached rebuilds")
            cached = [build(c, ctx, "bench")[1] for _ in range(args.rebuilds)]
            result["cached_rebuild_s"] = {"p50": p50(cached), "max": round(max(cached), 2), "n": len(cached)}

            log(f"{args.rebuilds} rebuilds after changing app.py")
            changed = []
            for i in range(1, args.rebuilds + 1):
                (ctx / "app.py").write_text(APP.replace("# change: 0", f"# change: {i}"))
                record, seconds = build(c, ctx, "bench")
                changed.append(seconds)
                captures.append((record["build"]["cold_boot_s"], record["build"]["ready_s"]))
            result["one_file_change_rebuild_s"] = {"p50": p50(changed), "max": round(max(changed), 2)}

            latest = c.send(Request("GET", "/v1/images/bench"))
            image_dir = settings.images_dir / latest["name"]
            du = subprocess.run(["du", "-s", "--block-size=1", str(image_dir)], capture_output=True, text=True)
            result["image"] = {
                "disk_bytes": latest["disk_bytes"], "memory_bytes": latest["memory_bytes"],
                "on_host_bytes": int(du.stdout.split()[0]),
            }  # fmt: skip

            log(f"{args.launches} launches to the app's first HTTP response")
            first_response_ms(c, "bench")  # warm the image's page cache and pool once
            launches, launch_only = [], []
            for _ in range(args.launches):
                time.sleep(1.0)  # the pool refills between launches, as between users
                launch_ms, ms, body = first_response_ms(c, "bench")
                launches.append(ms)
                launch_only.append(launch_ms)
            result["launch_ms_p50"] = round(statistics.median(launch_only), 1)
            log("where the first answer's time goes: a first exec of `true`, then the app's answer")
            split: dict[str, list[float]] = {"first_exec_true_ms": [], "then_app_answer_ms": []}
            for _ in range(5):
                time.sleep(1.0)
                vm = c.vms.run("bench").id
                for key, argv in zip(split, (["true"], ["/usr/local/bin/hget"]), strict=True):
                    start = time.perf_counter()
                    c.vms.exec(vm, argv)
                    split[key].append((time.perf_counter() - start) * 1000)
                c.send(Request("DELETE", f"/v1/vms/{vm}"))
            result["first_answer_split_ms_p50"] = {k: round(statistics.median(v), 1) for k, v in split.items()}
            result["app_answer_from_snapshot"] = json.loads(body)
            vm = c.vms.run("bench").id  # what the client call itself costs, for the cold path
            client_calls = []
            for _ in range(5):
                start = time.perf_counter()
                c.vms.exec(vm, ["/usr/local/bin/hget"])
                client_calls.append((time.perf_counter() - start) * 1000)
            c.send(Request("DELETE", f"/v1/vms/{vm}"))
            client_ms = statistics.median(client_calls)
            launch_p50 = statistics.median(launches)
            cold_ms = statistics.median([(boot + ready) * 1000 for boot, ready in captures]) + client_ms
            result["launch_to_first_response_ms"] = {"p50": round(launch_p50, 1), "p95": pct(launches, 0.95)}
            result["cold_boot_plus_app_start_ms"] = {
                "p50": round(cold_ms, 1),
                "cold_boot_s": [round(b, 2) for b, _ in captures],
                "app_ready_s": [round(r, 2) for _, r in captures],
                "client_call_ms": round(client_ms, 1),
            }
            result["speedup_vs_cold_boot"] = round(cold_ms / launch_p50, 1)
    finally:
        daemon.stop()
        shutil.rmtree(data, ignore_errors=True)
    result["targets"] = {
        "cached_rebuild_s<=5": result.get("cached_rebuild_s", {}).get("p50", 99) <= 5,
        "speedup>=20": result.get("speedup_vs_cold_boot", 0) >= 20,
    }
    result["machine"] = machine()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
