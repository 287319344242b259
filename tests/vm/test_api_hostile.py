"""Hostile API requests through a real daemon: body caps before buffering, the TCP listener's
token/Host/Origin checks, path-free errors, reserved image names, root-only daemon files."""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ember.config import Settings
from ember.sdk import ApiError, Client, Request
from tests.conftest import TEST_UID_BLOCK, DaemonProcess, build, remove_quietly
from tests.databases import daemon_database_url, drop_database


def raw_request(sock_path: Path, head: str, timeout: float = 5.0) -> tuple[bytes, float]:
    """Send only a request's head on the Unix socket; (the answer, seconds until it came)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(sock_path))
        started = time.monotonic()
        s.sendall(head.encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer, time.monotonic() - started


def test_oversized_request_body_rejected_before_buffering(daemon: DaemonProcess) -> None:
    # 128 MiB announced, not a byte sent: the answer must come without waiting for (or reading) the body
    for path in ("/v1/vms/vm-x/exec", "/v1/vms/vm-x/snapshot", "/v1/images/build?name=big"):
        head = (
            f"POST {path} HTTP/1.1\r\nHost: ember\r\nContent-Type: application/json\r\n"
            f"Content-Length: {128 * 1024 * 1024 + (3 << 30 if 'build' in path else 0)}\r\n\r\n"
        )
        answer, seconds = raw_request(daemon.settings.socket_path, head)
        assert answer.startswith(b"HTTP/1.1 413"), (path, answer[:200])
        assert seconds < 3, path
    # a chunked body (no Content-Length) is cut off at the JSON cap while it streams
    with Client(settings=daemon.settings) as c, pytest.raises(ApiError) as info:
        c.send(Request("POST", "/v1/vms/vm-x/snapshot", body=iter([b"x" * 65536] * 64)))
    assert info.value.status == 413 and "EMBER_MAX_JSON_BODY_BYTES" in str(info.value)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def tcp_daemon(settings: Settings, tmp_path: Path) -> Iterator[DaemonProcess]:
    """A second daemon with a TCP listener: its own data dir and database, and the run's second uid block."""
    data = tmp_path / "tcp-daemon"
    own = dataclasses.replace(
        settings, data_dir=data, socket_path=data / "ember.sock", listen=f"127.0.0.1:{free_port()}",
        uid_base=settings.uid_base + TEST_UID_BLOCK, pool_size=0, database_url=daemon_database_url("tcp"),
    )  # fmt: skip
    d = DaemonProcess(own, tmp_path / "tcp-daemon.log")
    d.start()
    yield d
    d.stop()
    if own.database_url:
        drop_database(own.database_url)


def test_tcp_listener_requires_token_and_rejects_foreign_host_origin_and_text_plain_build(
    tcp_daemon: DaemonProcess,
) -> None:
    s = tcp_daemon.settings
    token_file = s.api_token_path
    st = token_file.lstat()
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    token = token_file.read_text().strip()
    url = f"http://{s.listen}"
    ok = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, timeout=10) as c:
        assert c.get("/v1/vms").status_code == 401
        assert (
            c.get("/v1/vms", headers={"Authorization": "Bearer wrong-token-of-the-right-length-0123456789"}).status_code
            == 401
        )
        assert c.get("/v1/vms", headers=ok).status_code == 200
        r = c.get("/v1/vms", headers={**ok, "Host": f"evil.example:{s.listen.rpartition(':')[2]}"})
        assert r.status_code == 403 and r.json()["error"] == "Forbidden"
        assert c.get("/v1/vms", headers={**ok, "Host": "evil.example"}).status_code == 403
        assert c.get("/v1/vms", headers={**ok, "Origin": "http://evil.example"}).status_code == 403
        # what a web page can send without asking first: a text/plain POST (CSRF)
        r = c.post("/v1/images/build", params={"name": "csrf"}, content=b"x" * 1024,
                   headers={**ok, "Content-Type": "text/plain"})  # fmt: skip
        assert r.status_code == 415 and "application/x-tar" in r.json()["message"]
        assert c.get("/v1/images/csrf", headers=ok).status_code == 404
    assert not list(s.data_dir.glob("build-*"))
    # the SDK reads the token file itself; the Unix socket (owner-only) needs no token
    with Client(url, settings=s) as c:
        assert c.send(Request("GET", "/v1/vms")) == []
    with Client(settings=s) as c:
        assert c.send(Request("GET", "/v1/vms")) == []
    # umask 077: nothing the daemon wrote is readable by other users unless opened up on purpose
    for path in s.data_dir.rglob("*"):
        mode = stat.S_IMODE(path.lstat().st_mode)
        opened_up = path.parent.parent == s.guest_dir or path.parent == s.data_dir / "bin"  # initramfs, jailer
        if path.is_file() and not path.is_symlink() and not opened_up:
            assert mode & 0o077 == 0, f"{path} is {oct(mode)}"


def test_errors_name_no_host_path_but_an_id(client: Client, settings: Settings, base_image: str) -> None:
    vm_id = client.vms.run(base_image).id
    try:
        client.send(Request("POST", f"/v1/vms/{vm_id}/suspend"))
        manifest = settings.vms_dir / vm_id / "suspend" / "manifest.json"
        manifest.write_text("{not json")
        with pytest.raises(ApiError) as info:
            client.send(Request("POST", f"/v1/vms/{vm_id}/resume"))
        message = str(info.value)
        assert info.value.kind == "SnapshotError" and "corrupt" in message
        assert str(settings.data_dir) not in message and "/" not in message.replace("'", "")
        error_id = re.search(r"under id ([0-9a-f]{8})", message)
        assert error_id is not None
        daemon_log = settings.data_dir.parent / f"{settings.data_dir.name}-daemon.log"
        logged = [line for line in daemon_log.read_text().splitlines() if error_id[1] in line]
        assert logged and str(manifest) in logged[0]
    finally:
        remove_quietly(client, vm_id)


def test_a_fork_cannot_take_a_built_in_base_name(client: Client, settings: Settings, base_image: str) -> None:
    vm_id = client.vms.run(base_image).id
    try:
        for name in ("python", "debian"):
            with pytest.raises(ApiError) as info:
                client.send(Request("POST", f"/v1/vms/{vm_id}/snapshot", json={"name": name}))
            assert info.value.status == 409, name
        assert not (settings.images_dir / "python").exists()
        assert "python" not in [i["name"] for i in client.send(Request("GET", "/v1/images"))]
    finally:
        remove_quietly(client, vm_id)
    assert os.path.isdir(settings.images_dir / "debian")


def test_build_log_and_layer_configs_are_root_only(client: Client, settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text(
        'FROM debian:bookworm-slim\nENV API_KEY=secret\nRUN true\nCMD ["sleep", "inf"]\n'
    )
    result, _ = build(client, tmp_path, "umask-check", ready_cmd="true")
    try:
        assert result["state"] == "CREATED", result
        written = [settings.data_dir / "builds" / f"{result['name']}.log", *settings.data_dir.glob("layers/*.json")]
        assert len(written) > 1
        for path in written:  # ENV and LABEL values, RUN output: the tenant's, nobody else's
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    finally:
        if result.get("name"):
            client.send(Request("DELETE", f"/v1/images/{result['name']}"))
