"""Guest behaviour through the real agent, on a launched and on a resumed VM."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from ember.config import Settings
from ember.sdk import ApiError, AsyncClient, Client, ExecExit, ExecOutput, Request
from tests.conftest import AGENT_TIMEOUT_S

pytestmark = [pytest.mark.vm, pytest.mark.store_agnostic]


def sh(client: Client, vm: str, script: str, **kw: object) -> tuple[int, str, str]:
    out = client.vms.exec(vm, ["sh", "-c", script], **kw)
    return out.exit_code, out.stdout.decode(), out.stderr.decode()


def test_exit_codes_and_streams(client: Client, vm: str) -> None:
    assert sh(client, vm, "echo out; echo err >&2; exit 7") == (7, "out\n", "err\n")
    assert sh(client, vm, "true")[0] == 0
    killed = client.vms.exec(vm, ["sh", "-c", "kill -TERM $$"])
    assert (killed.exit_code, killed.signal) == (-1, 15)


def test_output_streams_while_the_command_runs(client: Client, vm: str) -> None:
    start = time.monotonic()
    events = client.vms.exec_events(vm, ["sh", "-c", "echo first; sleep 3; echo second"])
    first = next(events)
    assert first == ExecOutput("stdout", b"first\n")
    assert time.monotonic() - start < 2.5, "first line arrived only when the command ended"
    rest = list(events)
    assert rest[-1] == ExecExit(0)


def test_stdin_env_cwd_user(client: Client, vm: str) -> None:
    out = client.vms.exec(vm, ["sh", "-c", "tr a-z A-Z"], stdin=b"hello\x00bin\n")
    assert out.stdout == b"HELLO\x00BIN\n"
    assert sh(client, vm, 'echo "$GREETING $PATH"', env={"GREETING": "hi there"})[1].startswith("hi there /")
    assert sh(client, vm, "pwd", cwd="/usr/lib")[1] == "/usr/lib\n"
    assert sh(client, vm, "id -u; id -g", user="nobody")[1] == "65534\n65534\n"
    assert sh(client, vm, "id -u", user="1234:99")[1] == "1234\n"


def test_bad_exec_requests_get_clear_errors(client: Client, vm: str) -> None:
    with pytest.raises(ApiError, match="cannot run 'no-such-binary'"):
        client.vms.exec(vm, ["no-such-binary"])
    with pytest.raises(ApiError, match="working directory '/nope'"):
        client.vms.exec(vm, ["true"], cwd="/nope")
    with pytest.raises(ApiError, match="unknown user 'ghost'"):
        client.vms.exec(vm, ["true"], user="ghost")


def test_timeout_kills_the_command(client: Client, vm: str) -> None:
    start = time.monotonic()
    out = client.vms.exec(vm, ["sh", "-c", "echo started; sleep 30"], timeout_s=1.5)
    assert out.timed_out and out.signal == 9 and out.stdout == b"started\n"
    assert time.monotonic() - start < 10


def test_background_processes_outlive_exec(client: Client, vm: str) -> None:
    # the background job keeps printing to the exec's stdout after exec returns
    code, _, _ = sh(client, vm, "(while true; do date; echo tick > /tmp/bg; sleep 0.2; done) & echo $! > /tmp/bg.pid")
    assert code == 0
    time.sleep(1)
    code, _, _ = sh(client, vm, "rm -f /tmp/bg; sleep 1; test -f /tmp/bg && kill -0 $(cat /tmp/bg.pid)")
    assert code == 0, "background process died after its exec returned"


def test_large_binary_file_round_trip(client: Client, vm: str, tmp_path: Path) -> None:
    data = os.urandom(48 * 1024 * 1024)
    src, back = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(data)
    with open(src, "rb") as f:
        assert client.files.write(vm, "/root/in.bin", iter(lambda: f.read(1 << 20), b""), mode=0o600) == len(data)
    assert sh(client, vm, "sha256sum /root/in.bin | cut -d' ' -f1")[1].strip() == hashlib.sha256(data).hexdigest()
    assert client.files.read_to(vm, "/root/in.bin", back) == len(data)
    assert back.read_bytes() == data
    listing = client.send(Request("GET", f"/v1/vms/{vm}/ls", {"path": "/root"}))
    assert listing["truncated"] is False
    entry = next(e for e in listing["entries"] if e["name"] == "in.bin")
    assert entry["size"] == len(data) and entry["mode"] & 0o777 == 0o600


def test_file_errors_are_clear(client: Client, vm: str, tmp_path: Path) -> None:
    with pytest.raises(ApiError, match="must be absolute") as err:
        client.files.write(vm, "relative/path", b"x")
    assert err.value.status == 400
    with pytest.raises(ApiError, match="No such file or directory"):
        client.files.write(vm, "/no/such/dir/file", b"x")
    with pytest.raises(ApiError, match="cannot open /etc/nope"):
        client.files.read_to(vm, "/etc/nope", tmp_path / "x")
    with pytest.raises(ApiError, match="not a regular file"):
        client.files.read_to(vm, "/etc", tmp_path / "x")
    with pytest.raises(ApiError, match="cannot list /nope"):
        client.send(Request("GET", f"/v1/vms/{vm}/ls", {"path": "/nope"}))


def test_disconnecting_client_stops_the_command(client: Client, vm: str) -> None:
    events = client.vms.exec_events(vm, ["sh", "-c", "echo $$; exec sleep 1000"])
    first = next(events)
    assert isinstance(first, ExecOutput)
    pid = first.data.decode().strip()
    events.close()  # the client goes away mid-command (Ctrl-C)
    deadline = time.monotonic() + 10
    while sh(client, vm, f"kill -0 {pid}")[0] == 0:
        assert time.monotonic() < deadline, "the command outlived its disconnected client"
        time.sleep(0.2)


def test_quiet_command_may_outlast_the_agent_call_timeout(client: Client, vm: str) -> None:
    # no output for longer than a request to the agent may take: only the exec timeout counts
    out = client.vms.exec(vm, ["sh", "-c", f"sleep {AGENT_TIMEOUT_S + 2}; echo done"], timeout_s=60)
    assert out.stdout == b"done\n" and not out.timed_out


async def test_async_client(settings: Settings, vm: str) -> None:
    async with AsyncClient(settings=settings) as c:
        out = await c.vms.exec(vm, ["sh", "-c", "echo async"])
        assert (out.exit_code, out.stdout) == (0, b"async\n")
        info = await c.send(Request("GET", f"/v1/vms/{vm}"))
        assert info["state"] == "RUNNING"
