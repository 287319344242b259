"""kill -9 of the daemon: running VMs are re-adopted, nothing leaks, nothing is lost.

Named to run last: it restarts the session's daemon.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from ember.sdk import Client, Request
from tests.conftest import DaemonProcess, process_alive

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("no_vms_left")]


def test_daemon_kill9_readopts_running_vms(client: Client, daemon: DaemonProcess, base_image: str) -> None:
    running = client.vms.run(base_image).id
    suspended = client.vms.run(base_image).id
    doomed = client.vms.run(base_image).id
    client.vms.exec(running, ["sh", "-c", "sleep 1000 & echo $! > /root/sleeper"])
    sleeper = client.vms.exec(running, ["cat", "/root/sleeper"]).stdout
    client.send(Request("POST", f"/v1/vms/{suspended}/suspend"))
    pids = {vm: client.send(Request("GET", f"/v1/vms/{vm}"))["pid"] for vm in (running, doomed)}

    marker = str(daemon.settings.vms_dir).encode()
    before = {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _is_qemu_under(p, marker)}
    assert before >= {pids[running], pids[doomed]}
    daemon.kill9()
    # while the daemon is down, one VMM dies too: it must be marked FAILED, not lost
    os.kill(pids[doomed], signal.SIGKILL)
    time.sleep(0.5)
    daemon.start()

    view = client.send(Request("GET", f"/v1/vms/{running}"))
    assert view["state"] == "RUNNING" and view["pid"] == pids[running], "running VM was not re-adopted"
    assert client.vms.exec(running, ["cat", "/root/sleeper"]).stdout == sleeper
    assert client.vms.exec(running, ["sh", "-c", f"kill -0 {sleeper.decode().strip()}"]).exit_code == 0
    assert client.send(Request("GET", f"/v1/vms/{suspended}"))["state"] == "SUSPENDED"
    failed = client.send(Request("GET", f"/v1/vms/{doomed}"))
    assert failed["state"] == "FAILED" and failed["state_reason"] == "vmm_exited"

    # everything the killed daemon ran and the new one did not adopt (its warm pool too) is gone
    orphans = [pid for pid in before - {pids[running]} if process_alive(pid)]
    assert not orphans, f"QEMU processes of the killed daemon survived: {orphans}"

    client.send(Request("POST", f"/v1/vms/{suspended}/resume"))
    for vm in (running, suspended, doomed):
        client.send(Request("DELETE", f"/v1/vms/{vm}"))
    assert not process_alive(pids[running]), "orphan QEMU after rm"


def _is_qemu_under(proc: Path, marker: bytes) -> bool:
    try:
        cmdline = (proc / "cmdline").read_bytes()
    except OSError:
        return False
    return b"qemu-system" in cmdline and marker in cmdline and process_alive(int(proc.name))


def test_daemon_kill9_mid_suspend_loses_nothing(client: Client, daemon: DaemonProcess, base_image: str) -> None:
    vm = client.vms.run(base_image).id
    client.vms.exec(vm, ["sh", "-c", "echo kept > /root/f; sleep 1000 & echo $! > /root/pid"])
    pid = client.vms.exec(vm, ["cat", "/root/pid"]).stdout.decode().strip()

    def suspend() -> None:
        # the daemon dies under this request
        with contextlib.suppress(Exception), Client(settings=daemon.settings) as c:
            c.send(Request("POST", f"/v1/vms/{vm}/suspend"))

    worker = threading.Thread(target=suspend)
    worker.start()
    deadline = time.monotonic() + 10
    while client.send(Request("GET", f"/v1/vms/{vm}"))["state"] != "SUSPENDING":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.15)  # inside the ~0.8 s full-stream save of a clone's first suspend
    daemon.kill9()
    worker.join()
    daemon.start()

    state = client.send(Request("GET", f"/v1/vms/{vm}"))["state"]
    assert state in ("RUNNING", "SUSPENDED"), f"an interrupted suspend left the VM {state}"
    if state == "SUSPENDED":
        client.send(Request("POST", f"/v1/vms/{vm}/resume"))
    assert client.vms.exec(vm, ["cat", "/root/f"]).stdout == b"kept\n"
    assert client.vms.exec(vm, ["sh", "-c", f"kill -0 {pid}"]).exit_code == 0, "a guest process was lost"
    assert not list((daemon.settings.vms_dir / vm).glob(".suspend*")), "half-written snapshot left behind"
    client.send(Request("DELETE", f"/v1/vms/{vm}"))


def test_daemon_killed_before_a_suspend_commit_keeps_the_vm(
    client: Client, daemon: DaemonProcess, base_image: str
) -> None:
    """The last window of a suspend: its manifest is written in the staging directory, the VMM has
    exited, and the daemon dies before the rename that commits it (the state on disk is made
    exactly so from a finished suspend). The restarted daemon commits it: the VM is SUSPENDED
    and resumes with its files and processes, not FAILED."""
    from dataclasses import replace

    from ember.db.store import Store
    from ember.models import VmState

    vm = client.vms.run(base_image).id
    client.vms.exec(vm, ["sh", "-c", "echo kept > /root/f; sleep 1000 & echo $! > /root/pid"])
    pid = client.vms.exec(vm, ["cat", "/root/pid"]).stdout.decode().strip()
    client.send(Request("POST", f"/v1/vms/{vm}/suspend"))
    daemon.kill9()
    root = daemon.settings.vms_dir / vm
    (root / "suspend").rename(root / ".suspend.tmp-0badcafe")
    store = Store(daemon.settings.db_url)
    record = store.get_vm(vm)
    assert record is not None and record.state is VmState.SUSPENDED
    store.update_vm(replace(record, state=VmState.SUSPENDING))
    store.engine.dispose()
    daemon.start()

    view = client.send(Request("GET", f"/v1/vms/{vm}"))
    assert view["state"] == "SUSPENDED", f"a suspend killed before its commit left the VM {view}"
    client.send(Request("POST", f"/v1/vms/{vm}/resume"))
    assert client.vms.exec(vm, ["cat", "/root/f"]).stdout == b"kept\n"
    assert client.vms.exec(vm, ["sh", "-c", f"kill -0 {pid}"]).exit_code == 0, "a guest process was lost"
    assert not list(root.glob(".suspend*")), "the staging directory was left behind"
    client.send(Request("DELETE", f"/v1/vms/{vm}"))


def test_graceful_restart_keeps_vms_and_drops_the_pool(client: Client, daemon: DaemonProcess, base_image: str) -> None:
    vm = client.vms.run(base_image).id
    pid = client.send(Request("GET", f"/v1/vms/{vm}"))["pid"]
    marker = str(daemon.settings.vms_dir).encode()
    time.sleep(2)  # let the pool refill behind the launch
    pooled = {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _is_qemu_under(p, marker)} - {pid}
    assert pooled, "expected warm clones in the pool"
    daemon.stop()  # SIGTERM
    assert process_alive(pid), "a graceful stop must leave running VMs for the next daemon"
    assert not [p for p in pooled if process_alive(p)], "warm clones outlived their daemon"
    daemon.start()
    view = client.send(Request("GET", f"/v1/vms/{vm}"))
    assert view["state"] == "RUNNING" and view["pid"] == pid
    assert client.vms.exec(vm, ["true"]).exit_code == 0
    client.send(Request("DELETE", f"/v1/vms/{vm}"))


def test_a_graceful_stop_finishes_requests_on_every_listener(
    client: Client, daemon: DaemonProcess, base_image: str
) -> None:
    """The daemon listens on its socket and on TCP; uvicorn stops them one after another. An exec in flight
    on the socket must end with its output, and its VM stay re-adoptable (the first listener's shutdown
    once let the VMs go under the other's requests: a suspend there ended FAILED)."""
    assert daemon.settings.listen, "this test needs a second listener"
    vm = client.vms.run(base_image).id
    result: list[object] = []

    def slow_exec() -> None:
        try:
            result.append(client.vms.exec(vm, ["sh", "-c", "sleep 3; echo done"]))
        except Exception as exc:
            result.append(exc)

    worker = threading.Thread(target=slow_exec)
    worker.start()
    time.sleep(1.0)
    daemon.stop()  # SIGTERM while the exec runs
    worker.join(30)
    assert len(result) == 1 and not isinstance(result[0], Exception), result
    assert result[0].stdout == b"done\n"  # type: ignore[attr-defined]
    daemon.start()
    view = client.send(Request("GET", f"/v1/vms/{vm}"))
    assert view["state"] == "RUNNING" and view["state_reason"] != "agent_unreachable", view
    client.send(Request("DELETE", f"/v1/vms/{vm}"))


def test_stopped_daemon_without_vms_leaves_no_cgroup(daemon: DaemonProcess, client: Client, base_image: str) -> None:
    from ember.host.cgroup import group_for

    assert not client.send(Request("GET", "/v1/vms")), "this test needs a daemon without VMs"
    group = group_for(daemon.settings.data_dir)
    assert list(Path("/sys/fs/cgroup").glob(f"*/{group}")) or Path(f"/sys/fs/cgroup/{group}").exists()
    daemon.stop()
    try:
        leftover = [*Path("/sys/fs/cgroup").glob(f"*/{group}"), *Path("/sys/fs/cgroup").glob(group)]
        assert not leftover, f"cgroups left behind: {leftover}"
    finally:
        daemon.start()


def test_unanswering_vmms_neither_delay_a_restart_nor_are_lost(
    client: Client, daemon: DaemonProcess, base_image: str
) -> None:
    """VMMs that do not answer (stopped here; stuck, or a guest escaped into them) when the daemon restarts:
    it serves at once rather than after one timeout per VM, lists them RUNNING as unreachable, and takes
    them back when they answer again (they were once left unreachable for good)."""
    stuck = [client.vms.run(base_image).id for _ in range(3)]
    pids = [client.send(Request("GET", f"/v1/vms/{vm}"))["pid"] for vm in stuck]
    for vm in stuck:
        client.vms.exec(vm, ["sh", "-c", "echo kept > /root/f"])
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        daemon.kill9()
        started = time.monotonic()
        daemon.start()
        took = time.monotonic() - started
        views = [client.send(Request("GET", f"/v1/vms/{vm}")) for vm in stuck]
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    # one after another, each VMM's 10 s QMP deadline made it 30 s or more
    assert took < 25, f"the daemon took {took:.1f} s to serve with 3 stuck VMMs"
    assert all(v["state"] == "RUNNING" and v["state_reason"] == "agent_unreachable" for v in views), views
    deadline = time.monotonic() + 60  # the background tries come after 5, 10, 20 s, then every 30 s
    for vm in stuck:
        while client.send(Request("GET", f"/v1/vms/{vm}"))["state_reason"] == "agent_unreachable":
            assert time.monotonic() < deadline, f"{vm} was not taken back after its VMM answered again"
            time.sleep(1)
        assert client.vms.exec(vm, ["cat", "/root/f"]).stdout == b"kept\n"
        client.send(Request("DELETE", f"/v1/vms/{vm}"))
