"""The sync client's HTTP/1.1, on the stdlib's ``socket``: a Unix socket or TCP (TLS for https), kept alive.

Why not ``http.client``: importing it costs about 20 ms (it imports ``email.parser`` and ``ssl``;
``python -X importtime -c "import http.client"`` on the project's 2-core machine: 18 ms of the
66 ms the CLI spent importing), a third of ``ember ps``'s whole start-up budget (60 ms, issue 10),
and httpx (the async client's) or h11 cost as much. What the SDK needs of HTTP is small, and is
all here: a request with a Content-Length or a chunked body streamed as it is produced; an answer's
status line and headers, its body by Content-Length, chunked or up to the connection's close
(read whole, in pieces or as lines); keep-alive with a small pool. ``ssl`` loads only for an
https URL.

The daemon is trusted, but bugs happen and the URL may name something else: every line, the
header block, the header count and a stream's line are bounded, every framing error (a bad
status line, Content-Length or chunk size, a body cut short) is a :class:`ProtocolError`, and a
connection goes back to the pool only once its answer was read to the end. A caller's header or
target that could split the request (CR, LF, NUL, spaces) is refused before anything is sent.
"""

from __future__ import annotations

import io
import socket
from _thread import allocate_lock  # threading.Lock, without importing threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from ember.sdk.core import CONNECT_TIMEOUT_S, MAX_LINE, Endpoint, Request, check, connect_hint
from ember.sdk.errors import ConnectError, ProtocolError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (2.5 ms of the CLI's start)
if TYPE_CHECKING:
    from ember.sdk.core import Body

POOL_MAX = 4  # idle connections kept
MAX_HEAD_LINE = 64 * 1024  # one status, header, chunk-size or trailer line
MAX_HEAD_BYTES = 256 * 1024  # an answer's status line and headers (interim 1xx answers included), and its trailers
MAX_HEADERS = 100  # header (or trailer) lines of one answer
MAX_INTERIM = 10  # interim (1xx) answers before the real one
MAX_ERROR_BODY = 1 << 20  # an error answer's body read; a longer one is cut and its connection closed
READ_SIZE = 64 * 1024
_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_HEX = frozenset("0123456789abcdefABCDEF")
_DIGITS = frozenset("0123456789")  # str.isdigit() is also true of "²", which int() refuses


class _Gone(Exception):
    """The peer closed the connection before a byte of the answer (an idle connection it dropped)."""


def _bad(what: str) -> ProtocolError:
    return ProtocolError(f"the daemon's answer is not valid HTTP: {what}")


class Connection:
    """One socket with its buffered reader."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file = io.BufferedReader(socket.SocketIO(sock, "rb"), READ_SIZE)  # as sock.makefile("rb")
        self.used = False  # has carried a request (a failure on it may be the peer's idle close)

    def alive(self) -> bool:
        """False if the peer closed it (or sent something unasked) while it was idle."""
        if type(self.sock) is not socket.socket:
            return True  # TLS cannot peek: a stale one is retried (:meth:`Transport.open`)
        try:
            self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True  # nothing to read: still open
        except OSError:
            return False
        return False  # closed (b""), or bytes nobody asked for

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def line(self, what: str) -> bytes:
        """A CRLF- (or LF-) ended line of the head, without its ending."""
        try:
            line = self.file.readline(MAX_HEAD_LINE + 1)
        except OSError as exc:
            raise ProtocolError(f"the connection to the daemon broke mid-answer ({exc})") from None
        if len(line) > MAX_HEAD_LINE:
            raise _bad(f"a {what} line over {MAX_HEAD_LINE} bytes")
        if not line.endswith(b"\n"):
            raise ProtocolError(f"the daemon's answer was cut short (in a {what} line)")
        return line.rstrip(b"\r\n")


def _fields(conn: Connection, what: str, budget: int) -> tuple[list[tuple[str, str]], int]:
    """Header (or trailer) lines up to the empty line: (lowercased name, value) and the budget left."""
    fields: list[tuple[str, str]] = []
    while True:
        line = conn.line(what)
        budget -= len(line) + 2
        if budget < 0:
            raise _bad(f"its {what}s are over {MAX_HEAD_BYTES} bytes")
        if not line:
            return fields, budget
        if len(fields) == MAX_HEADERS:
            raise _bad(f"over {MAX_HEADERS} {what}s")
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep or not name or not _TOKEN.issuperset(name):
            raise _bad(f"a malformed {what} line {line[:80]!r}")
        fields.append((name.lower(), value.strip(" \t")))


def _status(line: bytes) -> tuple[str, int]:
    version, _, rest = line.decode("latin-1").partition(" ")
    code = rest[:3]
    if (
        version not in ("HTTP/1.1", "HTTP/1.0")
        or len(code) != 3
        or not _DIGITS.issuperset(code)
        or rest[3:4] not in ("", " ")
    ):
        raise _bad(f"the status line {line[:80]!r}")
    status = int(code)
    if not 100 <= status <= 599:
        raise _bad(f"the status {status}")
    return version, status


class Response:
    """An answer being read: ``status``, ``headers``, then its body whole, in pieces or in lines."""

    def __init__(self, conn: Connection, method: str) -> None:
        self._conn = conn
        budget = MAX_HEAD_BYTES
        for _ in range(MAX_INTERIM + 1):
            try:
                first = conn.file.readline(MAX_HEAD_LINE + 1)
            except ConnectionResetError:
                first = b""
            if not first and budget == MAX_HEAD_BYTES:
                raise _Gone()
            if len(first) > MAX_HEAD_LINE or not first.endswith(b"\n"):
                raise _bad(f"the status line {first[:80]!r}")
            budget -= len(first)
            version, self.status = _status(first.rstrip(b"\r\n"))
            self.headers, budget = _fields(conn, "header", budget)
            if self.status >= 200:
                break
            if self.status == 101:
                raise _bad("101 Switching Protocols, which the SDK never asks for")
        else:
            raise _bad(f"over {MAX_INTERIM} interim (1xx) answers")
        tokens = {t.strip().lower() for v in self._all("connection") for t in v.split(",")}
        self.will_close = "close" in tokens if version == "HTTP/1.1" else "keep-alive" not in tokens
        self._chunked = False
        self._left: int | None = None  # body bytes left by Content-Length (of a chunk when chunked); None: to the close
        self._done = False
        self._in_chunk = False  # a chunk's data was read: its CRLF comes before the next size line
        codings = [t.strip().lower() for v in self._all("transfer-encoding") for t in v.split(",") if t.strip()]
        lengths = {n.strip() for v in self._all("content-length") for n in v.split(",")}
        if method == "HEAD" or self.status in (204, 304):
            self._done = True
        elif codings:
            self._chunked = codings[-1] == "chunked"
            self._left = 0 if self._chunked else None
            self.will_close |= not self._chunked
        elif lengths:
            length = lengths.pop()
            if lengths or not length or not _DIGITS.issuperset(length) or len(length) > 19:
                raise _bad(f"the Content-Length {', '.join(self._all('content-length'))!r}")
            self._left = int(length)
            self._done = self._left == 0
        else:
            self.will_close = True

    def _all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), None if absent."""
        values = self._all(name.lower())
        return values[0] if values else None

    @property
    def complete(self) -> bool:
        """The whole body has been read."""
        return self._done

    def read1(self, size: int = READ_SIZE) -> bytes:
        """Up to ``size`` bytes of the body as they come; b"" at its end."""
        if self._done:
            return b""
        if self._chunked and self._left == 0 and not self._next_chunk():
            return b""
        want = size if self._left is None else min(size, self._left)
        try:
            data = self._conn.file.read1(want)
        except OSError as exc:
            raise ProtocolError(f"the connection to the daemon broke mid-answer ({exc})") from None
        if self._left is None:
            self._done = not data
            return data
        if not data:
            raise ProtocolError("the daemon's answer was cut short")
        self._left -= len(data)
        if not self._chunked and self._left == 0:
            self._done = True
        return data

    def _next_chunk(self) -> bool:
        """Reads the next chunk's size line (after the previous chunk's CRLF); False at the last chunk."""
        if self._in_chunk and self._conn.line("chunk end"):
            raise _bad("a chunk not ended by CRLF")
        self._in_chunk = True
        line = self._conn.line("chunk size")
        size = line.partition(b";")[0].strip(b" \t").decode("latin-1")
        if not size or not _HEX.issuperset(size) or len(size) > 15:
            raise _bad(f"the chunk size line {line[:80]!r}")
        self._left = int(size, 16)
        if self._left == 0:
            _fields(self._conn, "trailer", MAX_HEAD_BYTES)
            self._done = True
            return False
        return True

    def read(self) -> bytes:
        """The rest of the body."""
        parts = []
        while chunk := self.read1(1 << 20):
            parts.append(chunk)
        return b"".join(parts)

    def read_at_most(self, limit: int) -> bytes:
        """The rest of the body, cut at ``limit`` bytes (:attr:`complete` says whether that was all)."""
        parts, n = [], 0
        while n <= limit and (chunk := self.read1()):
            parts.append(chunk)
            n += len(chunk)
        return b"".join(parts)[:limit]

    def iter_bytes(self, size: int = 1 << 20) -> Iterator[bytes]:
        while chunk := self.read1(size):
            yield chunk

    def iter_lines(self) -> Iterator[bytes]:
        """The body's lines (each with its b"\\n"; the last may lack one), each at most MAX_LINE bytes."""
        pending = b""
        while chunk := self.read1():
            start = 0
            while (end := chunk.find(b"\n", start)) >= 0:
                line, pending = pending + chunk[start : end + 1], b""
                if len(line) > MAX_LINE:
                    raise ProtocolError(f"the daemon sent a stream line over {MAX_LINE} bytes")
                yield line
                start = end + 1
            pending += chunk[start:]
            if len(pending) > MAX_LINE:
                raise ProtocolError(f"the daemon sent a stream line over {MAX_LINE} bytes")
        if pending:
            yield pending


def _head(method: str, target: str, headers: dict[str, str]) -> bytes:
    """The request line and headers; a target or header that could split the request is refused."""
    if not target.startswith("/") or any(c <= " " or c == "\x7f" for c in target) or not target.isascii():
        raise ValueError(f"the request target {target!r} has spaces or control characters (EMBER_URL's path?)")
    lines = [f"{method} {target} HTTP/1.1"]
    for name, value in headers.items():
        if not name or not _TOKEN.issuperset(name) or any((c < " " and c != "\t") or c == "\x7f" for c in value):
            raise ValueError(f"the header {name!r} has a control character (EMBER_API_KEY?)")
        lines.append(f"{name}: {value}")
    try:
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError("a header is not Latin-1 text (EMBER_API_KEY?)") from None


class Transport:
    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._idle: list[Connection] = []
        self._lock = allocate_lock()

    def new_socket(self) -> socket.socket:
        """A connection of its own, outside the pool (a WebSocket's); ConnectError says how to reach the daemon."""
        try:
            return self._socket()
        except OSError as exc:
            raise ConnectError(connect_hint(self.endpoint.where, exc)) from None

    def _connect(self) -> Connection:
        return Connection(self._socket())

    def _socket(self) -> socket.socket:
        ep = self.endpoint
        if ep.socket:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(CONNECT_TIMEOUT_S)
                sock.connect(ep.socket)
            except BaseException:
                sock.close()
                raise
        else:
            host = ep.host.strip("[]")
            sock = socket.create_connection((host, ep.port), timeout=CONNECT_TIMEOUT_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if ep.scheme == "https":
                import ssl  # only for an https URL (tens of ms to import)

                try:
                    sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
                except BaseException:
                    sock.close()
                    raise
        sock.settimeout(None)  # answers (an exec, a build) may take as long as they take
        return sock

    def _connection(self) -> Connection:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._connect()
            if conn.alive():
                return conn
            conn.close()

    def _release(self, conn: Connection, resp: Response) -> None:
        if resp.complete and not resp.will_close:
            with self._lock:
                if len(self._idle) < POOL_MAX:
                    self._idle.append(conn)
                    return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _send(self, conn: Connection, head: bytes, body: Body | None) -> None:
        sock = conn.sock
        if body is None or isinstance(body, bytes):
            if body and len(body) > READ_SIZE:
                sock.sendall(head)
                sock.sendall(body)
            else:
                sock.sendall(head + (body or b""))
            return
        if not isinstance(body, Iterable):
            raise TypeError("the sync client sends a body of bytes or an iterable of bytes")
        sock.sendall(head)
        for chunk in body:
            if chunk:
                sock.sendall(b"".join((b"%x\r\n" % len(chunk), chunk, b"\r\n")))
        sock.sendall(b"0\r\n\r\n")

    @contextmanager
    def open(self, req: Request) -> Iterator[Response]:
        """Send ``req``; yields its answer once the status is known, raising the typed error of an error."""
        body, headers = req.encoded()
        ep = self.endpoint
        headers = {"Host": "ember" if ep.socket else f"{ep.host}:{ep.port}", **ep.headers, **headers}
        if isinstance(body, bytes):
            headers["Content-Length"] = str(len(body))
        elif body is None:
            if req.method in ("POST", "PUT", "PATCH"):
                headers["Content-Length"] = "0"
        else:
            headers["Transfer-Encoding"] = "chunked"
        head = _head(req.method, ep.prefix + req.target, headers)
        conn, resp = self._exchange(req.method, head, body)
        if resp.status >= 400:
            try:
                data = resp.read_at_most(MAX_ERROR_BODY)
            except BaseException:
                conn.close()
                raise
            self._release(conn, resp)
            check(resp.status, data, resp.header("Retry-After"))
        try:
            yield resp
            resp.read()  # the rest, so the connection can serve the next request
        except BaseException:
            conn.close()
            raise
        self._release(conn, resp)

    def _exchange(self, method: str, head: bytes, body: Body | None) -> tuple[Connection, Response]:
        """Send the request; its connection and its answer's head. A request that may be sent twice
        (no body streamed) is, once, when a kept-alive connection turns out closed by the daemon."""
        where = self.endpoint.where
        retry = body is None or isinstance(body, bytes)
        while True:
            try:
                conn = self._connection()
            except OSError as exc:
                raise ConnectError(connect_hint(where, exc)) from None
            retry = retry and conn.used
            conn.used = True
            try:
                try:
                    self._send(conn, head, body)
                except (BrokenPipeError, ConnectionResetError):
                    if retry:
                        conn.close()  # the daemon closed an idle connection: once more on a new one
                        retry = False
                        continue
                    # the daemon stopped reading the upload early: its answer says why
                return conn, Response(conn, method)
            except _Gone:
                conn.close()
                if retry:
                    retry = False
                    continue
                raise ConnectError(connect_hint(where, OSError("the daemon closed the connection"))) from None
            except BaseException as exc:
                conn.close()
                if isinstance(exc, OSError):
                    raise ConnectError(connect_hint(where, exc)) from None
                raise

    def call(self, req: Request) -> bytes:
        """``req``'s whole answer body."""
        with self.open(req) as resp:
            return resp.read()
