"""Shell tokens (as AWS's CreateMicrovmShellAuthToken) through a real daemon and VM: a shell opened with one on
the API listener (``GET /v1/vms/{id}/shell``) and on the ingress (``/ember/shell``), in the subprotocol and the
query form; refused (without touching the VM) when expired, another VM's, a proxy token, or hostile; and
refused everywhere else (the proxy path, the HTTP API)."""

from __future__ import annotations

import base64
import json
import os
import socket
import time
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import quote

import pytest

from ember.ingress.tokens import NO_PORTS, TokenKind, TokenSigner
from ember.sdk import Client, Forbidden, InvalidRequest, Unauthorized, Vm
from ember.sdk.core import Endpoint
from ember.sdk.shell import Shell, ShellProtocol
from ember.tenancy.secrets import load_key
from tests.conftest import DaemonProcess, remove_quietly
from tests.vm.test_ingress import get, start_app

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def shell_vm(client: Client, base_image: str) -> Iterator[Vm]:
    vm = client.vms.run(base_image)
    yield vm
    remove_quietly(client, vm.id)


LISTENERS = ("api", "ingress")  # the daemon's Unix socket (root there is no help: a token offered decides)


def ingress_of(daemon: DaemonProcess) -> tuple[str, int]:
    host, _, port = daemon.settings.ingress_listen.rpartition(":")
    return host, int(port)


def open_shell(
    daemon: DaemonProcess, listener: str, target: str, *, host: str = "", subprotocols: Sequence[str] = ()
) -> tuple[Shell, ShellProtocol]:
    """A shell's WebSocket with no API key: the SDK's protocol on a plain socket."""
    if listener == "api":
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(30)
        sock.connect(str(daemon.settings.socket_path))
        endpoint = Endpoint(socket=str(daemon.settings.socket_path))
    else:
        sock = socket.create_connection(ingress_of(daemon), timeout=30)
        endpoint = Endpoint(host=host or ingress_of(daemon)[0], port=ingress_of(daemon)[1])
    proto = ShellProtocol(endpoint, target, subprotocols=subprotocols)
    return Shell(sock, proto), proto


def run_in(shell: Shell) -> tuple[bytes, int | None]:
    seen = b""
    while chunk := shell.recv():
        seen += chunk
    return seen, shell.exit_code


def command(vm_id: str, where: str, *, token: str = "", code: int = 7) -> str:
    """The shell's target on the API listener or the ingress (path form), running ``echo; exit code``."""
    query = f"command=sh&command=-c&command={quote(f'echo ran-$((40+2)); exit {code}')}"
    query += f"&token={quote(token)}" if token else ""
    return f"/v1/vms/{vm_id}/shell?{query}" if where == "api" else f"/vm/{vm_id}/ember/shell?{query}"


def test_a_shell_token_opens_the_shell_on_both_listeners_in_both_forms(daemon: DaemonProcess, shell_vm: Vm) -> None:
    made = shell_vm.shell_token(minutes=5)
    assert (made.kind, made.vm_id) == ("shell", shell_vm.id)
    assert made.url == f"ws://{shell_vm.id}.localhost:{ingress_of(daemon)[1]}/ember/shell"
    for name in LISTENERS:
        for protocols, selected in ((["lambda-microvms.authentication." + made.token, "lambda-microvms"],
                                     "lambda-microvms"),
                                    (["ember", "ember.authentication." + made.token], "ember")):  # fmt: skip
            shell, proto = open_shell(daemon, name, command(shell_vm.id, name), subprotocols=protocols)
            with shell:
                out, code = run_in(shell)
            assert b"ran-42" in out and code == 7 and proto.subprotocol == selected, (name, out, code)
        shell, proto = open_shell(daemon, name, command(shell_vm.id, name, token=made.token, code=3))
        with shell:
            out, code = run_in(shell)
        assert b"ran-42" in out and code == 3 and proto.subprotocol is None, (name, out, code)
    # the Host form of the ingress, and an interactive exchange
    host = f"{shell_vm.id}.localhost"
    target = "/ember/shell?command=sh&command=-c&command=read+x%3B+echo+got-%24x%3B+exit+4"
    shell, _ = open_shell(daemon, "ingress", target, host=host,
                          subprotocols=["ember.authentication." + made.token, "ember"])  # fmt: skip
    with shell:
        shell.send(b"hello\r")
        out, code = run_in(shell)
    assert b"got-hello" in out and code == 4
    # the token reached neither the guest's environment nor its command line
    seen = shell_vm.exec(["sh", "-c", "cat /proc/*/cmdline /proc/*/environ 2>/dev/null | tr '\\0' '\\n'"]).stdout
    assert made.token.encode() not in seen and made.token.split(".")[1].encode() not in seen


def refused(daemon: DaemonProcess, listener: str, target: str, *, subprotocols: Sequence[str] = ()) -> Exception:
    with pytest.raises((Unauthorized, Forbidden, InvalidRequest)) as caught:
        open_shell(daemon, listener, target, subprotocols=subprotocols)
    return caught.value


def test_expired_foreign_proxy_and_hostile_tokens_are_refused_without_touching_the_vm(
    daemon: DaemonProcess, client: Client, shell_vm: Vm, base_image: str
) -> None:
    signer = TokenSigner(load_key(daemon.settings.ingress_key_path), clock=lambda: time.time() - 3600)
    expired, _ = signer.issue(vm_id=shell_vm.id, tenant="default", kind=TokenKind.SHELL, ports=NO_PORTS, minutes=5)
    proxy = shell_vm.auth_token(ports="all").token
    other = client.vms.run(base_image)
    try:
        theirs = other.shell_token().token
        other.suspend()  # a token for a suspended VM is refused before the VM is looked at (no wake)
        mine = shell_vm.shell_token().token
        forged = mine[:-4] + ("AAAA" if not mine.endswith("AAAA") else "BBBB")
        before = len(shell_vm.events())
        for name in LISTENERS:
            for token, kind, words in ((expired, Unauthorized, "expired"), (theirs, Unauthorized, "another VM"),
                                       (proxy, Forbidden, "proxy token"), (forged, Unauthorized, "malformed"),
                                       ("emt1.x", Unauthorized, "malformed"),
                                       ("x" * 2000, Unauthorized, "malformed")):  # fmt: skip
                for form in ("protocol", "query"):
                    target = command(shell_vm.id, name, token=token if form == "query" else "")
                    protocols = ["ember", "ember.authentication." + token] if form == "protocol" else []
                    exc = refused(daemon, name, target, subprotocols=protocols)
                    assert isinstance(exc, kind) and words in str(exc), (name, form, words, exc)
                    assert token not in str(exc)
            # several tokens, the same token twice, an oversized header, too many subprotocols
            target = command(shell_vm.id, name)
            two = ["ember.authentication." + mine, "lambda-microvms.authentication." + theirs]
            assert "one shell token" in str(refused(daemon, name, target, subprotocols=two))
            both = command(shell_vm.id, name, token=mine)
            assert "one shell token" in str(refused(daemon, name, both, subprotocols=["ember.authentication." + mine]))
            big = ["ember", "ember.authentication." + mine, "x" * 5000]
            assert isinstance(refused(daemon, name, target, subprotocols=big), InvalidRequest)
            many = ["ember.authentication." + mine, *(f"p{i}" for i in range(20))]
            assert isinstance(refused(daemon, name, target, subprotocols=many), InvalidRequest)
        assert len(shell_vm.events()) == before and client.vms.get(other.id).state == "SUSPENDED"
    finally:
        remove_quietly(client, other.id)


def raw_upgrade(where: tuple[str, int], target: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """A WebSocket handshake as raw bytes (any header); the status and JSON body of the refusal."""
    key = base64.b64encode(os.urandom(16)).decode()
    sent = {"Host": f"{where[0]}:{where[1]}", "Upgrade": "websocket", "Connection": "Upgrade",
            "Sec-WebSocket-Key": key, "Sec-WebSocket-Version": "13", **headers}  # fmt: skip
    lines = [f"GET {target} HTTP/1.1", *(f"{k}: {v}" for k, v in sent.items())]
    with socket.create_connection(where, timeout=30) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body) if body else {}


def test_a_shell_token_opens_nothing_else(daemon: DaemonProcess, client: Client, shell_vm: Vm) -> None:
    ingress = ingress_of(daemon)
    start_app(shell_vm)
    mine = shell_vm.shell_token().token
    # the proxy path: as the proxy header (kind), and in a subprotocol (never forwarded to the app)
    status, body = get(ingress, "/headers", {"X-Ember-Proxy-Auth": mine}, shell_vm.id)
    assert status == 403 and b"shell token cannot be used here" in body
    proxy = shell_vm.auth_token().token
    offered = {"X-Ember-Proxy-Auth": proxy, "Sec-WebSocket-Protocol": "ember.authentication." + mine}
    status, body = get(ingress, "/headers", offered, shell_vm.id)
    assert status == 403 and b"opens only the VM's shell" in body
    # the ingress's shell takes a shell token only: no key, no proxy token, a WebSocket only
    key = client.keys.create(tenant="default", name="shelltok").api_key
    target = f"/vm/{shell_vm.id}/ember/shell"
    status, body = raw_upgrade(ingress, target, {"Authorization": f"Bearer {key}"})
    assert status == 401 and "shell token" in body["message"]
    status, body = raw_upgrade(ingress, target, {"X-Ember-Proxy-Auth": proxy})
    assert status == 401
    status, body = get(ingress, target + f"?token={mine}", {})
    assert status == 400 and "WebSocket" in json.loads(body)["message"]
    status, body = raw_upgrade(ingress, target, {"Sec-WebSocket-Protocol": f"ember.authentication.{mine}, ember",
                                                 "Authorization": f"Bearer {key}"})  # fmt: skip
    assert status == 401 and "not both" in body["message"]
    status, body = raw_upgrade(ingress, target, {"Sec-WebSocket-Protocol": f"ember.authentication.{mine}",
                                                 "Sec-WebSocket-Version": "8"})  # fmt: skip
    assert status == 400 and "handshake" in body["message"]


def test_ingress_shell_bounds_messages(daemon: DaemonProcess, shell_vm: Vm) -> None:
    token = shell_vm.shell_token().token
    target = f"/vm/{shell_vm.id}/ember/shell?command=cat"
    shell, _ = open_shell(daemon, "ingress", target, subprotocols=["ember.authentication." + token])
    with shell:
        shell.send(b"x" * (64 * 1024 + 1))  # EMBER_SHELL_MAX_MESSAGE_BYTES's default
        run_in(shell)
        assert shell.exit_code is None and "maximum size" in shell.close_reason, shell.close_reason
    assert shell_vm.exec(["true"]).exit_code == 0
