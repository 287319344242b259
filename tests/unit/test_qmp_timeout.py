"""A VMM that stops answering QMP (stuck, or a guest escaped into it) makes a command fail in bounded time:
recovery at a daemon's start-up queries every adopted VMM, and one silent VMM once kept a restarted daemon
from ever serving."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from ember.errors import VmmError
from ember.vmm import qemu

GREETING = {"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "capabilities": []}}


async def silent_after_negotiation(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A QMP server that greets and negotiates, then reads every command and answers none."""
    writer.write(json.dumps(GREETING).encode() + b"\r\n")
    await writer.drain()
    negotiation, _ = json.JSONDecoder().raw_decode((await reader.read(65536)).decode())  # QMP sends no newline
    answer: dict[str, Any] = {"return": {}}
    if "id" in negotiation:
        answer["id"] = negotiation["id"]
    writer.write(json.dumps(answer).encode() + b"\r\n")
    await writer.drain()
    while await reader.read(65536):
        pass
    writer.close()


async def test_a_silent_vmm_fails_a_command_in_bounded_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qemu, "QMP_TIMEOUT_S", 0.5, raising=False)
    path = tmp_path / "qmp.sock"
    server = await asyncio.start_unix_server(silent_after_negotiation, str(path))
    qmp = QMPClient("test")
    await qmp.connect(str(path))
    control: Any = None  # not used by a command
    vmm = qemu.QemuVmm(12345, control, qmp, child=False)
    try:
        with pytest.raises(VmmError, match="did not answer QMP query-status"):
            await asyncio.wait_for(vmm.status(), 10)  # the old code waited forever: this bound fails it
    finally:
        await qmp.disconnect()
        server.close()
        await server.wait_closed()


def answering(answers: dict[str, Any]) -> Any:
    """A QMP server that answers each command from ``answers`` by name (a value, or a callable making it; a
    command not there: never)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(json.dumps(GREETING).encode() + b"\r\n")
        await writer.drain()
        decoder, buffered = json.JSONDecoder(), ""
        while data := await reader.read(65536):
            buffered += data.decode()
            while buffered.strip():
                command, end = decoder.raw_decode(buffered.lstrip())
                buffered = buffered.lstrip()[end:]
                name = command["execute"]
                if name == "qmp_capabilities":
                    writer.write(json.dumps({"return": {}, "id": command.get("id")}).encode() + b"\r\n")
                elif name in answers:
                    answer = answers[name]() if callable(answers[name]) else answers[name]
                    writer.write(json.dumps({"return": answer, "id": command.get("id")}).encode() + b"\r\n")
            await writer.drain()
        writer.close()

    return serve


async def vmm_on(tmp_path: Path, answers: dict[str, Any]) -> tuple[qemu.QemuVmm, QMPClient, asyncio.Server]:
    path = tmp_path / "qmp.sock"
    server = await asyncio.start_unix_server(answering(answers), str(path))
    qmp = QMPClient("test")
    await qmp.connect(str(path))
    control: Any = None
    return qemu.QemuVmm(12345, control, qmp, child=False), qmp, server


async def test_a_migration_that_moves_nothing_is_given_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QEMU answers query-migrate, always "active" with the same RAM moved: the save once waited forever."""
    monkeypatch.setattr(qemu, "MIGRATION_STALL_S", 0.3)
    active = {"status": "active", "ram": {"transferred": 4096, "remaining": 1 << 20, "dirty-sync-count": 1}}
    vmm, qmp, server = await vmm_on(tmp_path, {"query-migrate": active})
    try:
        with pytest.raises(VmmError, match="made no progress for 0 s"):
            await asyncio.wait_for(vmm._migrated(), 10)
    finally:
        await qmp.disconnect()
        server.close()
        await server.wait_closed()


async def test_closing_a_stale_fd_is_bounded_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """closefd (before a save passes its fd) went straight to QMP without the commands' time limit."""
    monkeypatch.setattr(qemu, "QMP_TIMEOUT_S", 0.3)
    vmm, qmp, server = await vmm_on(tmp_path, {})
    r, w = os.pipe()
    try:
        with pytest.raises(VmmError, match="did not answer QMP closefd"):
            await asyncio.wait_for(vmm._pass_fd(r, "ember-save"), 10)
    finally:
        os.close(r)
        os.close(w)
        await qmp.disconnect()
        server.close()
        await server.wait_closed()


async def test_a_given_up_save_is_cancelled_in_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Giving up on a stalled save left QEMU's migration running: completed later, it would stop a guest the
    engine had resumed. QEMU is now told migrate_cancel, and the save ends once QEMU says it is over."""
    monkeypatch.setattr(qemu, "MIGRATION_STALL_S", 0.3)
    migration = {"status": "active", "ram": {"transferred": 4096, "remaining": 1 << 20, "dirty-sync-count": 1}}
    cancels: list[bool] = []

    def cancel() -> dict[str, Any]:
        cancels.append(True)
        migration["status"] = "cancelling"  # then cancelled, two queries later
        return {}

    polls = 0

    def query() -> dict[str, Any]:
        nonlocal polls
        if migration["status"] == "cancelling":
            polls += 1
            if polls > 2:
                migration["status"] = "cancelled"
        return migration

    vmm, qmp, server = await vmm_on(tmp_path, {"query-migrate": query, "migrate_cancel": cancel})
    try:
        with pytest.raises(VmmError, match="made no progress"):
            await asyncio.wait_for(vmm._saved(), 10)
        assert cancels == [True] and migration["status"] == "cancelled"
    finally:
        await qmp.disconnect()
        server.close()
        await server.wait_closed()
