"""L4: the guest agent's token is on no command line, and a booted agent takes no second one.

The token used to be ``ember.token=`` on the kernel command line: every host user saw it in
QEMU's argv (``ps``) and every guest user in ``/proc/cmdline``. Now the daemon hands a
cold-booted agent its token over the agent channel (SET_TOKEN, accepted once) and rotates it
only through the authenticated identity request of every restore.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from ember.config import Settings
from ember.db.store import Store
from ember.guest.protocol import hello_answers, hello_frames
from ember.sdk import Client, Request
from tests.conftest import DaemonProcess, build, remove_quietly

pytestmark = [pytest.mark.vm, pytest.mark.store_agnostic]  # the agent channel's token: SQLite pass only


def _tokens(settings: Settings, vm_id: str) -> set[str]:
    """Every agent token the daemon holds for ``vm_id`` and its image (read from its database: SQLite or
    PostgreSQL)."""
    db = Store(create_engine(settings.db_url))  # no migration: the daemon made the schema
    vm = db.get_vm(vm_id)
    image = db.get_image(vm.image) if vm else None
    assert vm is not None and image is not None
    vm_tokens, image_token = (vm.token, vm.next_token), image.token
    db.engine.dispose()
    tokens = {t for t in (*vm_tokens, image_token) if t}
    assert len(tokens) >= 2, "a launched VM's token is rotated away from its image's"
    return tokens


def _assert_no_token(where: str, text: bytes, tokens: set[str]) -> None:
    assert b"ember.token" not in text, f"{where}: {text!r}"
    for token in tokens:
        assert token.encode() not in text, f"{where} holds an agent token"


def test_the_token_is_on_no_command_line(client: Client, daemon: DaemonProcess, base_image: str) -> None:
    vm = client.vms.run(base_image).id
    try:
        for step in ("launched", "resumed"):
            tokens = _tokens(daemon.settings, vm)
            pid = client.send(Request("GET", f"/v1/vms/{vm}"))["pid"]
            argv = Path(f"/proc/{pid}/cmdline").read_bytes()
            assert b"qemu-system" in argv and b"-incoming" in argv  # a restore: no -append at all
            _assert_no_token(f"{step} VM's QEMU argv", argv, tokens)
            for path in ("/proc/cmdline", "/proc/1/environ"):  # as the guest's root sees them
                _assert_no_token(f"{step} guest {path}", client.vms.exec(vm, ["cat", path]).stdout, tokens)
            if step == "launched":
                client.send(Request("POST", f"/v1/vms/{vm}/suspend"))
                client.send(Request("POST", f"/v1/vms/{vm}/resume"))  # a new QEMU, a rotated token
    finally:
        remove_quietly(client, vm)


def test_a_build_vm_and_a_captured_image_get_their_token_over_the_channel(client: Client, tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM ember:debian-python3\nRUN echo cmdline: $(cat /proc/cmdline)\n")
    image, logs = build(client, ctx, "tokencheck")
    try:
        assert image["state"] == "CREATED", logs[-20:]
        (line,) = [line for line in logs if "| cmdline: " in line]  # the RUN step's output
        assert "ember.build=1" in line and "ember.token" not in line, line
        vm = client.vms.run(image["name"]).id  # the image was cold-booted (a first boot) and captured
        assert b"ember.token" not in client.vms.exec(vm, ["cat", "/proc/cmdline"]).stdout
        remove_quietly(client, vm)
    finally:
        client.send(Request("DELETE", f"/v1/images/{image['name']}"))


def _agent_socket(settings: Settings, vm_id: str) -> Path:
    (sock,) = [p for p in settings.data_dir.rglob("agent.sock") if vm_id in p.parts]
    return sock


def test_a_booted_agent_refuses_a_second_token(client: Client, daemon: DaemonProcess, base_image: str) -> None:
    """With the daemon away, whoever reaches the agent's channel cannot give it a token of its
    choosing: the agent answers HELLO_NAK, keeps its own, and the next daemon re-attaches."""
    vm = client.vms.run(base_image).id
    client.vms.exec(vm, ["true"])
    sock = _agent_socket(daemon.settings, vm)
    daemon.stop()  # a stopped daemon leaves its VMs running
    try:
        nonce = os.urandom(16)
        accepted, refused = hello_answers(nonce)
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(sock))
            s.sendall(hello_frames("f" * 32, nonce, first_boot=True))  # SET_TOKEN + HELLO with it
            seen = b""
            deadline = time.monotonic() + 10
            while refused not in seen and accepted not in seen and time.monotonic() < deadline:
                try:
                    seen += s.recv(65536)
                except TimeoutError:
                    break
        assert accepted not in seen, "the agent took a second token"
        assert refused in seen, "the agent did not answer the HELLO (no refusal)"
    finally:
        daemon.start()
    # the daemon's recovery still authenticates with the token the agent has kept
    assert client.send(Request("GET", f"/v1/vms/{vm}"))["state"] == "RUNNING"
    assert client.vms.exec(vm, ["echo", "still mine"]).stdout == b"still mine\n"
    remove_quietly(client, vm)
