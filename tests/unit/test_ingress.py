"""The ingress's pure parts: tokens, request heads and routing; and TCP relays against a fake agent."""

from __future__ import annotations

import asyncio
import errno
import os
import time

import pytest

from ember.errors import AgentUnavailable, GuestError, InvalidRequest, RelayUnavailable, Unauthorized
from ember.guest.protocol import TCP_WINDOW, Frame, Msg, Tag, decode_fields, encode_fields, encode_frame, field_int
from ember.ingress.http import HEAD_MAX, HeadError, check_head, forwarded, read_head, route
from ember.ingress.tokens import Ports, TokenKind, TokenSigner
from tests.unit.test_agent_channel import Agents, FakeAgent, agents, limits, send

__all__ = ["agents"]  # the fake agent fixture, shared with test_agent_channel
KEY = os.urandom(32)
VM = "vm-0123abcd"


def signer(offset_s: float = 0.0, key: bytes = KEY) -> TokenSigner:
    return TokenSigner(key, clock=lambda: time.time() + offset_s)


def issue(s: TokenSigner, ports: str = "8080", minutes: int = 5) -> str:
    return s.issue(vm_id=VM, tenant="acme", kind=TokenKind.PROXY, ports=Ports.parse(ports), minutes=minutes)[0]


# ---- tokens ---------------------------------------------------------------------------------------


def test_a_token_verifies_with_its_grant() -> None:
    grant = signer().verify(issue(signer(), "8000-8100"), kind=TokenKind.PROXY)
    assert (grant.vm_id, grant.tenant, grant.kind, str(grant.ports)) == (VM, "acme", TokenKind.PROXY, "8000-8100")
    assert 8000 in grant.ports and 8100 in grant.ports and 8101 not in grant.ports


def test_expired_tampered_foreign_and_junk_tokens_are_refused() -> None:
    old = issue(signer(-3600))  # made an hour ago for 5 minutes
    with pytest.raises(Unauthorized, match="expired"):
        signer().verify(old, kind=TokenKind.PROXY)
    token = issue(signer())
    prefix, payload, mac = token.split(".")
    for bad in (
        issue(signer(key=os.urandom(32))),  # another daemon's key
        f"{prefix}.{payload[:-2]}AA.{mac}",  # payload changed
        f"{prefix}.{payload}.{mac[:-2]}AA",  # MAC changed
        token + "A" * 2000, "", "emt1.", "emt1.!!!.???", "Bearer x",
    ):  # fmt: skip
        with pytest.raises(Unauthorized):
            signer().verify(bad, kind=TokenKind.PROXY)


@pytest.mark.parametrize(("spec", "shown"), [(8080, "8080"), ("8000-8100", "8000-8100"), ("all", "all"), ("1", "1")])
def test_port_specs(spec: int | str, shown: str) -> None:
    assert str(Ports.parse(spec)) == shown


@pytest.mark.parametrize("spec", [0, 65536, "8100-8000", "80-", "x", "-1", "1-99999", " ", "8080,8081"])
def test_bad_port_specs_and_lifetimes_are_400(spec: int | str) -> None:
    with pytest.raises(InvalidRequest):
        Ports.parse(spec)


@pytest.mark.parametrize("minutes", [0, 61])
def test_lifetimes_are_1_to_60_minutes(minutes: int) -> None:
    with pytest.raises(InvalidRequest):
        issue(signer(), minutes=minutes)


# ---- request heads --------------------------------------------------------------------------------


def head(*lines: str) -> bytes:
    return ("GET / HTTP/1.1\r\n" + "".join(f"{line}\r\n" for line in lines) + "\r\n").encode()


@pytest.mark.parametrize(
    "lines",
    [
        ["Content-Length: 1", "Transfer-Encoding: chunked"],
        ["Content-Length: 1", "content-length: 1"],
        ["Transfer-Encoding: gzip, chunked"],
        ["Host: a", "Host: b"],
        ["X: a\x00b"],
        ["X: a\rb"],
        ["X: a", " folded"],
        ["no colon"],
        ["X : space before the colon"],
    ],
)
def test_ambiguous_heads_are_400(lines: list[str]) -> None:
    with pytest.raises(HeadError) as caught:
        check_head(head(*lines))
    assert caught.value.status == 400


def test_header_count_limit() -> None:
    check_head(head(*(f"X-{i}: y" for i in range(100))))
    with pytest.raises(HeadError) as caught:
        check_head(head(*(f"X-{i}: y" for i in range(101))))
    assert caught.value.status == 431


async def test_read_head_limit_and_pipelined_bytes() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(head("Host: a") + b"BODY" + head("Host: b"))
    reader.feed_eof()
    buf = bytearray()
    assert await read_head(reader, buf) == head("Host: a")
    assert buf.startswith(b"BODY")
    del buf[:4]
    assert await read_head(reader, buf) == head("Host: b")
    assert await read_head(reader, buf) is None  # closed between requests
    big = asyncio.StreamReader()
    big.feed_data(b"GET / HTTP/1.1\r\nX: " + b"a" * HEAD_MAX)
    with pytest.raises(HeadError) as caught:
        await read_head(big, bytearray())
    assert caught.value.status == 431


def test_routes() -> None:
    r = route(b"vm-ab12.localhost:7080", b"/x?y=1", [], "localhost")
    assert (r.vm_id, r.target, r.port) == ("vm-ab12", b"/x?y=1", 8080)
    r = route(b"127.0.0.1:7080", b"/vm/vm-ab12?q", [(b"x-aws-proxy-port", b"3000")], "localhost")
    assert (r.vm_id, r.target, r.port) == ("vm-ab12", b"/?q", 3000)
    assert route(None, b"/vm/vm-ab12/a/b", [], "localhost").target == b"/a/b"
    for host, target, headers, status in (
        (b"example.com", b"/", [], 404),
        (b"x.vm-ab12.localhost", b"/", [], 404),  # one label, a VM id: nothing else
        (b"vm-ab12.localhost", b"http://elsewhere/", [], 400),
        (b"vm-ab12.localhost", b"/", [(b"x-ember-proxy-port", b"0")], 400),
        (b"vm-ab12.localhost", b"/", [(b"x-ember-proxy-port", b"1"), (b"x-aws-proxy-port", b"2")], 400),
        (None, b"/vm/vm-AB12/", [], 404),
    ):  # fmt: skip
        with pytest.raises(HeadError) as caught:
            route(host, target, headers, "localhost")
        assert caught.value.status == status, (host, target)


def test_forwarded_headers_never_carry_ember_headers() -> None:
    sent = [(b"x-ember-proxy-auth", b"t"), (b"x-aws-proxy-auth", b"t"), (b"x-ember-tenant", b"a"),
            (b"x-aws-proxy-port", b"1"), (b"connection", b"keep-alive, x-hop"), (b"x-hop", b"1"),
            (b"transfer-encoding", b"chunked"), (b"authorization", b"Bearer k"), (b"x-app", b"kept")]  # fmt: skip
    assert forwarded(sent, drop_authorization=True) == [(b"x-app", b"kept")]
    assert forwarded(sent, drop_authorization=False) == [(b"authorization", b"Bearer k"), (b"x-app", b"kept")]


# ---- relays against a fake agent --------------------------------------------------------------------


def connected(stream: int, window: int) -> bytes:
    return encode_frame(Msg.TCP_CONNECTED, stream, encode_fields([(Tag.SIZE, window)]))


async def test_the_host_never_sends_beyond_the_agents_window(agents: Agents) -> None:
    async def handler(fake: FakeAgent, frame: Frame, writer: asyncio.StreamWriter) -> None:
        if frame.type is Msg.TCP_CONNECT:
            await send(writer, connected(frame.stream, 1000))

    conn, fake = await agents(handler)
    stream = await conn.open_tcp(8080, timeout_s=2)
    writing = asyncio.ensure_future(stream.write(b"x" * 5000))
    await asyncio.sleep(0.2)
    assert not writing.done() and sum(len(f.payload) for f in fake.frames if f.type is Msg.TCP_SEND) == 1000
    sid = next(f.stream for f in fake.frames if f.type is Msg.TCP_CONNECT)
    await send(fake.writers[0], encode_frame(Msg.CREDIT, sid, encode_fields([(Tag.SIZE, 4000)])))
    await asyncio.wait_for(writing, 2)
    for _ in range(100):  # the fake agent reads what was sent
        await asyncio.sleep(0.01)
    assert sum(len(f.payload) for f in fake.frames if f.type is Msg.TCP_SEND) == 5000
    await stream.close()


async def test_a_guest_sending_beyond_the_hosts_credit_is_refused(agents: Agents) -> None:
    async def handler(fake: FakeAgent, frame: Frame, writer: asyncio.StreamWriter) -> None:
        if frame.type is Msg.TCP_CONNECT:
            granted = field_int(decode_fields(frame.payload), Tag.SIZE)
            assert granted == TCP_WINDOW
            flood = [encode_frame(Msg.TCP_RECV, frame.stream, b"y" * 65536) for _ in range(granted // 65536 + 1)]
            await send(writer, connected(frame.stream, 1000), *flood)

    conn, _ = await agents(handler, limits(vm=8 << 20))
    stream = await conn.open_tcp(8080, timeout_s=2)
    with pytest.raises(AgentUnavailable, match="beyond its credit"):  # the channel is broken: the VM's agent is
        for _ in range(TCP_WINDOW // 65536 + 2):  # hostile or broken
            await stream.read(1 << 20)


async def test_refused_connections_and_the_relay_limit(agents: Agents) -> None:
    async def handler(fake: FakeAgent, frame: Frame, writer: asyncio.StreamWriter) -> None:
        if frame.type is Msg.TCP_CONNECT and field_int(decode_fields(frame.payload), Tag.PORT) == 9:
            fields = encode_fields([(Tag.ERRNO, errno.ECONNREFUSED), (Tag.MESSAGE, "port 9: Connection refused")])
            await send(writer, encode_frame(Msg.ERROR, frame.stream, fields))
        elif frame.type is Msg.TCP_CONNECT:
            await send(writer, connected(frame.stream, 1000))

    lim = limits()
    lim.tcp_relays = 2
    conn, _ = await agents(handler, lim)
    with pytest.raises(GuestError, match="nothing in the VM listens on port 9"):
        await conn.open_tcp(9, timeout_s=2)
    first, second = await conn.open_tcp(80, timeout_s=2), await conn.open_tcp(80, timeout_s=2)
    with pytest.raises(RelayUnavailable):
        await conn.open_tcp(80, timeout_s=2)
    await first.close()
    third = await conn.open_tcp(80, timeout_s=2)  # a closed relay frees its place
    for s in (second, third):
        await s.close()
    assert conn.tcp_open == 0


def test_an_ember_key_sent_beside_a_token_never_reaches_the_guest() -> None:
    """A client that sends its API key by default and a proxy token: the token authorises the request,
    and the key is dropped all the same (it was forwarded to the guest); an app's own Authorization passes."""
    from types import SimpleNamespace
    from typing import Any, cast

    from ember.ingress.http import Route
    from ember.ingress.proxy import ClientConnection
    from ember.models import VmState
    from ember.tenancy.principal import Principal

    key = "ember_" + "A" * 43
    signer = TokenSigner(b"k" * 32)
    token, _ = signer.issue(vm_id="vm-0a", tenant="acme", kind=TokenKind.PROXY, ports=Ports(8080, 8080), minutes=5)
    record = SimpleNamespace(id="vm-0a", tenant="acme", state=VmState.RUNNING)

    def principal(headers: list[tuple[str, str]], peer: object) -> object:
        known = headers == [("authorization", f"Bearer {key}")]
        return Principal("acme", admin=False) if known else Unauthorized("unknown key")

    engine = SimpleNamespace(store=SimpleNamespace(get_vm=lambda _: record))
    auth = SimpleNamespace(principal=principal)
    settings = SimpleNamespace(ingress_idle_timeout_s=1)
    server = SimpleNamespace(signer=signer, engine=engine, settings=settings, auth=auth)
    client = ClientConnection(cast(Any, server), cast(Any, None), cast(Any, None))
    for value, kept in ((f"Bearer {key}", False), ("Bearer the-apps-own", True), ("Basic dXNlcjpwdw==", True)):
        headers = [(b"host", b"vm-0a.localhost"), (b"x-ember-proxy-auth", token.encode()),
                   (b"authorization", value.encode())]  # fmt: skip
        _, drop = client.authorize(headers, Route("vm-0a", b"/", 8080))
        assert ((b"authorization", value.encode()) in forwarded(headers, drop_authorization=drop)) is kept, value
