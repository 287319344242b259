"""What a client can hold of the ingress: the real IngressServer on loopback, its VM side stubbed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

import pytest

from ember.config import Settings
from ember.ingress.admission import Admission, Limits, address_key
from ember.ingress.proxy import IngressServer
from ember.ingress.tokens import Ports, TokenKind, TokenSigner
from ember.lifecycle.activity import Activity
from ember.models import VmRecord, VmState
from ember.vmm.accel import Accel
from ember.vmm.machine import MachineConfig

if TYPE_CHECKING:
    from ember.api.auth import Authenticator
    from ember.engine import Engine

VM = "vm-0123abcd"


class SilentApp:
    """The app's end of a relay: takes the request's bytes, never answers."""

    def __init__(self) -> None:
        self.received = bytearray()

    async def write(self, data: bytes) -> None:
        self.received += data

    async def read(self, n: int) -> bytes:
        await asyncio.Event().wait()
        return b""

    def drop(self) -> None:
        pass


class StubEngine:
    """One RUNNING VM of tenant acme whose app is a SilentApp; the idle bookkeeping is the real Activity."""

    def __init__(self) -> None:
        machine = MachineConfig(Accel.TCG, 256, 1, "/k", "/i", "", "QEMU emulator version 10.0.2")
        self.record = VmRecord(
            id=VM, image="x", state=VmState.RUNNING, machine=machine, uid=1, token="t", tenant="acme"
        )
        self.store = SimpleNamespace(get_vm=lambda vm_id: self.record if vm_id == VM else None)
        self.activity = Activity()
        self.app = SilentApp()

    async def wake(self, vm_id: str, *, action: str) -> VmRecord:
        return self.record

    def _agent(self, record: VmRecord, action: str) -> Any:
        app = self.app

        async def open_tcp(port: int, *, timeout_s: float) -> SilentApp:
            return app

        return SimpleNamespace(open_tcp=open_tcp)


@contextlib.asynccontextmanager
async def ingress(tmp_path: Path, **limits: Any) -> AsyncIterator[tuple[IngressServer, StubEngine]]:
    settings = Settings(data_dir=tmp_path, socket_path=tmp_path / "ember.sock", ingress_listen="127.0.0.1:0", **limits)
    engine = StubEngine()
    signer = TokenSigner(os.urandom(32))
    server = IngressServer(settings, cast("Engine", engine), cast("Authenticator", None), signer, shell=cast(Any, None))
    await server.start()
    running = asyncio.create_task(server.run())
    try:
        yield server, engine
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running


async def open_from(server: IngressServer, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection from ``source`` (any 127.0.0.0/8 address is this host's loopback)."""
    return await asyncio.open_connection("127.0.0.1", server.port, local_addr=(source, 0))


async def answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, Any]]:
    raw = await asyncio.wait_for(reader.read(), 10)
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def closed(reader: asyncio.StreamReader) -> bool:
    with contextlib.suppress(ConnectionError):
        return await asyncio.wait_for(reader.read(), 5) == b""
    return True


async def test_idle_sockets_cannot_keep_out_a_client_with_a_request(tmp_path: Path) -> None:
    """The review's finding: 8 idle sockets from as many addresses filled a limit of 8; the 9th client got 503."""
    async with ingress(tmp_path, ingress_max_connections=8, ingress_max_unauthenticated=4) as (server, _):
        idle = [await open_from(server, f"127.0.0.{i}") for i in range(2, 10)]
        for reader, _ in idle[:4]:  # the oldest made room for the newer ones, closed without an answer
            assert await closed(reader)
        reader, writer = await open_from(server, "127.0.0.20")
        writer.write(f"GET / HTTP/1.1\r\nHost: {VM}.localhost\r\n\r\n".encode())
        status, body = await answer(reader)
        assert status == 401, body  # served: it was read and authorised (no credentials here)
        for _, w in idle:
            w.close()
        writer.close()


async def test_one_address_cannot_take_every_connection(tmp_path: Path) -> None:
    async with ingress(tmp_path, ingress_max_per_address=3) as (server, _):
        held = [await open_from(server, "127.0.0.2") for _ in range(3)]
        refused, one_more = await open_from(server, "127.0.0.2")
        status, body = await answer(refused)
        assert status == 503 and "EMBER_INGRESS_MAX_PER_ADDRESS" in body["message"]
        reader, other = await open_from(server, "127.0.0.3")  # another address still gets in
        other.write(f"GET / HTTP/1.1\r\nHost: {VM}.localhost\r\n\r\n".encode())
        assert (await answer(reader))[0] == 401
        for writer in [*(w for _, w in held), one_more, other]:
            writer.close()


async def test_a_trickled_request_body_is_cut_at_the_minimum_rate(tmp_path: Path) -> None:
    """A token holder sending a byte every 0.3 s held a connection up to the idle timeout (300 s) per byte."""
    async with ingress(tmp_path, ingress_head_timeout_s=1.0, ingress_body_min_rate=100) as (server, engine):
        token = server.signer.issue(vm_id=VM, tenant="acme", kind=TokenKind.PROXY, ports=Ports.parse(8080),
                                    minutes=5)[0]  # fmt: skip
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            f"POST / HTTP/1.1\r\nHost: {VM}.localhost\r\nX-Ember-Proxy-Auth: {token}\r\n"
            "Content-Length: 1000\r\n\r\n".encode()
        )
        started = time.monotonic()
        ended = asyncio.ensure_future(answer(reader))
        while not ended.done() and time.monotonic() - started < 8:
            with contextlib.suppress(ConnectionError):
                writer.write(b"x")
                await writer.drain()
            await asyncio.wait({ended}, timeout=0.3)
        status, body = await ended
        assert status == 408 and "EMBER_INGRESS_BODY_MIN_RATE" in body["message"]
        assert 1.0 <= time.monotonic() - started < 3  # 1 s of grace, and a few bytes' worth
        assert engine.app.received.startswith(b"POST / HTTP/1.1\r\n")  # it did reach the app
        assert not engine.activity.busy(VM)  # the connection's hold ended with it
        writer.close()


def test_the_oldest_unauthorised_connection_makes_room_and_an_authorised_one_never_does() -> None:
    admission = Admission(Limits(total=3, per_address=2, unauthenticated=2))
    closed: list[str] = []
    assert admission.admit("a", ("10.0.0.1", 1), lambda: closed.append("a")) is None
    admission.authorised("a")
    assert admission.admit("b", ("10.0.0.2", 1), lambda: closed.append("b")) is None
    assert admission.admit("c", ("10.0.0.3", 1), lambda: closed.append("c")) is None
    assert admission.admit("d", ("10.0.0.4", 1), lambda: closed.append("d")) is None  # b (oldest) made room
    assert closed == ["b"]
    admission.leave("b")  # its own close afterwards counts nothing twice
    admission.authorised("c")
    admission.authorised("d")
    refusal = admission.admit("e", ("10.0.0.5", 1), lambda: None)
    assert refusal is not None and "connection limit" in refusal  # every connection is authorised: 503
    assert closed == ["b"]


@pytest.mark.parametrize(
    ("peer", "key"),
    [
        (("192.0.2.7", 5), "192.0.2.7"),
        (("::ffff:192.0.2.7", 5, 0, 0), "192.0.2.7"),
        (("2001:db8:1:2:aaaa::1", 5, 0, 0), "2001:db8:1:2::/64"),
        (("2001:db8:1:2:bbbb::9%eth0", 5, 0, 0), "2001:db8:1:2::/64"),
        (None, ""),
    ],
)
def test_an_ipv6_client_counts_as_its_64(peer: object, key: str) -> None:
    assert address_key(peer) == key
