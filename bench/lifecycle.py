"""Lifecycle benchmark: measures Ember on this machine and prints JSON (last line).

    sudo .venv/bin/python bench/lifecycle.py [--launches 20] [--clones 20] [--cycles 10]

Starts its own daemon (fresh data directory; the Debian tarball cache is
shared with the tests), builds the base image (its cold boot is timed), then
measures launch, exec, suspend/resume, host-to-guest copy and the memory of
idle clones. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ember.sdk import Client, Request

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import log, machine, own_daemon, pct, prepare_base


def ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--launches", type=int, default=20)
    parser.add_argument("--clones", type=int, default=20)
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--copy-mib", type=int, default=64)
    args = parser.parse_args()

    settings, daemon = own_daemon("ember-bench-", 760000)
    result: dict[str, Any] = {}
    try:
        daemon.start()
        with Client(settings=settings) as c:
            result.update(prepare_base(c))

            log(f"launching {args.launches} VMs one after another")
            launches, vms = [], []
            for _ in range(args.launches):
                time.sleep(0.3)  # an idle moment between requests, as between users
                start = time.perf_counter()
                vms.append(c.vms.run("debian").id)  # returns once the agent answered
                launches.append(ms_since(start))
            result["launch_ms"] = {"p50": pct(launches, 0.5), "p95": pct(launches, 0.95), "n": len(launches)}

            target = vms[0]
            c.vms.exec(target, ["true"])
            execs = []
            for _ in range(20):
                start = time.perf_counter()
                c.vms.exec(target, ["true"])
                execs.append(ms_since(start))
            result["exec_ms"] = {"p50": pct(execs, 0.5)}

            log(f"clone memory with {args.clones} idle clones")
            while len(vms) < args.clones:
                vms.append(c.vms.run("debian").id)
            time.sleep(3)
            live = {"live": "true"}  # the VMM's own figures, not only the record
            pss = [c.send(Request("GET", f"/v1/vms/{vm}", live))["host_pss_mib"] for vm in vms[: args.clones]]
            result["clone_pss_mib"] = round(statistics.mean(pss), 1)
            for vm in vms[1:]:
                c.send(Request("DELETE", f"/v1/vms/{vm}"))

            log(f"copying {args.copy_mib} MiB host -> guest")
            blob = settings.data_dir / "blob.bin"
            with open(blob, "wb") as f:
                f.write(os.urandom(args.copy_mib * 1024 * 1024))
            start = time.perf_counter()
            with open(blob, "rb") as f:
                c.files.write(target, "/root/blob.bin", iter(lambda: f.read(1 << 20), b""))
            result["file_copy_mib_s"] = round(args.copy_mib / (ms_since(start) / 1000), 1)
            c.vms.exec(target, ["rm", "/root/blob.bin"])

            log(f"{args.cycles} suspend/resume cycles")
            suspends, resumes, sizes, phases = [], [], [], []
            for _ in range(args.cycles):
                start = time.perf_counter()
                r = c.send(Request("POST", f"/v1/vms/{target}/suspend"))
                suspends.append(ms_since(start))
                sizes.append(r["snapshot_bytes"])
                start = time.perf_counter()
                back = c.send(Request("POST", f"/v1/vms/{target}/resume"))
                resumes.append(ms_since(start))
                phases.append({"suspend": r["phases_ms"], "resume": back["phases_ms"]})
                assert c.vms.exec(target, ["true"]).exit_code == 0
            log("3 more cycles, dropping the host page cache while suspended (a resume after reclaim)")
            cold = []
            for _ in range(3):
                c.send(Request("POST", f"/v1/vms/{target}/suspend"))
                subprocess.run(["sync"], check=True)
                Path("/proc/sys/vm/drop_caches").write_text("1")
                start = time.perf_counter()
                c.send(Request("POST", f"/v1/vms/{target}/resume"))
                cold.append(ms_since(start))
            result["suspend_ms"] = {"p50": pct(suspends, 0.5), "first": round(suspends[0], 1)}
            result["resume_ms"] = {
                "p50": pct(resumes, 0.5),
                "first": round(resumes[0], 1),
                "cold_cache_p50": pct(cold, 0.5),
            }
            result["snapshot_bytes_per_suspend"] = int(statistics.median(sizes))
            result["suspend_resume_phases_ms"] = {"first": phases[0], "last": phases[-1]}
            if "cold_boot_ms" in result:
                result["launch_speedup_vs_cold_boot"] = round(result["cold_boot_ms"] / result["launch_ms"]["p50"], 1)
            c.send(Request("DELETE", f"/v1/vms/{target}"))
    finally:
        daemon.stop()
        shutil.rmtree(settings.data_dir, ignore_errors=True)
    result["machine"] = machine()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
