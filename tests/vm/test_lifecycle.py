"""VM lifecycle on real micro-VMs: clones, identity, suspend/resume, fork, failures."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.config import Settings
from ember.sdk import ApiError, Client, Request
from tests.conftest import process_alive, remove_quietly

pytestmark = pytest.mark.vm

# Keeps a random value in memory and serves it on guest loopback.
HOLDER = (
    "import os, socket\n"
    "value = os.urandom(8).hex()\n"
    "srv = socket.socket(); srv.bind(('127.0.0.1', 9000)); srv.listen()\n"
    "while True:\n"
    "    c, _ = srv.accept(); c.sendall(value.encode()); c.close()\n"
)
ASK = "import socket; print(socket.create_connection(('127.0.0.1', 9000)).recv(64).decode())"


@pytest.fixture
def vms(client: Client, base_image: str) -> Iterator[list[str]]:
    created: list[str] = []
    yield created
    for vm_id in created:
        remove_quietly(client, vm_id)


def launch(client: Client, vms: list[str], image: str = "debian") -> str:
    vm_id = client.vms.run(image).id
    vms.append(vm_id)
    return vm_id


def out(client: Client, vm: str, *argv: str) -> str:
    result = client.vms.exec(vm, list(argv))
    assert result.exit_code == 0, result
    return result.stdout.decode().strip()


def action(client: Client, vm: str, verb: str) -> dict[str, object]:
    return dict(client.send(Request("POST", f"/v1/vms/{vm}/{verb}")))


def inspect(client: Client, vm: str) -> dict[str, object]:
    return dict(client.send(Request("GET", f"/v1/vms/{vm}", {"live": "true"})))


def test_clones_are_independent_and_unique(client: Client, vms: list[str]) -> None:
    a, b = launch(client, vms), launch(client, vms)
    out(client, a, "sh", "-c", "echo only-in-a > /root/mine")
    assert client.vms.exec(b, ["cat", "/root/mine"]).exit_code != 0, "a write in one clone leaked into another"
    rand_a = out(client, a, "sh", "-c", "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'")
    rand_b = out(client, b, "sh", "-c", "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'")
    assert len(rand_a) == 64 and rand_a != rand_b, "two clones produced the same random bytes"
    assert out(client, a, "hostname") == a and out(client, b, "hostname") == b
    for vm in (a, b):
        guest_now = int(out(client, vm, "date", "+%s"))
        assert abs(guest_now - time.time()) < 5, "guest clock not set from the host after restore"
        view = inspect(client, vm)
        assert view["state"] == "RUNNING" and view["vmm_status"] == "running"
        assert 0 < view["host_pss_mib"] < 256, "a clone should share most of its image's memory"  # type: ignore[operator]
        assert view["agent_ping_ms"] is not None, "the guest agent did not answer a ping"
        assert view["accelerator"]["name"] in ("tcg", "kvm")  # type: ignore[index]


def test_state_survives_three_suspend_resume_cycles(client: Client, vms: list[str], settings: Settings) -> None:
    vm = launch(client, vms)
    out(client, vm, "sh", "-c", f'nohup python3 -c "{HOLDER}" >/dev/null 2>&1 & echo $! > /root/holder.pid')
    out(client, vm, "sh", "-c", "head -c 1000000 /dev/urandom > /root/data.bin; sync")
    time.sleep(1.0)
    value = out(client, vm, "python3", "-c", ASK)
    checksum = out(client, vm, "sha256sum", "/root/data.bin")
    pid = out(client, vm, "cat", "/root/holder.pid")
    for _ in range(3):
        r = action(client, vm, "suspend")
        assert r["state"] == "SUSPENDED"
        assert not (settings.data_dir / "run" / vm).exists(), "suspended VM still holds host resources"
        with pytest.raises(ApiError, match="resume it first") as err:
            client.vms.exec(vm, ["true"])
        assert err.value.status == 409
        assert action(client, vm, "resume")["state"] == "RUNNING"
        assert out(client, vm, "python3", "-c", ASK) == value
        assert out(client, vm, "sha256sum", "/root/data.bin") == checksum
        assert out(client, vm, "cat", "/root/holder.pid") == pid
        assert abs(int(out(client, vm, "date", "+%s")) - time.time()) < 5


def test_snapshot_makes_a_launchable_image(client: Client, vms: list[str]) -> None:
    src = launch(client, vms)
    out(client, src, "sh", "-c", f'echo forked > /root/marker; nohup python3 -c "{HOLDER}" >/dev/null 2>&1 &')
    time.sleep(1.0)
    value = out(client, src, "python3", "-c", ASK)
    name = f"fork-{os.getpid()}"
    image = client.send(Request("POST", f"/v1/vms/{src}/snapshot", json={"name": name}))
    assert image["name"] == name and image["parent"] == "debian"
    assert out(client, src, "cat", "/root/marker") == "forked", "the source VM must keep running"
    child = launch(client, vms, name)
    assert out(client, child, "cat", "/root/marker") == "forked"
    assert out(client, child, "python3", "-c", ASK) == value, "the forked process is not running in the clone"
    assert out(client, child, "hostname") == child
    with pytest.raises(ApiError, match="exists") as err:
        client.send(Request("POST", f"/v1/vms/{src}/snapshot", json={"name": name}))
    assert err.value.status == 409


def test_rm_leaves_nothing_behind(client: Client, vms: list[str], settings: Settings) -> None:
    vm = launch(client, vms)
    pid = inspect(client, vm)["pid"]
    assert isinstance(pid, int) and process_alive(pid)
    client.send(Request("DELETE", f"/v1/vms/{vm}"))
    assert not process_alive(pid), "QEMU survived rm"
    assert not (settings.vms_dir / vm).exists(), "VM files survived rm"
    assert not any(p.name == vm for p in Path("/sys/fs/cgroup").glob("**/ember-*/*")), "cgroup survived rm"
    view = inspect(client, vm)  # kept, TERMINATED, for the retention period
    assert (view["state"], view["state_reason"], view["pid"]) == ("TERMINATED", "user_terminate", None)
    with pytest.raises(ApiError) as err:
        client.vms.exec(vm, ["true"])
    assert err.value.status == 409 and "removed" in str(err.value)


def test_corrupt_suspend_snapshot_is_refused(client: Client, vms: list[str], settings: Settings) -> None:
    vm = launch(client, vms)
    out(client, vm, "sh", "-c", "echo precious > /root/keep")
    # the first suspend: one mapped-ram file holds RAM and state; later ones: a state file beside the RAM
    for name in ("ram", "state"):
        action(client, vm, "suspend")
        damage_and_restore(client, vm, settings.vms_dir / vm / "suspend" / name)
        assert out(client, vm, "cat", "/root/keep") == "precious"


def damage_and_restore(client: Client, vm: str, path: Path) -> None:
    """A flipped byte and a cut file are refused (the VM stays suspended); the intact file resumes."""
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ApiError, match="damaged"):
        action(client, vm, "resume")
    assert inspect(client, vm)["state"] == "SUSPENDED", "a refused resume must leave the VM suspended"
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(byte)
        tail = (f.seek(size - 100), f.read(100))[1]
        f.truncate(size - 100)
    with pytest.raises(ApiError, match=r"damaged|manifest says"):
        action(client, vm, "resume")
    with open(path, "ab") as f:
        f.write(tail)
    assert action(client, vm, "resume")["state"] == "RUNNING"


def test_vmm_crash_marks_the_vm_failed(client: Client, vms: list[str], settings: Settings) -> None:
    vm = launch(client, vms)
    pid = inspect(client, vm)["pid"]
    assert isinstance(pid, int)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while inspect(client, vm)["state"] != "FAILED":
        assert time.monotonic() < deadline, "VMM crash went unnoticed"
        time.sleep(0.1)
    assert inspect(client, vm)["state_reason"] == "vmm_exited"
    with pytest.raises(ApiError, match="has failed"):
        client.vms.exec(vm, ["true"])
    client.send(Request("DELETE", f"/v1/vms/{vm}"))
    assert not (settings.vms_dir / vm).exists()


def test_bad_input_gets_clear_errors(client: Client, base_image: str) -> None:
    cases = [
        (lambda: client.vms.run("no-such-image"), 404, "ember image ls"),
        (lambda: client.vms.exec("vm-000000000000", ["true"]), 404, "ember ps"),
        (lambda: action(client, "vm-000000000000", "suspend"), 404, "ember ps"),
        (lambda: client.send(Request("POST", "/v1/vms", json={})), 400, "image"),
    ]
    vm = client.vms.run(base_image).id
    cases += [
        (lambda: client.send(Request("POST", f"/v1/vms/{vm}/exec", json={"argv": []})), 400, "argv"),
        (lambda: client.vms.exec(vm, ["echo", "x" * 300_000]), 400, "must fit in 256 KiB"),
        (lambda: client.vms.exec(vm, ["true"], env={f"V{i}": "1" for i in range(1500)}), 400, "1000 entries"),
    ]
    try:
        for call, status, hint in cases:
            with pytest.raises(ApiError) as err:
                call()
            assert err.value.status == status and hint in str(err.value), (status, str(err.value))
        assert client.vms.exec(vm, ["true"]).exit_code == 0, "bad requests must not disturb the VM"
    finally:
        remove_quietly(client, vm)
