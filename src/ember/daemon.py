"""Assemble Ember's parts and serve the API (``ember serve``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass

import uvicorn

from ember.config import Settings
from ember.engine import Engine
from ember.errors import HostSetupError
from ember.guest.artifacts import ensure_artifacts
from ember.host import cgroup
from ember.host.binaries import ensure_jailer
from ember.images import ImageStore
from ember.runtime import Host
from ember.store import Store
from ember.vmm import accel as accel_mod

log = logging.getLogger("ember")


@dataclass
class Daemon:
    settings: Settings
    engine: Engine
    images: ImageStore


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
    for path in (guest.initramfs, guest.initramfs.parent):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    jailer = await asyncio.to_thread(ensure_jailer, settings.data_dir / "bin")
    choice = await asyncio.to_thread(accel_mod.choose, settings.accel, settings.qemu_binary)
    if choice.accel.is_security_boundary:
        log.info("accelerator: KVM (%s)", choice.reason)
    else:
        log.warning("accelerator: TCG (%s); %s", choice.reason, accel_mod.TCG_WARNING)
    host = Host(settings, cgroup.detect(), jailer)
    images = ImageStore(settings, store, host, guest, choice)
    engine = Engine(settings, store, host, images, choice)
    await engine.recover()
    return Daemon(settings, engine, images)


async def serve(settings: Settings) -> None:
    from ember.api.app import create_app

    daemon = await assemble(settings)
    app = create_app(daemon)
    settings.socket_path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        settings.socket_path.unlink()
    servers = [uvicorn.Server(uvicorn.Config(app, uds=str(settings.socket_path), log_level="warning"))]
    if settings.listen:
        host, _, port = settings.listen.rpartition(":")
        servers.append(uvicorn.Server(uvicorn.Config(app, host=host, port=int(port), log_level="warning")))
    log.info("listening on %s%s", settings.socket_path, f" and {settings.listen}" if settings.listen else "")
    try:
        await asyncio.gather(*(s.serve() for s in servers))
    finally:
        await daemon.engine.close()
