"""The SDK end to end on a real daemon and VM, sync and async: typed results, streamed stdin, files,
suspend/resume, events, and the exception tree (also for an error inside a stream)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from ember.config import Settings
from ember.sdk import AsyncClient, Client, InvalidRequest, InvalidState, NotFound
from ember.sdk.core import exec_request


def slow_input() -> Iterator[bytes]:
    yield b"one\n"
    time.sleep(0.5)  # the command has started and reads as the input comes
    yield b"two\n"


def test_sync_client_end_to_end(client: Client, base_image: str, tmp_path: Path) -> None:
    vm = client.vms.run(base_image, tags={"suite": "sdk"}, env={"GREETING": "hi"})
    try:
        assert vm.state == "RUNNING" and vm.image == base_image and vm.id.startswith("vm-")
        assert vm.id in [v.id for v in client.vms.list()]
        seen: list[tuple[str, bytes]] = []
        result = vm.exec(["sh", "-c", "cat; echo err >&2; exit 3"], stdin=slow_input(),
                         on_output=lambda stream, data: seen.append((stream, data)))  # fmt: skip
        assert (result.exit_code, result.stdout, result.stderr) == (3, b"one\ntwo\n", b"err\n")
        assert b"".join(d for s, d in seen if s == "stdout") == b"one\ntwo\n"
        assert vm.files.write("/root/sdk/data.bin", [b"\x00" * 100_000, b"end"], mode=0o600, mkdirs=True) == 100_003
        assert vm.files.read("/root/sdk/data.bin")[-3:] == b"end"
        assert vm.files.read_to("/root/sdk/data.bin", tmp_path / "copy") == 100_003
        listing = vm.files.ls("/root/sdk")
        assert [(e.name, e.size, e.mode & 0o777) for e in listing.entries] == [("data.bin", 100_003, 0o600)]
        suspended = vm.suspend()
        assert suspended.state == "SUSPENDED" and suspended.elapsed_ms > 0
        assert vm.refresh().state == "SUSPENDED"
        with pytest.raises(InvalidState) as conflict:
            vm.exec(["true"])
        assert conflict.value.status == 409 and conflict.value.kind == "InvalidStateTransition"
        assert vm.resume().state == "RUNNING"
        assert vm.exec(["cat", "/root/sdk/data.bin"]).stdout[-3:] == b"end"  # the files survived
        states = [(e.from_state, e.to_state) for e in vm.events()]
        assert ("RUNNING", "SUSPENDING") in states or ("RUNNING", "SUSPENDED") in states, states
        assert states[-1][1] == "RUNNING"
    finally:
        vm.remove()
    assert vm.refresh().state == "TERMINATED"  # kept listable for a while, with its reason
    with pytest.raises(InvalidState):
        vm.exec(["true"])
    with pytest.raises(NotFound) as missing:
        client.vms.exec("vm-doesnotexist", ["true"])
    assert (missing.value.status, missing.value.kind) == (404, "VmNotFound")


async def test_async_client_end_to_end(settings: Settings, base_image: str) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for part in (b"a" * 300_000, b"b"):  # larger than one upload chunk
            yield part

    async with AsyncClient(settings=settings) as ember:
        vm = await ember.vms.run(base_image)
        try:
            result = await vm.exec(["wc", "-c"], stdin=chunks())
            assert (result.exit_code, result.stdout.strip()) == (0, b"300001")
            assert await vm.files.write("/root/a.txt", b"async\n") == 6
            assert await vm.files.read("/root/a.txt") == b"async\n"
            assert [e.name for e in (await vm.files.ls("/root")).entries if e.name == "a.txt"] == ["a.txt"]
            assert (await vm.suspend()).state == "SUSPENDED"
            with pytest.raises(InvalidState):
                await vm.exec(["true"])
            assert (await vm.resume()).state == "RUNNING"
            assert (await vm.exec(["cat", "/root/a.txt"])).stdout == b"async\n"
            outputs = [e async for e in vm.exec_events(["echo", "streamed"])]
            assert outputs[-1].exit_code == 0  # type: ignore[union-attr]
        finally:
            await vm.remove()
        assert (await vm.refresh()).state == "TERMINATED"
        with pytest.raises(NotFound):
            await ember.vms.get("vm-doesnotexist")


async def test_an_error_inside_a_stream_keeps_its_kind(client: Client, settings: Settings, base_image: str) -> None:
    """An exec whose stdin never comes ends, after the daemon's wait, with an error line: both clients
    raise it as InvalidRequest (400), as the same error answered as a status would be."""
    vm = client.vms.run(base_image)
    try:
        with pytest.raises(InvalidRequest) as sync_error:
            for _ in client.stream(exec_request(vm.id, ["cat"], stdin=True)):
                pass  # the {"stdin": ID} event: never answered
        assert sync_error.value.status == 400 and "no stdin arrived" in str(sync_error.value)
        async with AsyncClient(settings=settings) as ember:
            with pytest.raises(InvalidRequest) as async_error:
                async for _ in ember.stream(exec_request(vm.id, ["cat"], stdin=True)):
                    pass
        assert async_error.value.kind == "InvalidRequest" and "no stdin arrived" in str(async_error.value)
    finally:
        vm.remove()
