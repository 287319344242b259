"""Images: a frozen disk plus a running guest's memory, ready to clone.

An image directory is a :class:`ember.snapshot.Snapshot`: the disk (never
written again), the template guest RAM that clones map copy-on-write, the
device state (~60 KB) and the manifest. Images come from the built-in Debian
base (mmdebstrap, booted once), from builds, or from a running VM (``ember
snapshot``).

The template VM that captures an image runs under a uid of its own; once it
exits, disk and RAM become root's, mode 0440, group the image's gid. Clones
map the RAM with QEMU's ``readonly=on,rom=off`` (a private copy-on-write
mapping of a file opened read-only, through the image's group) and get the
disk as a read-only file descriptor: no VMM can write an image's files, so
they are verified once per daemon and never change afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from ember.agent import AgentConnection
from ember.build import rootfs
from ember.config import Settings
from ember.db.store import Store
from ember.errors import (
    EmberError,
    HostSetupError,
    ImageNotFound,
    NameTaken,
    SnapshotError,
    StaleSnapshot,
    logged,
)
from ember.guest.artifacts import GuestArtifacts
from ember.imagecfg import ImageDefaults
from ember.microvm import MicroVm, VmPlan
from ember.models import FileDigest, ImageRecord, VmRecord, utcnow
from ember.runtime import Host
from ember.snapshot import (
    XXH3,
    Snapshot,
    SnapshotManifest,
    hash_file,
    load_verified,
    migration_deadline,
    new_manifest,
    save_streamed,
    staging,
    verify_files,
)
from ember.vmm.accel import AccelChoice
from ember.vmm.machine import Accel, DiskChain, MachineConfig, RamBacking, RamMode, kernel_cmdline

log = logging.getLogger(__name__)

BASE_IMAGE = "debian"
BUILTIN_BASE = "ember:debian-python3"  # Debian bookworm minbase + python3
# names no image of a tenant's may take: the built-in image and the built-in bases' repos
RESERVED_NAMES = frozenset({BASE_IMAGE, "python", *(ref.partition(":")[0] for ref in rootfs.BUILTIN)})


def owner(name: str) -> str:
    """The tenant owning the image ``name`` (internal, see ember.tenancy.names): "" for a built-in base."""
    if "~" in name:
        return name.partition("~")[0]
    return "" if name.partition(":")[0] in RESERVED_NAMES else "default"


Prepare = Callable[[AgentConnection], Awaitable[None]]


class Progress(Protocol):
    """Reports a build step; ``metrics`` carries numbers worth keeping (e.g. cold_boot_ms)."""

    def __call__(self, message: str, metrics: dict[str, float] | None = None) -> None: ...


@dataclass(frozen=True)
class VerifiedSnapshot:
    manifest: SnapshotManifest
    state_file: Path
    disk_size: int  # the disk's virtual size (its header checked by qemu-img, no backing file)


def qemu_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise HostSetupError(f"cannot run {binary}: install QEMU with 'apt-get install qemu-system-x86'") from exc
    return out.splitlines()[0].strip()


async def _run_tool(argv: list[str], what: str) -> None:
    proc = await asyncio.create_subprocess_exec(*argv, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise EmberError(logged(f"{what} failed", err.decode(errors="replace")))


class ImageStore:
    def __init__(self, settings: Settings, store: Store, host: Host, guest: GuestArtifacts, accel: AccelChoice) -> None:
        self.settings = settings
        self.store = store
        self.host = host
        self.guest = guest
        self.accel = accel
        self.qemu_version = qemu_version(settings.qemu_binary)
        self._verified: dict[tuple[str, str], VerifiedSnapshot] = {}
        self._build_lock = asyncio.Lock()  # the built-in image, forks
        self._verify_lock = asyncio.Lock()
        self._pending_gids: dict[str, int] = {}  # image name -> group id, for images being made

    # ---- lookup ------------------------------------------------------------

    def dir(self, image: ImageRecord) -> Path:
        return self.settings.images_dir / image.name

    def snapshot(self, image: ImageRecord) -> Snapshot:
        return Snapshot(self.dir(image))

    def get(self, name: str) -> ImageRecord:
        """An image by name; a built repo name without a tag means its newest version."""
        record = self.store.get_image(name)
        if record is None and ":" not in name:
            record = self.store.latest_image(name)
        if record is None:
            hint = " (it is built on first use: run 'ember image ls')" if name == BASE_IMAGE else ""
            raise ImageNotFound(name + hint if hint else name)
        return record

    def list(self) -> list[ImageRecord]:
        return self.store.list_images()

    def check_new_name(self, name: str) -> None:
        """A fork's name may be neither a built-in base's nor an existing image's or repo's."""
        if name in RESERVED_NAMES:
            raise NameTaken(f"'{name}' is the name of a built-in base image: pick another name")
        if self.store.get_image(name) is not None or any(b.repo == name for b in self.store.list_builds()):
            raise NameTaken(f"an image named '{name}' exists: pick another name or remove it first")

    async def verified_snapshot(self, image: ImageRecord) -> VerifiedSnapshot:
        """Check an image's files once per daemon (RAM and disk are immutable afterwards).

        The small state file is re-checked on every launch while it streams.
        """
        key = (image.name, image.created_at)
        self.check_restorable(image.machine, f"image {image.name}")
        async with self._verify_lock:
            if key not in self._verified:
                snap = self.snapshot(image)
                manifest = await asyncio.to_thread(snap.load)
                if manifest.machine != image.machine:
                    raise SnapshotError(f"image {image.name}: its snapshot was taken on a different machine config")
                # the state too: nothing of an image reaches QEMU before its check passed
                files = {Snapshot.RAM: snap.ram, Snapshot.DISK: snap.disk, Snapshot.STATE: snap.state}
                await asyncio.to_thread(verify_files, manifest, files)
                nodes = await self.host.qemu_img.with_groups(image.gid).check_chain(snap.disk, [snap.disk])
                self._verified[key] = VerifiedSnapshot(manifest, snap.state, nodes[0].virtual_size)
        return self._verified[key]

    def check_restorable(self, machine: MachineConfig, what: str) -> None:
        if not machine.restores_on(self.qemu_version):
            hint = "ember image rm debian, then ember image ls" if what == f"image {BASE_IMAGE}" else "build it again"
            raise StaleSnapshot(
                f"{what} was captured by {machine.qemu_version}, which this host's {self.qemu_version} "
                f"cannot restore (QEMU's microvm state is not compatible across releases): {hint}"
            )

    def _take_gid(self, name: str) -> int:
        """A group id for the image ``name`` is making: unused by stored images and by images
        still being made (it is theirs until they are stored or fail)."""
        gid = self.store.next_gid(self.settings.image_gids, exclude=set(self._pending_gids.values()))
        self._pending_gids[name] = gid
        return gid

    @contextlib.contextmanager
    def _making(self, name: str) -> Iterator[None]:
        """While ``name`` is being made: the group id it takes stays reserved for it."""
        try:
            yield
        finally:
            self._pending_gids.pop(name, None)

    def staging_stream(self, name: str) -> Path:
        return self.settings.images_dir / f".{name}.stream-{secrets.token_hex(4)}"

    def clean_staging(self) -> None:
        if self.settings.images_dir.exists():
            for stray in self.settings.images_dir.glob(".*"):
                log.warning("removing unfinished image files %s", stray.name)
                if stray.is_dir():
                    shutil.rmtree(stray, ignore_errors=True)
                else:
                    stray.unlink(missing_ok=True)

    # ---- building ------------------------------------------------------

    def machine(self, token: str) -> MachineConfig:
        accel = self.accel.accel
        vcpus = self.settings.vcpus or (1 if accel is Accel.TCG else 2)
        return MachineConfig(
            accel=accel, memory_mib=self.settings.memory_mib, vcpus=vcpus, kernel=str(self.guest.kernel),
            initramfs=str(self.guest.initramfs), cmdline=kernel_cmdline(accel), qemu_version=self.qemu_version,
            nic=True,  # every VM's snapshot has its NIC: egress is chosen per VM at launch (ember.network)
        )  # fmt: skip

    async def ensure_base(self, progress: Progress) -> ImageRecord:
        """Build the built-in ``debian`` image if it does not exist yet."""
        async with self._build_lock:
            with self._making(BASE_IMAGE):
                existing = self.store.get_image(BASE_IMAGE)
                if existing is not None:
                    return existing
                started = time.perf_counter()
                tarball = await self._base_tarball(progress)
                token = secrets.token_hex(16)
                async with staging(self.settings.images_dir / BASE_IMAGE) as tmp:
                    progress("creating the root filesystem (ext4)")
                    await asyncio.to_thread(
                        rootfs.disk_from_tarball, tarball, Snapshot(tmp).disk, self.settings.disk_gib, tmp
                    )
                    progress("booting it once to start the guest agent (cold boot)")
                    machine = self.machine(token)
                    image = await self._capture(BASE_IMAGE, tmp, machine, token, None, "", progress)
                    progress("snapshot of the running guest taken")
                self.store.put_image(image)
                progress(f"image '{BASE_IMAGE}' ready in {time.perf_counter() - started:.1f} s")
                return image

    async def _base_tarball(self, progress: Progress) -> Path:
        base = rootfs.BUILTIN[BUILTIN_BASE]
        if not (self.settings.cache_dir / f"{base.key}.tar").exists():
            progress("building Debian bookworm minbase + python3 with mmdebstrap (about 20 s)")
        return await rootfs.debian_tarball(base, self.settings.cache_dir, self.settings.debian_mirror)

    async def _capture(
        self, name: str, tmp: Path, machine: MachineConfig, token: str, stream: tuple[Path, FileDigest] | None,
        parent: str, progress: Progress | None = None, prepare: Prepare | None = None,
    ) -> ImageRecord:  # fmt: skip
        """Run the image's disk in a template VM (cold boot, or restore ``stream``) and freeze it.

        ``prepare`` runs after a cold boot with the agent connected (e.g. starts the app,
        waits until it is ready, syncs); the connection is closed before the snapshot."""
        gid = self._take_gid(name)
        snap = Snapshot(tmp)
        uid = self.host.uids.allocate()  # this capture's own: no other VMM can reach it
        try:
            with open(snap.ram, "wb") as f:
                f.truncate(machine.memory_mib * 1024 * 1024)
            for path in (snap.disk, snap.ram):
                os.chown(path, uid, uid)
                os.chmod(path, 0o600)
            plan = VmPlan(
                vm_id=f"capture-{secrets.token_hex(4)}", machine=machine, disk=DiskChain(snap.disk),
                ram=RamBacking(snap.ram, RamMode.OWN), uid=uid, incoming=stream is not None,
            )  # fmt: skip
            state = await self._run_template(plan, token, stream, progress, prepare, snap)
            for path in (snap.disk, snap.ram):  # frozen from now on: root's, read-only, the image's group
                os.chown(path, 0, gid)
                os.chmod(path, 0o440)
        finally:
            self.host.uids.release(uid)
        files = {Snapshot.STATE: state}
        files[Snapshot.RAM], files[Snapshot.DISK] = await asyncio.gather(
            asyncio.to_thread(hash_file, snap.ram, True, algo=XXH3),
            asyncio.to_thread(hash_file, snap.disk, True, algo=XXH3),
        )
        snap.write(new_manifest("image", machine, files, ignore_shared=True))
        return ImageRecord(
            name=name, machine=machine, gid=gid, token=token, disk_bytes=files[Snapshot.DISK].size,
            memory_bytes=files[Snapshot.RAM].size, parent=parent, tenant=owner(name),
        )  # fmt: skip

    async def _run_template(
        self, plan: VmPlan, token: str, stream: tuple[Path, FileDigest] | None, progress: Progress | None,
        prepare: Prepare | None, snap: Snapshot,
    ) -> FileDigest:  # fmt: skip
        boot_started = time.perf_counter()
        vm = await MicroVm.start(self.host, plan)
        try:
            if stream is None:
                agent = await vm.connect_agent(token, self.settings.boot_timeout_s, first_boot=True)
                boot_ms = (time.perf_counter() - boot_started) * 1000
                if progress is not None:
                    progress(f"cold boot to guest agent ready: {boot_ms / 1000:.2f} s", {"cold_boot_ms": boot_ms})
                try:
                    await (prepare(agent) if prepare is not None else agent.sync())
                finally:
                    await agent.close()
            else:
                async with migration_deadline(self.settings.migration_timeout_s, "loading the VM's state"):
                    await load_verified(vm.vmm, stream[0], stream[1], ignore_shared=False)
            return await save_streamed(
                vm.vmm, snap.state, ignore_shared=True, memory_mib=plan.machine.memory_mib,
                deadline_s=self.settings.migration_timeout_s, what="saving the snapshot",
            )  # fmt: skip
        except BaseException:
            log.error("template VM log: %s", vm.serial_tail())
            raise
        finally:
            await vm.close()

    async def from_disk(
        self, name: str, top: Path, parent: str, progress: Progress, prepare: Prepare | None,
        defaults: ImageDefaults | None = None,
    ) -> ImageRecord:  # fmt: skip
        """An image from a built disk (a qcow2 chain, flattened here) with its app started by ``prepare``.

        Builds run concurrently: each has its own name, staging directory, template VM id and group id."""
        with self._making(name):
            async with staging(self.settings.images_dir / name) as tmp:
                progress("flattening the layers into the image disk")
                await asyncio.to_thread(rootfs.flatten, top, Snapshot(tmp).disk)
                progress("booting the image to start the app (cold boot)")
                token = secrets.token_hex(16)
                image = await self._capture(name, tmp, self.machine(token), token, None, parent, progress, prepare)
            image = replace(image, defaults=defaults)
            self.store.put_image(image)
            return image

    async def copy(self, name: str, source: ImageRecord) -> ImageRecord:
        """A new image holding ``source``'s snapshot: its files copied (holes kept), its own group id."""
        async with self._build_lock:
            with self._making(name):
                async with staging(self.settings.images_dir / name) as tmp:
                    gid = self._take_gid(name)
                    src = self.snapshot(source)
                    files = [src.ram, src.disk, src.state, src.manifest_file]
                    await _run_tool(["cp", "--sparse=always", "--preserve=mode", *map(str, files), str(tmp)],
                                    f"copying the snapshot of {source.name}")  # fmt: skip
                    for path in tmp.iterdir():
                        os.chown(path, 0, gid)
                image = replace(source, name=name, gid=gid, created_at=utcnow(), tenant=owner(name))
                self.store.put_image(image)
                return image

    async def from_stream(
        self, name: str, source: VmRecord, stream: Path, digest: FileDigest, disk_copy: Path
    ) -> ImageRecord:
        """Turn a full migration stream of a running VM plus a copy of its disk into an image."""
        async with self._build_lock:
            with self._making(name):
                async with staging(self.settings.images_dir / name) as tmp:
                    # the VM's disk over its image's, read through a chain Ember names (no header is followed)
                    base = self.snapshot(self.get(source.image))
                    qemu_img = self.host.qemu_img.with_groups(self.get(source.image).gid)
                    await qemu_img.flatten([disk_copy, base.disk], Snapshot(tmp).disk)
                    image = await self._capture(name, tmp, source.machine, source.token, (stream, digest), source.image)
                # the fork runs what its VM ran: the same exec defaults
                image = replace(image, defaults=self.get(source.image).defaults)
                self.store.put_image(image)
                return image
