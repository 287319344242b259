"""A VMM that stops answering QMP (stuck, or a guest escaped into it) makes a command fail in bounded time:
recovery at a daemon's start-up queries every adopted VMM, and one silent VMM once kept a restarted daemon
from ever serving."""

from __future__ import annotations

import asyncio
import json
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
