"""Interactive work through a real daemon and VM: ``ember shell`` in a real terminal (pexpect), the
shell's WebSocket route (tenancy, authentication, bounds, a flooding guest), ``exec -i`` with MiBs
of stdin, and background processes (start, list, kill; nothing outside the agent's table).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator

import pexpect
import pytest
from wsproto.events import TextMessage

from ember.sdk import AsyncClient, Client, GuestError, InvalidRequest, NotFound, Unauthorized
from ember.sdk.shell import Shell
from tests.conftest import ROOT, DaemonProcess, remove_quietly

pytestmark = [pytest.mark.vm, pytest.mark.store_agnostic]


def cli_env(daemon: DaemonProcess) -> dict[str, str]:
    return {**daemon.env, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), "TERM": "xterm"}


def read_until(shell: Shell, marker: bytes, limit: int = 1 << 20) -> bytes:
    seen = b""
    while marker not in seen:
        chunk = shell.recv()
        assert chunk, f"the shell ended before {marker!r}: {seen[-500:]!r}"
        seen = (seen + chunk)[-limit:]
    return seen


def test_ember_shell_in_a_real_terminal(daemon: DaemonProcess, vm: str) -> None:
    child = pexpect.spawn(sys.executable, ["-m", "ember", "shell", vm], env=cli_env(daemon), dimensions=(24, 80),
                          timeout=30)  # fmt: skip
    try:
        child.sendline("echo $((6*7))READY")
        child.expect("42READY")
        child.sendline("stty size; tty")
        child.expect(r"24 80\r\n/dev/pts/\d+")
        child.setwinsize(33, 101)  # the kernel signals SIGWINCH to the CLI, which resizes the guest's terminal
        time.sleep(0.5)
        child.sendline("stty size")
        child.expect(r"33 101")
        child.sendline("sleep 100")
        time.sleep(0.5)
        child.sendcontrol("c")  # raw mode: Ctrl-C goes to the guest's foreground job, not to the CLI
        child.sendline("echo still$((1+1))")
        child.expect("still2")
        child.sendline("exit 3")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 3, child.before


def test_shell_command_and_exit_status_over_the_websocket(client: Client, vm: str) -> None:
    with client.vms.shell(vm, ["sh", "-c", "read line; echo got:$line; exit 5"], rows=10, cols=40) as shell:
        shell.send(b"hello\r")
        read_until(shell, b"got:hello")
        while shell.recv():
            pass
        assert (shell.exit_code, shell.signal) == (5, 0)


async def test_async_shell_and_processes(daemon: DaemonProcess, base_image: str) -> None:
    async with AsyncClient(settings=daemon.settings) as ember:
        vm = await ember.vms.run(base_image)
        try:
            async with await ember.vms.shell(vm.id, ["sh", "-c", "stty size; read x; exit 4"], rows=7, cols=9) as sh:
                seen = b""
                while b"7 9" not in seen:
                    seen += await sh.recv()
                await sh.resize(8, 10)
                await sh.send(b"go\r")
                while await sh.recv():
                    pass
                assert sh.exit_code == 4
            pid = (await ember.vms.start_process(vm.id, ["sleep", "60"])).pid
            assert [p.pid for p in await ember.vms.processes(vm.id) if p.running] == [pid]
            await ember.vms.kill(vm.id, pid, "KILL")
        finally:
            await ember.vms.remove(vm.id)


@pytest.fixture(scope="module")
def tenants(daemon: DaemonProcess, client: Client) -> Iterator[tuple[Client, Client]]:
    made = []
    for _ in range(2):
        name = f"sh-{secrets.token_hex(4)}"
        client.tenants.create(name)
        made.append(Client(settings=daemon.settings, api_key=client.keys.create(tenant=name).api_key))
    yield made[0], made[1]
    for c in made:
        c.close()


def test_shell_route_tenancy_and_authentication(
    daemon: DaemonProcess, tenants: tuple[Client, Client], base_image: str
) -> None:
    alice, mallory = tenants
    vm = alice.vms.run(base_image)
    try:
        with alice.vms.shell(vm.id, ["sh", "-c", "echo mine"]) as shell:
            read_until(shell, b"mine")
        refusals = []
        for vm_id in (vm.id, "vm-" + "0" * 12):
            with pytest.raises(NotFound) as caught:
                mallory.vms.shell(vm_id)
            refusals.append(str(caught.value).replace(vm_id, "<id>"))
        assert refusals[0] == refusals[1]
        with Client(settings=daemon.settings, api_key="ember_" + "x" * 43) as stranger, pytest.raises(Unauthorized):
            stranger.vms.shell(vm.id)  # (no key from a user other than root: tests/unit/test_shell_parts.py)
    finally:
        alice.vms.remove(vm.id)


def test_oversized_and_malformed_client_messages_close_the_shell(client: Client, vm: str) -> None:
    limit = 64 * 1024  # EMBER_SHELL_MAX_MESSAGE_BYTES's default
    with client.vms.shell(vm, ["cat"]) as shell:
        shell.send(b"x" * (limit + 1))
        while shell.recv():
            pass
        assert shell.exit_code is None and "maximum size" in shell.close_reason, shell.close_reason
    with client.vms.shell(vm, ["cat"]) as shell:
        shell._sock.sendall(shell._proto._ws.send(TextMessage(data="{nope")))
        while shell.recv():
            pass
        assert shell.exit_code is None and "JSON" in shell.close_reason, shell.close_reason
    with pytest.raises(InvalidRequest, match="rows and columns"):
        client.vms.shell(vm, rows=0)
    assert client.vms.get(vm).exec(["true"]).exit_code == 0  # the VM is fine


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_a_guest_flooding_its_terminal_is_bounded(daemon: DaemonProcess, client: Client, vm: str) -> None:
    assert daemon.proc is not None
    with client.vms.shell(vm, ["sh", "-c", "yes flooding-the-terminal"]) as shell:
        read_until(shell, b"flooding")
        before = rss_kib(daemon.proc.pid)
        time.sleep(5)  # the client reads nothing: the guest must wait, not the daemon's memory grow
        grown = rss_kib(daemon.proc.pid) - before
        started = time.monotonic()
        assert client.vms.get(vm).exec(["echo", "ok"]).stdout == b"ok\n"  # the VM answers meanwhile
        assert time.monotonic() - started < 10
        shell.send(b"\x03")  # Ctrl-C through the flood
        while shell.recv():
            pass
        assert shell.exit_code is not None
    assert grown < 48 * 1024, f"the daemon grew by {grown} KiB while a guest flooded an unread terminal"


def test_exec_stdin_streams_mebibytes(daemon: DaemonProcess, vm: str) -> None:
    data = os.urandom(6 << 20)
    out = subprocess.run([sys.executable, "-m", "ember", "exec", "-i", vm, "--", "sha256sum"], input=data,
                         env=cli_env(daemon), capture_output=True, timeout=180)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


def ember(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ember", *args], env=cli_env(daemon), capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def test_background_processes_start_list_and_kill(daemon: DaemonProcess, client: Client, vm: str) -> None:
    started = ember(daemon, "exec", "--detach", vm, "--", "sleep", "300")
    assert started.returncode == 0, started.stderr
    sleeper = int(started.stdout)
    quick = client.vms.start_process(vm, ["sh", "-c", "exit 7"]).pid
    deadline = time.monotonic() + 10
    while not any(p.pid == quick and not p.running for p in client.vms.processes(vm)):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    listed = {p.pid: p for p in client.vms.processes(vm)}
    assert listed[sleeper].running and listed[sleeper].command == "sleep 300"
    assert (listed[quick].exit_code, listed[quick].signal) == (7, 0)
    shown = ember(daemon, "ps-guest", vm)
    assert f"{sleeper}" in shown.stdout and "running" in shown.stdout and "exited 7" in shown.stdout, shown
    killed = ember(daemon, "kill", vm, str(sleeper), "--signal", "TERM")
    assert killed.returncode == 0, killed.stderr
    deadline = time.monotonic() + 10
    while next(p for p in client.vms.processes(vm) if p.pid == sleeper).running:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert next(p for p in client.vms.processes(vm) if p.pid == sleeper).signal == 15
    # only the agent's own table: the agent itself (pid 1), an exited process, any other pid are not found
    for pid in (1, quick, sleeper, 4242):
        with pytest.raises(NotFound, match="no background process"):
            client.vms.kill(vm, pid, "KILL")
    assert client.vms.get(vm).exec(["true"]).exit_code == 0  # the agent is alive
    with pytest.raises(InvalidRequest, match="unknown signal"):
        client.vms.kill(vm, sleeper, "NOPE")


def test_background_table_is_bounded(client: Client, base_image: str) -> None:
    vm = client.vms.run(base_image).id
    try:
        for _ in range(64):
            client.vms.start_process(vm, ["sleep", "300"])
        with pytest.raises(GuestError, match="64 background processes are running"):
            client.vms.start_process(vm, ["sleep", "300"])
        first = client.vms.processes(vm)[0].pid
        client.vms.kill(vm, first, "KILL")
        deadline = time.monotonic() + 10
        while next(p for p in client.vms.processes(vm) if p.pid == first).running:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        client.vms.start_process(vm, ["true"])  # the exited one gave its place
        assert len(client.vms.processes(vm)) == 64
    finally:
        remove_quietly(client, vm)
