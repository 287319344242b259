"""The sync client's HTTP/1.1 over the stdlib's http.client: a Unix socket or TCP, kept alive.

No httpx here: the CLI starts in a few tens of milliseconds. A connection goes back to the pool
only once its answer was read to the end; a streamed body goes out chunked as it is produced.
"""

from __future__ import annotations

import http.client
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ember.sdk.core import CONNECT_TIMEOUT_S, MAX_LINE, Endpoint, Request, check, connect_hint
from ember.sdk.errors import ConnectError, ProtocolError

POOL_MAX = 4  # idle connections kept


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("ember", timeout=CONNECT_TIMEOUT_S)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(CONNECT_TIMEOUT_S)
            sock.connect(self.path)
            sock.settimeout(None)  # answers (an exec, a build) may take as long as they take
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class Response:
    """An answer being read: ``status``, ``headers``, then its body whole, in pieces or in lines."""

    def __init__(self, raw: http.client.HTTPResponse) -> None:
        self.raw = raw
        self.status = raw.status

    def header(self, name: str) -> str | None:
        return self.raw.getheader(name)

    def read(self) -> bytes:
        return self.raw.read()

    def iter_bytes(self, size: int = 1 << 20) -> Iterator[bytes]:
        while chunk := self.raw.read1(size):
            yield chunk

    def iter_lines(self) -> Iterator[bytes]:
        while line := self.raw.readline(MAX_LINE + 1):
            if len(line) > MAX_LINE:
                raise ProtocolError(f"the daemon sent a stream line over {MAX_LINE} bytes")
            yield line


class Transport:
    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def _connection(self) -> http.client.HTTPConnection:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        ep = self.endpoint
        if ep.socket:
            return UnixConnection(ep.socket)
        if ep.scheme == "https":
            return http.client.HTTPSConnection(ep.host.strip("[]"), ep.port, timeout=CONNECT_TIMEOUT_S)
        return http.client.HTTPConnection(ep.host.strip("[]"), ep.port, timeout=CONNECT_TIMEOUT_S)

    def _release(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> None:
        if resp.isclosed() and not resp.will_close:
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

    @contextmanager
    def open(self, req: Request) -> Iterator[Response]:
        """Send ``req``; yields its answer once the status is known, raising the typed error of an error."""
        body, headers = req.encoded()
        headers = {**self.endpoint.headers, **headers}
        if isinstance(body, bytes):
            headers.setdefault("Content-Length", str(len(body)))
        elif body is None and req.method in ("POST", "PUT", "PATCH"):
            headers.setdefault("Content-Length", "0")
        target = self.endpoint.prefix + req.target
        for attempt in (1, 2):
            conn = self._connection()
            reused = conn.sock is not None
            try:
                try:
                    conn.request(req.method, target, body=body, headers=headers)  # type: ignore[arg-type]
                except (BrokenPipeError, ConnectionResetError):
                    if reused and attempt == 1 and isinstance(body, bytes | None):
                        conn.close()  # the daemon closed an idle connection: once more on a new one
                        continue
                    # the daemon stopped reading the upload early: its answer says why
                raw = conn.getresponse()
            except http.client.RemoteDisconnected:
                conn.close()
                if reused and attempt == 1 and isinstance(body, bytes | None):
                    continue
                gone = OSError("the daemon closed the connection")
                raise ConnectError(connect_hint(self.endpoint.where, gone)) from None
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                if isinstance(exc, http.client.HTTPException):
                    raise ProtocolError(f"the daemon's answer is not valid HTTP ({exc!r})") from None
                raise ConnectError(connect_hint(self.endpoint.where, exc)) from None
            break
        if raw.status >= 400:
            try:
                body = raw.read()
            except BaseException:
                conn.close()
                raise
            self._release(conn, raw)
            check(raw.status, body, raw.getheader("Retry-After"))
        try:
            yield Response(raw)
            raw.read()  # the rest, so the connection can serve the next request
        except BaseException:
            conn.close()
            raise
        self._release(conn, raw)

    def call(self, req: Request) -> Any:
        """``req``'s whole answer body (bytes)."""
        with self.open(req) as resp:
            return resp.read()
