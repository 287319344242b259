"""The ingress end to end: a real daemon, real VMs running a small app (tests/data/ingress_app.py), and
HTTP clients on the host. Routing (Host and path forms), streamed bodies, keep-alive, WebSocket, tokens
and keys, and hostile clients and guests."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ember.config import Settings
from ember.ingress.tokens import Ports, TokenKind, TokenSigner
from ember.sdk import Client, Vm
from ember.tenancy.secrets import load_key
from tests.conftest import remove_quietly

APP = Path(__file__).resolve().parent.parent / "data" / "ingress_app.py"
PATTERN = bytes(range(256)) * 256
MiB = 1 << 20


def start_app(vm: Vm) -> None:
    vm.files.write("/srv/app.py", APP.read_bytes(), mkdirs=True)
    vm.exec(["sh", "-c", "python3 /srv/app.py 8080 8081 >/tmp/app.log 2>&1 &"])
    for _ in range(200):
        if vm.exec(["test", "-e", "/tmp/ingress-app.ready"]).exit_code == 0:
            return
        time.sleep(0.05)
    pytest.fail("the app did not start: " + vm.exec(["cat", "/tmp/app.log"]).stdout.decode())


@pytest.fixture(scope="module")
def app_vm(client: Client, base_image: str) -> Iterator[Vm]:
    vm = client.vms.run(base_image)
    start_app(vm)
    yield vm
    remove_quietly(client, vm.id)


@pytest.fixture(scope="module")
def ingress(settings: Settings, daemon: Any) -> tuple[str, int]:
    host, _, port = daemon.settings.ingress_listen.rpartition(":")
    return host, int(port)


def connect(ingress: tuple[str, int]) -> http.client.HTTPConnection:
    return http.client.HTTPConnection(*ingress, timeout=30)


def get(
    ingress: tuple[str, int], path: str, headers: dict[str, str], vm_id: str | None = None, method: str = "GET"
) -> tuple[int, bytes]:
    """One request; ``vm_id``: the Host form (else the path is the path form)."""
    conn = connect(ingress)
    try:
        if vm_id is not None:
            headers = {"Host": f"{vm_id}.localhost:{ingress[1]}", **headers}
        conn.request(method, path, headers=headers)
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def raw(ingress: tuple[str, int], data: bytes) -> bytes:
    """Send ``data`` as it is; everything the ingress answers until it closes."""
    with socket.create_connection(ingress, timeout=30) as s:
        s.sendall(data)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        return got


def test_host_and_path_forms_keep_alive_and_no_token_reaches_the_guest(
    client: Client, app_vm: Vm, ingress: tuple[str, int]
) -> None:
    assert client.vms.get(app_vm.id).endpoint == f"http://{app_vm.id}.localhost:{ingress[1]}/"
    token = app_vm.auth_token(ports=8080, minutes=5)
    assert (token.allowed_ports, token.kind, token.vm_id) == ("8080", "proxy", app_vm.id)
    conn = connect(ingress)
    sent = {"X-Ember-Proxy-Auth": token.token, "X-Ember-Proxy-Port": "8080", "X-Ember-Tenant": "default",
            "X-Custom": "kept"}  # fmt: skip
    conn.request("GET", "/headers?a=1", headers={"Host": f"{app_vm.id}.localhost:{ingress[1]}", **sent})
    first = conn.getresponse()
    seen = json.loads(first.read())
    sock = conn.sock
    assert first.status == 200 and seen["path"] == "/headers?a=1" and seen["port"] == 8080
    # the second request on the same connection: the path form, routed and authorised on its own
    conn.request("GET", f"/vm/{app_vm.id}/headers", headers={"X-aws-proxy-auth": token.token})
    second = conn.getresponse()
    seen2 = json.loads(second.read())
    assert second.status == 200 and seen2["path"] == "/headers" and conn.sock is sock  # kept alive
    for view in (seen, seen2):
        names = {k for k, _ in view["headers"]}
        assert not {n for n in names if n.startswith(("x-ember", "x-aws"))}, names
        assert token.token not in json.dumps(view)
    assert ["x-custom", "kept"] in seen["headers"]
    # a third request on the same connection with no token: refused on its own
    conn.request("GET", f"/vm/{app_vm.id}/headers")
    third = conn.getresponse()
    assert third.status == 401 and json.loads(third.read())["error"] == "Unauthorized"
    conn.close()


def test_streamed_upload_and_download_bigger_than_a_frame(app_vm: Vm, ingress: tuple[str, int]) -> None:
    token = app_vm.auth_token(ports=8080).token
    body = os.urandom(5 * MiB)
    conn = connect(ingress)
    conn.request("POST", f"/vm/{app_vm.id}/upload", body=body, headers={"X-Ember-Proxy-Auth": token})
    answer = conn.getresponse()
    assert answer.status == 200 and json.loads(answer.read()) == {
        "size": len(body), "sha256": hashlib.sha256(body).hexdigest()}  # fmt: skip
    pieces = (body[i : i + 300_000] for i in range(0, len(body), 300_000))
    conn.request("POST", f"/vm/{app_vm.id}/upload", body=pieces, encode_chunked=True,
                 headers={"X-Ember-Proxy-Auth": token, "Transfer-Encoding": "chunked"})  # fmt: skip
    answer = conn.getresponse()
    assert answer.status == 200 and json.loads(answer.read())["sha256"] == hashlib.sha256(body).hexdigest()
    n = 5 * MiB + 7
    conn.request("GET", f"/vm/{app_vm.id}/download?n={n}", headers={"X-Ember-Proxy-Auth": token})
    answer = conn.getresponse()
    got = answer.read()
    assert answer.status == 200 and len(got) == n and got == (PATTERN * (n // len(PATTERN) + 1))[:n]
    conn.close()


def open_websocket(ingress: tuple[str, int], vm_id: str, token: str) -> socket.socket:
    """A WebSocket to the app's /ws echo through the ingress, past its 101."""
    key = base64.b64encode(os.urandom(16)).decode()
    s = socket.create_connection(ingress, timeout=30)
    s.sendall(
        f"GET /ws HTTP/1.1\r\nHost: {vm_id}.localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nX-Ember-Proxy-Auth: {token}\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
    assert head.startswith(b"HTTP/1.1 101 ") and b"sec-websocket-accept: " + accept in head, head
    return s


def echo(s: socket.socket, message: bytes) -> None:
    """One masked binary message, and its echo."""
    mask = os.urandom(4)
    length = bytes([0x80 | len(message)]) if len(message) < 126 else bytes([0x80 | 126]) + len(
        message).to_bytes(2, "big")  # fmt: skip
    s.sendall(bytes([0x82]) + length + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(message)))
    got = b""
    want = len(message) + (2 if len(message) < 126 else 4)
    while len(got) < want:
        got += s.recv(65536)
    assert got[-len(message) :] == message


def test_websocket_echo(app_vm: Vm, ingress: tuple[str, int]) -> None:
    with open_websocket(ingress, app_vm.id, app_vm.auth_token(ports=8080).token) as s:
        for message in (b"hello", os.urandom(1000)):
            echo(s, message)


def test_tokens_ports_expiry_other_vms_and_keys(
    client: Client, settings: Settings, app_vm: Vm, ingress: tuple[str, int], base_image: str
) -> None:
    only_8080 = app_vm.auth_token(ports=8080).token
    status, body = get(ingress, "/headers", {"X-Ember-Proxy-Auth": only_8080, "X-Ember-Proxy-Port": "8081"}, app_vm.id)
    assert status == 403 and b"port 8081" in body
    both = app_vm.auth_token(ports="8080-8081").token
    status, body = get(ingress, "/headers", {"X-Ember-Proxy-Auth": both, "X-aws-proxy-port": "8081"}, app_vm.id)
    assert status == 200 and json.loads(body)["port"] == 8081
    # expired: made with the daemon's key by a signer whose clock is an hour behind
    signer = TokenSigner(load_key(settings.ingress_key_path), clock=lambda: time.time() - 3600)
    expired, _ = signer.issue(vm_id=app_vm.id, tenant="default", kind=TokenKind.PROXY, ports=Ports(1, 65535),
                              minutes=5)  # fmt: skip
    status, body = get(ingress, "/headers", {"X-Ember-Proxy-Auth": expired}, app_vm.id)
    assert status == 401 and b"expired" in body
    forged = only_8080[:-4] + ("AAAA" if not only_8080.endswith("AAAA") else "BBBB")
    for headers in ({}, {"X-Ember-Proxy-Auth": forged}, {"X-Ember-Proxy-Auth": "x" * 5000},
                    {"Authorization": "Bearer nope"}):  # fmt: skip
        assert get(ingress, "/headers", headers, app_vm.id)[0] == 401, headers
    # another VM's token, on this VM; and that VM, suspended, refuses before it is reached
    other = client.vms.run(base_image)
    try:
        theirs = other.auth_token(ports=8080).token
        status, body = get(ingress, "/headers", {"X-Ember-Proxy-Auth": theirs}, app_vm.id)
        assert status == 401 and b"another VM" in body
        other.suspend()
        assert get(ingress, "/", {"X-Ember-Proxy-Auth": theirs, "X-Ember-Proxy-Port": "81"}, other.id)[0] == 403
        status, body = get(ingress, "/", {"X-Ember-Proxy-Auth": theirs}, other.id)
        assert status == 503 and "while it is SUSPENDED" in json.loads(body)["message"], body
    finally:
        remove_quietly(client, other.id)
    status, body = get(ingress, "/", {"X-Ember-Proxy-Auth": theirs}, other.id)
    assert status == 404  # removed: the token opens nothing
    # a key of the VM's tenant works, and the guest does not see it; another tenant's key sees no VM
    key = client.keys.create(tenant="default", name="ingress test").api_key
    status, body = get(ingress, "/headers", {"Authorization": f"Bearer {key}"}, app_vm.id)
    assert status == 200 and "authorization" not in {k for k, _ in json.loads(body)["headers"]}
    status, body = get(ingress, "/headers", {"Authorization": "Basic dXNlcjpwdw==", "X-Ember-Proxy-Auth": both},
                       app_vm.id)  # fmt: skip
    assert status == 200 and ["authorization", "Basic dXNlcjpwdw=="] in json.loads(body)["headers"]  # the app's own
    tenant = f"ingress-{os.urandom(3).hex()}"
    client.tenants.create(tenant)
    stranger = client.keys.create(tenant=tenant).api_key
    theirs_404 = get(ingress, "/", {"Authorization": f"Bearer {stranger}"}, app_vm.id)
    missing = "vm-" + "0" * len(app_vm.id[3:])
    unknown_404 = get(ingress, "/", {"Authorization": f"Bearer {stranger}"}, missing)
    assert theirs_404[0] == unknown_404[0] == 404
    assert theirs_404[1].replace(app_vm.id.encode(), b"ID") == unknown_404[1].replace(missing.encode(), b"ID")


def test_hostile_clients(app_vm: Vm, ingress: tuple[str, int]) -> None:
    token = app_vm.auth_token(ports=8080).token
    start = f"POST /vm/{app_vm.id}/upload HTTP/1.1\r\nHost: x\r\nX-Ember-Proxy-Auth: {token}\r\n"
    big = raw(ingress, f"GET / HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * 20000}\r\n\r\n".encode())
    assert big.startswith(b"HTTP/1.1 431 ")
    many = "".join(f"X-{i}: y\r\n" for i in range(150))
    assert raw(ingress, f"GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n".encode()).startswith(b"HTTP/1.1 431 ")
    for smuggle in ("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                    "Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
                    "Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
                    "X-Evil: a\x00b\r\nContent-Length: 0\r\n\r\n",
                    "X-Folded: a\r\n b\r\nContent-Length: 0\r\n\r\n"):  # fmt: skip
        answer = raw(ingress, (start + smuggle).encode())
        assert answer.startswith(b"HTTP/1.1 400 ") and b"Traceback" not in answer, (smuggle, answer)
    # slowloris: half a head, then nothing: cut after EMBER_INGRESS_HEAD_TIMEOUT (2 s in tests)
    began = time.monotonic()
    with socket.create_connection(ingress, timeout=30) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - began < 10


def test_failing_apps(app_vm: Vm, ingress: tuple[str, int]) -> None:
    token = app_vm.auth_token(ports="all").token
    status, body = get(ingress, f"/vm/{app_vm.id}/", {"X-Ember-Proxy-Auth": token, "X-Ember-Proxy-Port": "9"})
    assert status == 502 and json.loads(body)["message"] == "nothing in the VM listens on port 9"
    status, body = get(ingress, f"/vm/{app_vm.id}/close-now", {"X-Ember-Proxy-Auth": token})
    assert status == 502 and b"closed the connection" in body and b"/" not in json.loads(body)["message"].encode()
    conn = connect(ingress)
    conn.request("GET", f"/vm/{app_vm.id}/close-early", headers={"X-Ember-Proxy-Auth": token})
    answer = conn.getresponse()
    assert answer.status == 200
    with pytest.raises(http.client.IncompleteRead):
        answer.read()  # the head promised 1 MB: the client sees the connection end, not a made-up end
    conn.close()
    # the app still serves afterwards
    assert get(ingress, f"/vm/{app_vm.id}/headers", {"X-Ember-Proxy-Auth": token})[0] == 200


def test_vm_removed_during_a_request(client: Client, base_image: str, ingress: tuple[str, int]) -> None:
    vm = client.vms.run(base_image)
    try:
        start_app(vm)
        token = vm.auth_token().token
        result: list[Any] = []

        def slow() -> None:
            try:
                result.append(get(ingress, f"/vm/{vm.id}/slow", {"X-Ember-Proxy-Auth": token}))
            except (OSError, http.client.HTTPException) as exc:
                result.append(exc)

        thread = threading.Thread(target=slow)
        thread.start()
        time.sleep(0.5)
        began = time.monotonic()
        vm.remove()
        thread.join(30)
        assert not thread.is_alive() and time.monotonic() - began < 30
        assert isinstance(result[0], tuple) and result[0][0] in (502, 503), result
    finally:
        remove_quietly(client, vm.id)
