"""Guest-side hostile input and guest hardening, through a real daemon and real VMs."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator

import pytest

from ember.config import Settings
from ember.sdk import ApiError, AsyncClient, Client, Request
from tests.conftest import DaemonProcess, remove_quietly

pytestmark = [pytest.mark.vm, pytest.mark.store_agnostic]
GENERATION = "/run/ember/generation"


@pytest.fixture
def one_vm(client: Client, base_image: str) -> Iterator[str]:
    vm_id = client.vms.run(base_image).id
    yield vm_id
    remove_quietly(client, vm_id)


def sh(client: Client, vm: str, script: str, **kw: object) -> str:
    out = client.vms.exec(vm, ["sh", "-c", script], **kw)
    assert out.exit_code == 0, out
    return out.stdout.decode()


def listing(client: Client, vm: str, path: str) -> dict[str, object]:
    return dict(client.send(Request("GET", f"/v1/vms/{vm}/ls", {"path": path})))


def test_listing_is_bounded_complete_or_flagged(client: Client, settings: Settings, one_vm: str) -> None:
    # the old agent silently dropped every entry past ~18 000
    make = (
        "import os, sys; d = sys.argv[1]; os.makedirs(d)\n"
        "for i in range(int(sys.argv[2])): open(f'{d}/f{i:06}', 'w').close()"
    )
    client.vms.exec(one_vm, ["python3", "-c", make, "/root/many", "25000"])
    full = listing(client, one_vm, "/root/many")
    assert full["truncated"] is False
    names = [e["name"] for e in full["entries"]]  # type: ignore[attr-defined]
    assert names == [f"f{i:06}" for i in range(25000)]

    over = settings.ls_max_entries + 1
    client.vms.exec(one_vm, ["python3", "-c", make, "/root/more", str(over)])
    capped = listing(client, one_vm, "/root/more")
    assert capped["truncated"] is True
    entries = capped["entries"]
    assert isinstance(entries, list) and len(entries) == settings.ls_max_entries
    assert len({e["name"] for e in entries}) == len(entries)


def test_exec_stdin_over_1MiB_with_slow_reader_arrives_intact(client: Client, one_vm: str) -> None:
    # the old agent kept 1 MiB of this and dropped the rest, and the command still exited 0
    data = os.urandom(8 * 1024 * 1024)
    out = client.vms.exec(one_vm, ["sh", "-c", "sleep 1; sha256sum"], stdin=data)
    assert out.exit_code == 0
    assert out.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    # a command that stops reading early is a pipe closed early, not an error or a hang
    out = client.vms.exec(one_vm, ["head", "-c", "5"], stdin=iter([data, data]))
    assert (out.exit_code, out.stdout) == (0, data[:5])


async def test_async_client_streams_stdin(settings: Settings, one_vm: str) -> None:
    data = os.urandom(3 * 1024 * 1024 + 5)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(data), 100_000):
            yield data[i : i + 100_000]

    async with AsyncClient(settings=settings) as c:
        out = await c.vms.exec(one_vm, ["sh", "-c", "sleep 1; sha256sum"], stdin=chunks())
    assert out.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_cli_exec_stdin_streams(daemon: DaemonProcess, one_vm: str) -> None:
    data = os.urandom(3 * 1024 * 1024)
    proc = subprocess.run(
        [sys.executable, "-m", "ember", "exec", "-i", one_vm, "--", "sh", "-c", "sleep 1; sha256sum"],
        input=data, capture_output=True, env=daemon.env, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_exec_requests_with_nul_or_impossible_ids_get_400(client: Client, one_vm: str) -> None:
    for kw in ({"cwd": "/tmp\x00x"}, {"env": {"K": "a\x00b"}}, {"user": "4294967296"}, {"user": "0:-1"}):
        with pytest.raises(ApiError) as err:
            client.vms.exec(one_vm, ["true"], **kw)
        assert err.value.status == 400, err.value
    with pytest.raises(ApiError, match="NUL") as err:
        client.vms.exec(one_vm, ["echo", "a\x00b"])
    assert err.value.status == 400
    with pytest.raises(ApiError, match="stdin_b64") as err:  # the removed field is refused, never ignored
        client.send(Request("POST", f"/v1/vms/{one_vm}/exec", json={"argv": ["cat"], "stdin_b64": "aGk="}))
    assert err.value.status == 400


def test_guest_passwd_uid_out_of_range_is_refused_by_the_agent(client: Client, one_vm: str) -> None:
    # (uid_t)4294967296 wrapped to 0: the old agent ran this "user" as root
    sh(client, one_vm, "echo 'big:x:4294967296:4294967296::/:/bin/sh' >> /etc/passwd")
    with pytest.raises(ApiError, match="unknown user 'big'"):
        client.vms.exec(one_vm, ["id", "-u"], user="big")


def test_cp_does_not_follow_a_guest_symlink_in_the_last_component(client: Client, vm: str) -> None:
    sh(client, vm, "echo keep > /root/secret; ln -s /root/secret /tmp/trap; mkfifo /tmp/fifo")
    with pytest.raises(ApiError, match="symbolic link"):
        client.files.write(vm, "/tmp/trap", b"clobbered by root")
    assert sh(client, vm, "cat /root/secret") == "keep\n"
    with pytest.raises(ApiError, match="not a regular file"):  # and the agent does not block on it
        client.files.write(vm, "/tmp/fifo", b"x")
    assert client.files.write(vm, "/tmp/plain", b"fine") == 4


def test_protected_sysctls_are_on(client: Client, vm: str) -> None:
    knobs = "symlinks hardlinks fifos regular"
    values = sh(client, vm, f"for k in {knobs}; do cat /proc/sys/fs/protected_$k; done").split()
    assert values == ["1", "1", "2", "2"]


def test_generation_file_changes_on_every_restore(client: Client, base_image: str, one_vm: str) -> None:
    def generation(vm: str) -> tuple[int, str]:
        assert sh(client, vm, f"stat -c %a:%U {GENERATION}") == "644:root\n"
        counter, ident = sh(client, vm, f"cat {GENERATION}", user="nobody").split()
        return int(counter), ident

    first = generation(one_vm)
    client.send(Request("POST", f"/v1/vms/{one_vm}/suspend"))
    client.send(Request("POST", f"/v1/vms/{one_vm}/resume"))
    resumed = generation(one_vm)
    assert resumed[0] > first[0] and resumed[1] != first[1]
    other = client.vms.run(base_image).id
    try:
        sibling = generation(other)
        assert sibling[1] not in (first[1], resumed[1]), "two clones of one snapshot share a generation"
    finally:
        remove_quietly(client, other)
