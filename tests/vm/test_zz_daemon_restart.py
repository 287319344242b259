"""kill -9 of the daemon: running VMs are re-adopted, nothing leaks, nothing is lost.

Named to run last: it restarts the session's daemon.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from ember.client import Client, call_simple
from tests.conftest import DaemonProcess, process_alive

pytestmark = pytest.mark.vm


def test_daemon_kill9_readopts_running_vms(client: Client, daemon: DaemonProcess, base_image: str) -> None:
    running = client.run(base_image)["id"]
    suspended = client.run(base_image)["id"]
    doomed = client.run(base_image)["id"]
    client.exec(running, ["sh", "-c", "sleep 1000 & echo $! > /root/sleeper"])
    sleeper = client.exec(running, ["cat", "/root/sleeper"]).stdout
    client.send(call_simple("POST", f"/v1/vms/{suspended}/suspend"))
    pids = {vm: client.send(call_simple("GET", f"/v1/vms/{vm}"))["pid"] for vm in (running, doomed)}

    marker = str(daemon.settings.vms_dir).encode()
    before = {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _is_qemu_under(p, marker)}
    assert before >= {pids[running], pids[doomed]}
    daemon.kill9()
    # while the daemon is down, one VMM dies too: it must be marked FAILED, not lost
    os.kill(pids[doomed], signal.SIGKILL)
    time.sleep(0.5)
    daemon.start()

    view = client.send(call_simple("GET", f"/v1/vms/{running}"))
    assert view["state"] == "RUNNING" and view["pid"] == pids[running], "running VM was not re-adopted"
    assert client.exec(running, ["cat", "/root/sleeper"]).stdout == sleeper
    assert client.exec(running, ["sh", "-c", f"kill -0 {sleeper.decode().strip()}"]).exit_code == 0
    assert client.send(call_simple("GET", f"/v1/vms/{suspended}"))["state"] == "SUSPENDED"
    failed = client.send(call_simple("GET", f"/v1/vms/{doomed}"))
    assert failed["state"] == "FAILED" and failed["state_reason"] == "vmm_exited"

    # everything the killed daemon ran and the new one did not adopt (its warm pool too) is gone
    orphans = [pid for pid in before - {pids[running]} if process_alive(pid)]
    assert not orphans, f"QEMU processes of the killed daemon survived: {orphans}"

    client.send(call_simple("POST", f"/v1/vms/{suspended}/resume"))
    for vm in (running, suspended, doomed):
        client.send(call_simple("DELETE", f"/v1/vms/{vm}"))
    assert not process_alive(pids[running]), "orphan QEMU after rm"


def _is_qemu_under(proc: Path, marker: bytes) -> bool:
    try:
        cmdline = (proc / "cmdline").read_bytes()
    except OSError:
        return False
    return b"qemu-system" in cmdline and marker in cmdline and process_alive(int(proc.name))
