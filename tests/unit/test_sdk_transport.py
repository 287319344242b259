"""The sync client's HTTP/1.1 (ember.sdk.transport) against a real HTTP/1.1 server on a Unix socket (no
daemon): keep-alive, chunked uploads, NDJSON streams read line by line, typed errors; against a raw
server sending malformed, oversized or cut-short answers; and the SDK's imports."""

from __future__ import annotations

import json
import socketserver
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ember.config import Settings
from ember.sdk import ApiError, Client, ConnectError, InvalidState, NotFound, ProtocolError, RateLimited, Request
from ember.sdk.context import context_tar
from ember.sdk.core import MAX_LINE
from ember.sdk.errors import ContextError
from tests.unit.test_oci import make_ca


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, str, str, bytes]] = []  # noqa: RUF012 (one server per test)
    ports: set[int] = set()  # noqa: RUF012

    def log_message(self, *_: object) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding") == "chunked":
            data = b""
            while size := int(self.rfile.readline().strip(), 16):
                data += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return data
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def handle_one(self) -> None:
        body = self._body()
        Handler.seen.append((self.command, self.path, self.headers.get("Transfer-Encoding", ""), body))
        Handler.ports.add(id(self.connection))
        if self.path.startswith("/v1/vms/vm-1/exec"):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            lines = [
                b'{"stream": "stdout", "data": "aGk="}\n',
                b'{"error": "InvalidStateTransition", "message": "x"}\n',
            ]
            for line in lines:  # one line split over two chunks
                for part in (line[:5], line[5:]):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/v1/vms":
            self._answer(200, json.dumps([{"id": "vm-1", "image": "i", "state": "RUNNING",
                                           "accelerator": {"name": "tcg"}}]).encode())  # fmt: skip
        elif self.path.startswith("/v1/vms/vm-1/files"):
            self._answer(200, json.dumps({"path": "/x", "bytes": len(body)}).encode())
        elif self.path == "/v1/whoami":
            self._answer(429, b'{"error": "RateLimited", "message": "slow down"}', {"Retry-After": "2"})
        else:
            self._answer(404, b'{"error": "VmNotFound", "message": "no VM with id"}')

    do_GET = do_POST = do_PUT = do_DELETE = handle_one


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Client]:
    sock = tmp_path / "s.sock"
    server = socketserver.ThreadingUnixStreamServer(str(sock), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    Handler.seen.clear()
    Handler.ports.clear()
    with Client(settings=Settings(data_dir=tmp_path, socket_path=sock)) as c:
        yield c
    server.shutdown()
    server.server_close()


def test_keep_alive_chunked_upload_and_typed_errors(client: Client) -> None:
    assert [v.id for v in client.vms.list()] == ["vm-1"]
    assert client.files.write("vm-1", "/x", iter([b"a" * 70000, b"b"])) == 70001
    assert client.files.write("vm-1", "/x", b"abc") == 3
    with pytest.raises(NotFound) as missing:
        client.vms.get("vm-2")
    assert (missing.value.status, missing.value.kind) == (404, "VmNotFound")
    with pytest.raises(RateLimited) as limited:
        client.whoami()
    assert limited.value.retry_after == 2.0
    methods = [(m, te, len(b)) for m, _, te, b in Handler.seen]
    assert methods == [("GET", "", 0), ("PUT", "chunked", 70001), ("PUT", "", 3), ("GET", "", 0), ("GET", "", 0)]
    assert len(Handler.ports) == 1  # one connection, kept alive across answers and errors


def test_an_error_line_in_a_stream_raises_its_kind_after_the_output(client: Client) -> None:
    got = []
    with pytest.raises(InvalidState) as info:
        for event in client.vms.exec_events("vm-1", ["true"]):
            got.append(event)
    assert info.value.status == 409 and [e.data for e in got] == [b"hi"]  # type: ignore[union-attr]
    assert [v.id for v in client.vms.list()] == ["vm-1"]  # the connection still serves


def test_a_daemon_that_is_not_there_says_how_to_start_it(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, socket_path=tmp_path / "none.sock")
    with Client(settings=settings) as c, pytest.raises(ConnectError, match="ember serve"):
        c.vms.list()


def test_the_build_context_leaves_out_what_dockerignore_excludes(tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    (ctx / "src").mkdir(parents=True)
    (ctx / "secrets").mkdir()
    (ctx / "Dockerfile").write_text("FROM scratch\n")
    (ctx / ".dockerignore").write_text("secrets\n*.log\n!keep.log\nDockerfile\n")
    (ctx / "src" / "app.py").write_bytes(b"x" * 3_000_000)
    (ctx / "secrets" / "key").write_text("k")
    (ctx / "a.log").write_text("l")
    (ctx / "keep.log").write_text("l")
    (ctx / "link").symlink_to("/etc")
    out = tmp_path / "ctx.tar"
    out.write_bytes(b"".join(context_tar(ctx)))
    with tarfile.open(out) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert sorted(members) == [".dockerignore", "Dockerfile", "keep.log", "link", "src", "src/app.py"]
        assert members["link"].issym() and members["link"].linkname == "/etc"
        assert tar.extractfile("src/app.py").read() == b"x" * 3_000_000  # type: ignore[union-attr]
    (ctx / ".dockerignore").write_text("[\n")
    with pytest.raises(ContextError, match="dockerignore"):
        context_tar(ctx)
    with pytest.raises(ContextError, match="not a directory"):
        context_tar(ctx / "Dockerfile")


SERVER_ONLY = ("ember.api", "ember.build", "ember.engine", "ember.vmm", "ember.host", "ember.daemon", "ember.db",
               "ember.tenancy", "ember.images", "ember.agent", "ember.microvm", "ember.pool", "ember.runtime",
               "ember.snapshot", "ember.errors", "ember.models")  # fmt: skip


def test_the_sdk_and_the_cli_import_no_server_module_nor_httpx_or_click() -> None:
    code = (
        "import sys, ember.sdk, ember.cli, ember.sdk.context\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith(('ember', 'httpx', 'click', 'fastapi')))))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    assert not [m for m in loaded if m.startswith(SERVER_ONLY) or m.startswith(("httpx", "click", "fastapi"))]
    assert "ember.sdk.client" in loaded and "ember.dockerignore" in loaded
    code = "import sys, ember.sdk; ember.sdk.AsyncClient; print('ember.sdk.aio' in sys.modules, 'httpx' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout == (
        "True True\n"
    )


# ---- the HTTP/1.1 client against answers a buggy or foreign server might send ----------------


class Scripted(socketserver.StreamRequestHandler):
    """Reads each request (head and Content-Length or chunked body) and writes the next scripted
    answer, then closes the connection if the answer says so (HTTP/1.0, Connection: close). An answer
    b"" reads the request and closes the connection without answering; None closes it at once (an
    idle connection, after the previous answer). Records each connection's requests."""

    answers: list[bytes | None] = []  # noqa: RUF012 (one server per test)
    requests: list[tuple[int, bytes]] = []  # noqa: RUF012 (connection number, request head)
    connections = 0

    def handle(self) -> None:
        Scripted.connections += 1
        number = Scripted.connections
        while True:
            if Scripted.answers and Scripted.answers[0] is None:
                Scripted.answers.pop(0)
                return
            head = b""
            while (line := self.rfile.readline()) not in (b"\r\n", b""):
                head += line
            if not head:
                return
            Scripted.requests.append((number, head))
            if b"transfer-encoding: chunked" in head.lower():
                while size := int(self.rfile.readline().strip(), 16):
                    self.rfile.read(size + 2)
                self.rfile.readline()
            else:
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        self.rfile.read(int(line.split(b":")[1]))
            answer = Scripted.answers.pop(0) if Scripted.answers else b""
            if not answer:
                return
            try:
                self.wfile.write(answer)
                self.wfile.flush()
            except BrokenPipeError:
                return  # the client stopped reading (an answer over a bound)
            if answer.startswith(b"HTTP/1.0") or b"Connection: close" in answer:
                return


@pytest.fixture
def scripted(tmp_path: Path) -> Iterator[tuple[Client, list[bytes | None]]]:
    sock = tmp_path / "raw.sock"
    server = socketserver.ThreadingUnixStreamServer(str(sock), Scripted)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    Scripted.answers, Scripted.requests, Scripted.connections = [], [], 0
    with Client(settings=Settings(data_dir=tmp_path, socket_path=sock)) as c:
        yield c, Scripted.answers
    server.shutdown()
    server.server_close()


OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
WHOAMI = b'{"tenant": "t", "admin": false, "key_id": ""}'


def ok(body: bytes = WHOAMI, extra: bytes = b"") -> bytes:
    return OK_HEAD + b"Content-Length: %d\r\n" % len(body) + extra + b"\r\n" + body


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"garbage\r\n\r\n", "status line"),
        (b"HTTP/2.0 200 OK\r\n\r\n", "status line"),
        (b"HTTP/1.1 99999 OK\r\n\r\n", "status line"),
        (b"HTTP/1.1 700 Odd\r\n\r\n", "status 700"),
        (b"HTTP/1.1 2\xb200 OK\r\n\r\n", "status line"),  # a Latin-1 digit int() refuses
        (b"HTTP/1.1 200 OK" + b"x" * 70_000, "status line"),
        (OK_HEAD + b"X-Long: " + b"a" * 70_000 + b"\r\n\r\n", "header line over 65536 bytes"),
        (OK_HEAD + b"".join(b"X-%d: 1\r\n" % i for i in range(101)) + b"\r\n", "over 100 headers"),
        (OK_HEAD + b"".join(b"X-%d: %s\r\n" % (i, b"a" * 5000) for i in range(60)) + b"\r\n", "over 262144 bytes"),
        (OK_HEAD + b"Bad Name: x\r\n\r\n", "malformed header"),
        (OK_HEAD + b"X-A: 1\r\n folded\r\n\r\n", "malformed header"),
        (OK_HEAD + b"Content-Length: -1\r\n\r\n", "Content-Length"),
        (OK_HEAD + b"Content-Length: 1\xb2\r\n\r\n", "Content-Length"),
        (OK_HEAD + b"Content-Length: 2, 3\r\n\r\n{}", "Content-Length"),
        (OK_HEAD + b"Content-Length: 99999999999999999999999\r\n\r\n", "Content-Length"),
        (OK_HEAD + b"Content-Length: 100\r\n\r\n{}", "cut short"),
        (OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
        (OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + b"f" * 20 + b"\r\n", "chunk size"),
        (OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}XX0\r\n\r\n", "not ended by CRLF"),
        (OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n9\r\n{}", "cut short"),
        (OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n" + b"X: 1\r\n" * 101 + b"\r\n", "trailer"),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n", "101"),
        (b"HTTP/1.1 100 Continue\r\n\r\n" * 11 + ok(), "interim"),
        (OK_HEAD + b"Content-Length: 0", "cut short"),
    ],
)
def test_a_malformed_answer_is_a_protocol_error_never_a_hang(
    scripted: tuple[Client, list[bytes | None]], answer: bytes, error: str
) -> None:
    client, answers = scripted
    answers += [answer, None]  # and the connection closes
    with pytest.raises(ProtocolError, match=error):
        client.whoami()


def test_framings_interim_answers_and_connection_reuse(scripted: tuple[Client, list[bytes | None]]) -> None:
    client, answers = scripted
    chunked = OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5;ext=1\r\n" + WHOAMI[:5] + b"\r\n"
    chunked += b"%x\r\n" % (len(WHOAMI) - 5) + WHOAMI[5:] + b"\r\n0\r\nX-Trailer: 1\r\n\r\n"
    answers += [
        b"HTTP/1.1 100 Continue\r\n\r\n" + ok(),  # interim answers are skipped
        chunked,  # chunks with an extension and a trailer, same connection
        ok(extra=b"Connection: close\r\n"),  # the daemon closes after it: the next request opens another
        b"HTTP/1.0 200 OK\r\n\r\n" + WHOAMI,  # HTTP/1.0, body up to the close
        ok(),  # reused no more (the HTTP/1.0 answer ended with the close)
    ]
    for _ in range(5):
        assert client.whoami().tenant == "t"
    assert [n for n, _ in Scripted.requests] == [1, 1, 1, 2, 3]
    head = Scripted.requests[0][1]
    assert head.startswith(b"GET /v1/whoami HTTP/1.1\r\nHost: ember\r\n")


def test_a_kept_alive_connection_the_daemon_closed_is_replaced(scripted: tuple[Client, list[bytes | None]]) -> None:
    client, answers = scripted
    answers += [ok(), None, ok()]  # after its first answer the daemon closes the idle connection
    assert client.whoami().tenant == "t"
    time.sleep(0.1)
    assert client.whoami().tenant == "t"
    answers += [b"", ok()]  # the daemon reads the next request, then closes without an answer
    assert client.whoami().tenant == "t"  # sent once more, on a new connection
    assert [n for n, _ in Scripted.requests] == [1, 2, 2, 3]


def test_a_connection_closed_before_any_answer_is_a_connect_error(scripted: tuple[Client, list[bytes | None]]) -> None:
    client, answers = scripted
    answers.append(b"")
    with pytest.raises(ConnectError, match="closed the connection"):
        client.whoami()


def test_stream_lines_and_error_bodies_are_bounded(scripted: tuple[Client, list[bytes | None]]) -> None:
    client, answers = scripted
    huge = b"a" * (MAX_LINE + 1)
    answers.append(OK_HEAD + b"Content-Length: %d\r\n\r\n" % len(huge) + huge)
    with pytest.raises(ProtocolError, match="stream line over"):
        list(client.stream(Request("GET", "/v1/x")))
    error = b'{"error": "VmNotFound", "message": "' + b"m" * (2 << 20) + b'"}'
    answers += [b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n" % len(error) + error, ok()]
    with pytest.raises(ApiError) as info:  # cut at 1 MiB: not JSON any more, still the status's class
        client.vms.get("vm-1")
    assert isinstance(info.value, NotFound) and len(str(info.value)) <= 2000
    assert client.whoami().tenant == "t"
    assert Scripted.connections == 3  # the cut answer's connection was not reused


def test_a_header_or_target_that_could_split_the_request_is_refused_before_sending(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, socket_path=tmp_path / "none.sock")
    with Client(api_key="k\r\nX-Evil: 1", settings=settings) as c, pytest.raises(ValueError, match="control"):
        c.whoami()  # refused before connecting (no daemon is there)
    with Client(settings=settings) as c, pytest.raises(ValueError, match="target"):
        c.send(Request("GET", "/v1/vms x"))


def test_ember_ps_starts_without_the_modules_that_made_it_slow(tmp_path: Path) -> None:
    """'ember ps' (issue 10: under 60 ms) loads no http.client (email, ssl), typing, shutil, threading or
    base64, and of the result types only the VM's (each resource's cost ~0.5 ms a dataclass)."""
    check = (
        "import atexit, sys\n"
        "atexit.register(lambda: print(' '.join(sorted(sys.modules)), file=sys.stderr))\n"
        "from ember import cli\n"
        "cli.main(['ps'])\n"
    )
    env = {"EMBER_SOCKET": str(tmp_path / "none.sock"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env)
    assert done.returncode == 1 and "cannot reach the Ember daemon" in done.stderr  # no daemon: as far as ps goes
    loaded = set(done.stderr.split("\n")[-2].split())
    assert "ember.sdk.transport" in loaded and "argparse" in loaded
    costly = {"http.client", "email", "ssl", "typing", "shutil", "threading", "base64", "httpx", "h11"}
    assert not loaded & costly
    assert {m for m in loaded if m.startswith("ember.sdk.results.")} == {"ember.sdk.results.vms"}


class WhoamiHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[tuple[str | None, str | None]] = []  # noqa: RUF012 (one server per test)

    def log_message(self, *_: object) -> None:
        pass

    def do_GET(self) -> None:
        WhoamiHandler.seen.append((self.headers.get("Host"), self.headers.get("Authorization")))
        body = WHOAMI
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_https_verifies_the_daemons_certificate_and_keeps_the_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca_file, tls = make_ca(tmp_path)
    server = ThreadingHTTPServer(("127.0.0.1", 0), WhoamiHandler)
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    url, settings = f"https://localhost:{server.server_address[1]}", Settings(data_dir=tmp_path)
    WhoamiHandler.seen = []
    try:
        with Client(url, api_key="k", settings=settings) as c, pytest.raises(ConnectError, match="CERTIFICATE_VERIFY"):
            c.whoami()  # the system's CAs do not vouch for it
        monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
        with Client(url, api_key="k", settings=settings) as c:
            assert c.whoami().tenant == "t" and c.whoami().tenant == "t"
            assert len(c._http._idle) == 1  # one TLS connection, kept alive
        assert WhoamiHandler.seen == [(f"localhost:{server.server_address[1]}", "Bearer k")] * 2
    finally:
        server.shutdown()
        server.server_close()
