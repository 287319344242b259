"""Failures as features: a full host disk, a hostile or greedy guest."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.config import Settings
from ember.runtime import SERIAL_LOG_CAP
from ember.sdk import ApiError, Client, ExecOutput, Request
from tests.conftest import DaemonProcess, remove_quietly

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def small_disk_daemon(settings: Settings) -> Iterator[DaemonProcess]:
    """A second daemon whose data directory is a 900 MiB filesystem we can fill."""
    mount = Path(tempfile.mkdtemp(prefix="ember-small-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=900M,mode=0711", "tmpfs", str(mount)], check=True)
    small = Settings.from_env(
        {
            "EMBER_DATA_DIR": str(mount / "data"),
            "EMBER_SOCKET": str(mount / "ember.sock"),
            "EMBER_CACHE_DIR": str(settings.cache_dir),
            "EMBER_POOL_SIZE": "0",
            "EMBER_UID_BASE": str(settings.uid_base + settings.uid_count),  # its own VMM uids
        }
    )
    daemon = DaemonProcess(small, mount.parent / f"{mount.name}-daemon.log")
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
        subprocess.run(["umount", "-l", str(mount)], check=False)
        with contextlib.suppress(OSError):
            mount.rmdir()


def fill(path: Path, leave_mib: int) -> Path:
    """Use up a filesystem's space but ``leave_mib``."""
    st = os.statvfs(path)
    filler = path / "filler"
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, st.f_bavail * st.f_frsize - leave_mib * 1024 * 1024)
    return filler


def test_full_disk_suspend_keeps_the_vm_running(small_disk_daemon: DaemonProcess) -> None:
    settings = small_disk_daemon.settings
    with Client(settings=settings) as c:
        for event in c.stream(Request("POST", "/v1/images/debian/prepare")):
            assert "error" not in event, event
        vm = c.vms.run("debian").id
        filler = settings.data_dir / "filler"
        try:
            c.vms.exec(vm, ["sh", "-c", "echo before > /root/f"])
            fill(settings.data_dir, leave_mib=20)  # the first suspend writes a ~90 MB stream
            with pytest.raises(ApiError, match="disk is full") as err:
                c.send(Request("POST", f"/v1/vms/{vm}/suspend"))
            assert err.value.status == 507
            view = c.send(Request("GET", f"/v1/vms/{vm}"))
            assert (view["state"], view["state_reason"]) == ("RUNNING", "suspend_failed")
            assert "full" in view["state_message"]
            assert c.vms.exec(vm, ["cat", "/root/f"]).stdout == b"before\n", "the VM must keep running"
            assert not list((settings.vms_dir / vm).glob(".suspend*")), "a failed suspend left files behind"
            filler.unlink()
            assert c.send(Request("POST", f"/v1/vms/{vm}/suspend"))["state"] == "SUSPENDED"
            # the suspend reserved the blocks of the VM's RAM file: it resumes on a full disk, and its
            # guest can write all of its memory (a hole there would be a SIGBUS in its VMM)
            fill(settings.data_dir, leave_mib=20)
            assert c.send(Request("POST", f"/v1/vms/{vm}/resume"))["state"] == "RUNNING"
            shm = "head -c 100000000 /dev/zero > /dev/shm/z && rm /dev/shm/z"
            assert c.vms.exec(vm, ["sh", "-c", shm]).exit_code == 0
            filler.unlink()
            assert c.vms.exec(vm, ["cat", "/root/f"]).stdout == b"before\n"
            # a fork that cannot be written is refused; its staged files go, the VM runs on
            fill(settings.data_dir, leave_mib=20)
            with pytest.raises(ApiError, match="disk is full"):
                c.send(Request("POST", f"/v1/vms/{vm}/snapshot", json={"name": "nospace"}))
            assert not list(settings.images_dir.glob(".*")), "a failed fork left staged files"
            assert c.vms.exec(vm, ["cat", "/root/f"]).stdout == b"before\n"
            filler.unlink()
            # not even the database can be written: a clear 507, and nothing changed
            fill(settings.data_dir, leave_mib=0)
            with pytest.raises(ApiError, match="cannot record the change") as err:
                c.send(Request("DELETE", f"/v1/vms/{vm}"))
            assert err.value.status == 507
            filler.unlink()
            assert c.send(Request("GET", f"/v1/vms/{vm}"))["state"] == "RUNNING"
        finally:
            filler.unlink(missing_ok=True)  # a failed assertion must not leave the disk full
            remove_quietly(c, vm)


def test_guest_memory_hog_stays_inside_its_vm(client: Client, base_image: str) -> None:
    hog, neighbour = client.vms.run(base_image).id, client.vms.run(base_image).id
    try:
        out = client.vms.exec(hog, ["python3", "-c", "a = bytearray(600 * 2**20)"], timeout_s=60)
        assert out.exit_code != 0, "a 600 MiB allocation cannot succeed in a 256 MiB guest"
        assert client.vms.exec(hog, ["true"]).exit_code == 0, "the guest kernel, not the VM, should stop the hog"
        assert client.vms.exec(neighbour, ["true"]).exit_code == 0
    finally:
        remove_quietly(client, hog)
        remove_quietly(client, neighbour)


def test_serial_flood_is_bounded(client: Client, daemon: DaemonProcess, base_image: str) -> None:
    vm = client.vms.run(base_image).id
    log = daemon.settings.data_dir / "run" / vm / "serial.log"
    try:
        client.vms.exec(vm, ["sh", "-c", "yes flood-the-host-disk > /dev/ttyS0 &"])
        deadline = time.monotonic() + 60
        while f"[{vm}] guest serial output passed 1 MiB" not in daemon.log.read_text():
            assert time.monotonic() < deadline, "the flood never reached the cap"
            assert log.stat().st_size <= SERIAL_LOG_CAP + 2 * 1024 * 1024, "serial log grew without bound"
            time.sleep(0.2)
        assert client.vms.exec(vm, ["true"]).exit_code == 0
    finally:
        remove_quietly(client, vm)


def test_output_flood_streams_with_bounded_daemon_memory(
    client: Client, daemon: DaemonProcess, base_image: str
) -> None:
    vm = client.vms.run(base_image).id
    assert daemon.proc is not None
    rss_before = _rss_mib(daemon.proc.pid)
    try:
        received, peak = 0, rss_before
        # 150 MB of output, read slowly: the guest must be held back, not buffered on the host
        for event in client.vms.exec_events(vm, ["head", "-c", "150000000", "/dev/zero"]):
            if isinstance(event, ExecOutput):
                received += len(event.data)
                if received % (16 * 1024 * 1024) < len(event.data):
                    time.sleep(0.5)
                    peak = max(peak, _rss_mib(daemon.proc.pid))
            else:
                assert event.exit_code == 0
        assert received == 150_000_000
        assert peak - rss_before < 64, f"daemon grew by {peak - rss_before:.0f} MiB while streaming"
    finally:
        remove_quietly(client, vm)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")
