"""The request side of the ingress, as pure functions: reading and checking a request head, routing it to a
VM and a guest port, and the headers forwarded each way.

A request head is at most ``HEAD_MAX`` bytes and ``MAX_HEADERS`` header lines, each ending in CRLF, with
no NUL, bare CR or LF and no obsolete line folding. Framing that two parsers could read differently is
refused (400): Content-Length twice, or with Transfer-Encoding, or a Transfer-Encoding other than
``chunked``; several Host headers too. h11 then parses the checked head, and the request is written to the
guest afresh (ember.ingress.proxy), so nothing ambiguous ever reaches an app.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

HEAD_MAX = 16 * 1024
MAX_HEADERS = 100
DEFAULT_PORT = 8080
PORT_HEADERS = (b"x-ember-proxy-port", b"x-aws-proxy-port")
TOKEN_HEADERS = (b"x-ember-proxy-auth", b"x-aws-proxy-auth")
TENANT_HEADER = b"x-ember-tenant"
# never forwarded: Ember's own headers (tokens, ports, tenant), and hop-by-hop ones (RFC 9110 7.6.1);
# Upgrade and Connection are set again for a WebSocket
_DROPPED_PREFIXES = (b"x-ember-", b"x-aws-proxy-")
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
                        b"upgrade", b"proxy-authorization", b"proxy-authenticate", b"content-length"})  # fmt: skip
VM_ID = re.compile(rb"^vm-[0-9a-f]{1,64}$")
_PATH_FORM = re.compile(rb"^/vm/(vm-[0-9a-f]{1,64})(?=[/?]|$)")
_BAD_LINE = re.compile(rb"[\x00\r\n]")


class HeadError(Exception):
    """A request head refused before it is parsed: ``status`` (400 or 431) and what to fix."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def read_head(reader: asyncio.StreamReader, buf: bytearray) -> bytes | None:
    """The next request head (up to and with its blank line) from ``buf`` and then ``reader``; the bytes
    after it stay in ``buf``. None: the client closed the connection between requests."""
    start = 0
    while True:
        end = buf.find(b"\r\n\r\n", max(0, start - 3))
        if end >= 0:
            if end + 4 > HEAD_MAX:
                raise HeadError(431, f"the request head is over {HEAD_MAX // 1024} KiB")
            head = bytes(buf[: end + 4])
            del buf[: end + 4]
            return head
        if len(buf) >= HEAD_MAX:
            raise HeadError(431, f"the request head is over {HEAD_MAX // 1024} KiB")
        start = len(buf)
        chunk = await reader.read(HEAD_MAX - len(buf) + 4)
        if not chunk:
            if buf.strip():
                raise HeadError(400, "the connection closed in the middle of a request head")
            return None
        buf += chunk


def check_head(head: bytes) -> None:
    """Refuse (HeadError) what h11 would accept but two HTTP parsers could read differently."""
    lines = head[:-4].split(b"\r\n")
    if len(lines) - 1 > MAX_HEADERS:
        raise HeadError(431, f"more than {MAX_HEADERS} header lines")
    lengths = encodings = hosts = 0
    for line in lines:
        if _BAD_LINE.search(line):
            raise HeadError(400, "a NUL, CR or LF inside a request line or header")
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise HeadError(400, "obsolete header line folding is not accepted")
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise HeadError(400, "a header line without a 'name: value' form")
        name = name.lower()
        if name == b"content-length":
            lengths += 1
        elif name == b"transfer-encoding":
            encodings += 1
            if value.strip().lower() != b"chunked":
                raise HeadError(400, "only 'Transfer-Encoding: chunked' is accepted")
        elif name == b"host":
            hosts += 1
    if lengths > 1 or encodings > 1 or hosts > 1:
        raise HeadError(400, "a Content-Length, Transfer-Encoding or Host header given twice")
    if lengths and encodings:
        raise HeadError(400, "both Content-Length and Transfer-Encoding: send one")


@dataclass(frozen=True)
class Route:
    vm_id: str
    target: bytes  # what the guest is asked for (the path form's prefix removed)
    port: int


def route(host: bytes | None, target: bytes, headers: list[tuple[bytes, bytes]], domain: str) -> Route:
    """Which VM and guest port a request is for: Host ``<vm-id>.<domain>[:port]`` or the path
    ``/vm/<vm-id>/...``; the port from X-Ember-Proxy-Port (or X-aws-proxy-port), 8080 by default."""
    if not target.startswith(b"/"):
        raise HeadError(400, "the request target must be a path (origin form)")
    vm_id = ""
    if host is not None:
        name = host.lower()
        if not name.startswith(b"["):
            name = name.rsplit(b":", 1)[0] if b":" in name else name
        suffix = b"." + domain.lower().encode()
        label = name[: -len(suffix)] if name.endswith(suffix) else b""
        if VM_ID.match(label):
            vm_id = label.decode()
    if not vm_id:
        found = _PATH_FORM.match(target)
        if found is None:
            raise HeadError(
                404, f"no VM named in the request: use http://<vm-id>.{domain}:<port>/ or the path /vm/<vm-id>/"
            )
        vm_id = found[1].decode()
        target = target[found.end() :]
        target = target if target.startswith(b"/") else b"/" + target
    ports = [v for k, v in headers if k in PORT_HEADERS]
    if len(ports) > 1:
        raise HeadError(400, "send one X-Ember-Proxy-Port (or X-aws-proxy-port) header")
    port = DEFAULT_PORT
    if ports:
        text = ports[0].strip()
        if not (text.isdigit() and len(text) <= 5 and 1 <= int(text) <= 65535):
            raise HeadError(400, "X-Ember-Proxy-Port must be a port number 1-65535")
        port = int(text)
    return Route(vm_id, target, port)


def forwarded(headers: list[tuple[bytes, bytes]], *, drop_authorization: bool) -> list[tuple[bytes, bytes]]:
    """The request headers the guest sees: never a token or another Ember header, no hop-by-hop header
    (nor any the Connection header names), no Authorization that was an Ember key."""
    named = {t.strip().lower() for k, v in headers if k == b"connection" for t in v.split(b",")}
    return [
        (k, v)
        for k, v in headers
        if not k.startswith(_DROPPED_PREFIXES)
        and k not in HOP_BY_HOP
        and k not in named
        and not (drop_authorization and k == b"authorization")
    ]


def response_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The guest's response headers the client sees: framing is h11's (Content-Length kept when the guest
    gave one, so HEAD and known sizes stay as they are), hop-by-hop ones dropped."""
    named = {t.strip().lower() for k, v in headers if k == b"connection" for t in v.split(b",")}
    kept = [(k, v) for k, v in headers if k not in HOP_BY_HOP and k not in named]
    return kept + [(k, v) for k, v in headers if k == b"content-length"][:1]


def is_upgrade(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The protocol a request asks to switch to (``Connection: upgrade`` + ``Upgrade``), if any."""
    tokens = {t.strip().lower() for k, v in headers if k == b"connection" for t in v.split(b",")}
    upgrades = [v for k, v in headers if k == b"upgrade"]
    return upgrades[0] if b"upgrade" in tokens and len(upgrades) == 1 else None
