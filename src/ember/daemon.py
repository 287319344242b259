"""Assemble Ember's parts and serve the API (``ember serve``)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from ember.build.service import BuildService
from ember.config import Settings
from ember.engine import Engine
from ember.errors import HostSetupError
from ember.guest.artifacts import ensure_artifacts
from ember.host import cgroup
from ember.host.binaries import ensure_jailer
from ember.images import BASE_IMAGE, ImageStore
from ember.recovery import recover
from ember.runtime import Host
from ember.store import Store
from ember.vmm import accel as accel_mod

log = logging.getLogger("ember")


@dataclass
class Daemon:
    settings: Settings
    engine: Engine
    images: ImageStore
    builds: BuildService
    uid_lock: int  # held for the daemon's lifetime


def lock_uid_range(settings: Settings) -> int:
    """Two daemons must never give the same uid to two VMMs: one daemon per uid range."""
    path = Path("/run/ember") / f"uids-{settings.uid_base}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise HostSetupError(
            f"another Ember daemon uses VMM uids from {settings.uid_base}: stop it, or give this one "
            "its own range with EMBER_UID_BASE"
        ) from None
    return fd


async def assemble(settings: Settings) -> Daemon:
    if os.geteuid() != 0:
        raise HostSetupError("the Ember daemon must run as root (it gives every VMM its own uid and cgroup)")
    for d in (settings.data_dir, settings.images_dir, settings.vms_dir, settings.guest_dir, settings.cache_dir):
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o711)  # VMMs traverse to their own files; listing stays private
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)  # start-up races are retried and reported by us
    store = Store(settings.db_path)
    os.chmod(settings.db_path, 0o600)
    guest = await asyncio.to_thread(ensure_artifacts, settings.guest_dir)
    for path in (guest.initramfs, guest.build_initramfs, guest.initramfs.parent):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    jailer = await asyncio.to_thread(ensure_jailer, settings.data_dir / "bin")
    choice = await asyncio.to_thread(accel_mod.choose, settings.accel, settings.qemu_binary)
    if choice.accel.is_security_boundary:
        log.info("accelerator: KVM (%s)", choice.reason)
    else:
        log.warning("accelerator: TCG (%s); %s", choice.reason, accel_mod.TCG_WARNING)
    uid_lock = lock_uid_range(settings)
    host = Host(settings, cgroup.detect(cgroup.group_for(settings.data_dir)), jailer)
    images = ImageStore(settings, store, host, guest, choice)
    engine = Engine(settings, store, host, images)
    builds = BuildService(store, images)
    builds.interrupted()
    await recover(engine)
    base = store.get_image(BASE_IMAGE)
    if base is not None:
        engine.warm_up(base)
    return Daemon(settings, engine, images, builds, uid_lock)


def bind_unix_socket(path: Path) -> socket.socket:
    """The API socket, owner-only from the start (the daemon runs VMs as root)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    sock.listen(128)
    return sock


async def serve(settings: Settings) -> None:
    from ember.api.app import create_app

    daemon = await assemble(settings)
    app = create_app(daemon)
    unix = bind_unix_socket(settings.socket_path)
    servers: list[tuple[uvicorn.Server, list[socket.socket] | None]] = [
        (uvicorn.Server(uvicorn.Config(app, log_level="warning")), [unix])
    ]
    if settings.listen:
        host, _, port = settings.listen.rpartition(":")
        log.warning("also listening on %s without authentication: keep it on loopback", settings.listen)
        servers.append((uvicorn.Server(uvicorn.Config(app, host=host, port=int(port), log_level="warning")), None))
    log.info("listening on %s%s", settings.socket_path, f" and {settings.listen}" if settings.listen else "")
    await asyncio.gather(*(server.serve(sockets=sockets) for server, sockets in servers))
