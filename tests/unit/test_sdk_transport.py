"""The sync client's stdlib HTTP against a real HTTP/1.1 server on a Unix socket (no daemon):
keep-alive, chunked uploads, NDJSON streams read line by line, typed errors; and the SDK's imports."""

from __future__ import annotations

import json
import socketserver
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from ember.config import Settings
from ember.sdk import Client, ConnectError, InvalidState, NotFound, RateLimited
from ember.sdk.context import context_tar
from ember.sdk.errors import ContextError


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
    thread = threading.Thread(target=server.serve_forever, daemon=True)
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
