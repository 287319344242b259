"""The builder snapshot build VMs start from, instead of a cold boot.

A builder is a build VM booted once (build initramfs, ``ember.build=1``) with
the device layout every build VM of its kind has: the root disk, the NIC when
builds have network, and :data:`FROM_SLOTS` read-only disks for ``COPY --from``.
Its disks are blank placeholders of the size of every layer, and its agent
mounts nothing until the first RESTORE (``agent.c``: ``mount_build_root``).
Right after the agent answers, its state is saved (``x-ignore-shared``: the
RAM stays in its file) and the snapshot kept under ``<data>/builder/``, one
per machine configuration and layout, until that configuration changes.

A build VM restores it with the build's own top layer behind the same root
device (and its ``COPY --from`` layers, or the blank placeholder, in the
slots), the template RAM mapped privately and read-only (``readonly=on``:
each build VM's writes are its own copy-on-write pages, none reach the
file), and gets a fresh identity (RNG seed, clock, token) before its agent
drops what the kernel read of the placeholders and mounts the real disk.

Tenants' builds all restore from these files, so they are root's: RAM and
the placeholder 0440 with the layer group (the build VMMs' group), the
device state and the agent token 0400 (only the daemon reads them). A
template is checked against its manifest (owner, mode, SHA-256 of every
file, the machine) once per daemon before its first use; its state's
SHA-256 is checked again on every restore, before the guest runs. Nothing
of a tenant's is in it: it booted with blank disks and ran no command.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ember.errors import EmberError, SnapshotError, logged
from ember.microvm import MicroVm, VmPlan
from ember.models import FileDigest
from ember.runtime import Host
from ember.snapshot import (
    Snapshot,
    hash_file,
    new_manifest,
    rewrite_copy,
    save_streamed,
    staging,
    verify_files,
)
from ember.vmm.machine import DiskChain, MachineConfig, RamBacking, RamMode, readonly_disk_args, user_network_args

log = logging.getLogger(__name__)

# Read-only disks a restored build VM has for COPY --from (a stage using more cold-boots).
FROM_SLOTS = 3
TOKEN = "token"  # the builder agent's token (replaced by a fresh one on every restore)
KIND = "builder"
LAYOUT_VERSION = 1  # bump when what a builder boots with changes in a way its key does not show


def device_args(network: bool, readonly: list[Path]) -> tuple[str, ...]:
    """A build VM's devices after its root disk: the NIC (with network), then the read-only disks."""
    args = user_network_args() if network else ()
    for i, disk in enumerate(readonly):
        args += readonly_disk_args(i, disk)
    return args


@dataclass(frozen=True)
class BuilderTemplate:
    """A verified builder snapshot."""

    snapshot: Snapshot
    machine: MachineConfig
    network: bool
    state: FileDigest  # checked again on every restore while it streams
    token: str
    disk_size: int  # the placeholders' virtual size: every disk a build VM restores with has it

    @property
    def ram(self) -> Path:
        return self.snapshot.ram

    @property
    def blank_disk(self) -> Path:
        """The read-only placeholder: in the slots a build does not use."""
        return self.snapshot.disk

    def slots(self, readonly: list[Path]) -> list[Path]:
        return [*readonly, *[self.blank_disk] * (FROM_SLOTS - len(readonly))]

    def fits(self, sizes: list[int]) -> bool:
        """Whether disks of these virtual sizes (the root first, then COPY --from) can replace
        the placeholders: same size (the guest kernel keeps what it probed), enough slots."""
        return len(sizes) - 1 <= FROM_SLOTS and all(size == self.disk_size for size in sizes)


class BuilderTemplates:
    """The daemon's builder snapshots: one per layout (with or without network), each made on
    first need (:meth:`prepare` starts it early) and verified once per daemon."""

    def __init__(self, host: Host, machine: Callable[[], MachineConfig]) -> None:
        self.host = host
        self.settings = host.settings
        self.machine = machine
        self.root = self.settings.data_dir / "builder"
        self._tasks: dict[bool, asyncio.Task[BuilderTemplate]] = {}

    def _key(self, network: bool) -> str:
        ident = f"{self.machine().to_json()}|{self.settings.disk_gib}|{network}|{FROM_SLOTS}|{LAYOUT_VERSION}"
        return f"{'net' if network else 'nonet'}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"

    def clean(self) -> None:
        """At daemon start: remove unfinished templates and those of another machine configuration."""
        if not self.root.exists():
            return
        keep = {self._key(True), self._key(False)}
        for entry in self.root.iterdir():
            if entry.name not in keep:
                log.info("removing builder snapshot %s (unfinished, or another machine configuration)", entry.name)
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)

    def prepare(self, network: bool) -> None:
        """Start making (or verifying) the template for this layout, if nothing has yet."""
        if network not in self._tasks:
            task = asyncio.create_task(self._ensure(network), name=f"builder-template-{network}")
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: get() reports it
            self._tasks[network] = task

    async def get(self, network: bool) -> BuilderTemplate | None:
        """The template for this layout, or None if it cannot be made (logged; the next build tries again)."""
        self.prepare(network)
        task = self._tasks[network]
        try:
            return await asyncio.shield(task)  # a cancelled build does not cancel what other builds wait for
        except asyncio.CancelledError:
            if task.cancelled():
                self._tasks.pop(network, None)
            raise
        except EmberError as exc:
            log.warning("no builder snapshot (%s): build VMs cold-boot", exc)
        except Exception:
            log.exception("no builder snapshot: build VMs cold-boot")
        if self._tasks.get(network) is task:
            del self._tasks[network]
        return None

    async def discard(self, template: BuilderTemplate) -> None:
        """Drop a template found damaged while in use (its state failed its check): the next
        build makes it again."""
        task = self._tasks.get(template.network)
        made = task is not None and task.done() and not task.cancelled() and task.exception() is None
        if made and task is not None and task.result() == template:
            del self._tasks[template.network]
        await asyncio.to_thread(shutil.rmtree, template.snapshot.path, True)

    async def _ensure(self, network: bool) -> BuilderTemplate:
        path = self.root / self._key(network)
        if path.exists():
            try:
                return await asyncio.to_thread(self._verify, path, network)
            except SnapshotError as exc:
                log.warning("builder snapshot %s refused (%s): making it again", path.name, exc)
                await asyncio.to_thread(shutil.rmtree, path, True)
        return await self._make(path, network)

    def _verify(self, path: Path, network: bool) -> BuilderTemplate:
        snap = Snapshot(path)
        manifest = snap.load()
        if manifest.kind != KIND or manifest.machine != self.machine() or not manifest.ignore_shared:
            raise SnapshotError(logged("the builder snapshot is not this daemon's builder", str(path)))
        modes = {Snapshot.RAM: 0o440, Snapshot.DISK: 0o440, Snapshot.STATE: 0o400, TOKEN: 0o400}
        if set(manifest.files) != set(modes):
            raise SnapshotError(logged("the builder snapshot lists other files", str(path)))
        for name, mode in modes.items():
            st = os.lstat(path / name)
            gid = self.settings.layer_gid if mode == 0o440 else 0
            if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_gid != gid or stat.S_IMODE(st.st_mode) != mode:
                raise SnapshotError(logged(f"builder snapshot file {name} is not root's, mode {mode:o}", str(path)))
        verify_files(manifest, {name: path / name for name in (Snapshot.RAM, Snapshot.DISK, TOKEN)})
        return self._template(snap, manifest.files[Snapshot.STATE], network)

    def _template(self, snap: Snapshot, state: FileDigest, network: bool) -> BuilderTemplate:
        token = (snap.path / TOKEN).read_text()
        return BuilderTemplate(snap, self.machine(), network, state, token, self.settings.disk_gib << 30)

    async def _make(self, path: Path, network: bool) -> BuilderTemplate:
        machine = self.machine()
        log.info("making the builder snapshot %s (one cold boot)", path.name)
        self.root.mkdir(mode=0o700, exist_ok=True)
        async with staging(path) as tmp:
            snap = Snapshot(tmp)
            placeholder = tmp / "root.qcow2"  # the root disk the builder boots with (its VMM's, removed after)
            await self._blank_disk(tmp, snap.disk)
            await asyncio.to_thread(shutil.copyfile, snap.disk, placeholder)
            uid = self.host.uids.allocate()  # its own: no other VMM can reach it
            try:
                os.chown(placeholder, uid, uid)
                os.chmod(placeholder, 0o600)
                with open(snap.ram, "wb") as f:
                    f.truncate(machine.memory_mib << 20)
                os.chown(snap.ram, uid, uid)
                os.chmod(snap.ram, 0o600)
                token = secrets.token_hex(16)
                plan = VmPlan(
                    vm_id=f"builder-{secrets.token_hex(4)}",
                    machine=machine,
                    disk=DiskChain(placeholder),
                    ram=RamBacking(snap.ram, RamMode.OWN),
                    uid=uid,
                    groups=(self.settings.layer_gid,),
                    extra_args=device_args(network, [snap.disk] * FROM_SLOTS),
                    ro_paths=(snap.disk,),
                )  # fmt: skip  (network=False: its NIC, if any, in an empty namespace: it runs no command)
                state = await self._boot_and_save(plan, token, snap)
            finally:
                self.host.uids.release(uid)
            placeholder.unlink()
            # the builder zeroes its memory as it boots (init_on_free=1): of 1 GiB written, ~70 MB is not zero
            await asyncio.to_thread(rewrite_copy, snap.ram, zero_pages_to_holes=True)
            os.chown(snap.ram, 0, self.settings.layer_gid)  # frozen: root's, read-only to build VMMs
            os.chmod(snap.ram, 0o440)
            os.chmod(snap.state, 0o400)
            fd = os.open(tmp / TOKEN, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o400)
            with os.fdopen(fd, "w") as f:
                f.write(token)
            ram, disk, token_digest = await asyncio.gather(
                asyncio.to_thread(hash_file, snap.ram, True), asyncio.to_thread(hash_file, snap.disk),
                asyncio.to_thread(hash_file, tmp / TOKEN),
            )  # fmt: skip
            files = {Snapshot.STATE: state, Snapshot.RAM: ram, Snapshot.DISK: disk, TOKEN: token_digest}
            snap.write(new_manifest(KIND, machine, files, ignore_shared=True))
        log.info("builder snapshot %s made", path.name)
        return self._template(Snapshot(path), state, network)

    async def _blank_disk(self, tmp: Path, out: Path) -> None:
        """A blank qcow2 of every layer's virtual size at ``out``: root's, 0440, the layer group."""
        raw = tmp / "blank.raw"
        fd = os.open(raw, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, self.settings.disk_gib << 30)
        finally:
            os.close(fd)
        try:
            await self.host.qemu_img.convert_raw(raw, out)
        finally:
            raw.unlink()
        os.chown(out, 0, self.settings.layer_gid)
        os.chmod(out, 0o440)

    async def _boot_and_save(self, plan: VmPlan, token: str, snap: Snapshot) -> FileDigest:
        vm = await MicroVm.start(self.host, plan)
        try:
            agent = await vm.connect_agent(token, self.settings.boot_timeout_s, first_boot=True)
            await agent.close()
            return await save_streamed(
                vm.vmm, snap.state, ignore_shared=True, memory_mib=plan.machine.memory_mib,
                deadline_s=self.settings.migration_timeout_s, what="saving the builder snapshot",
            )  # fmt: skip
        except BaseException:
            with contextlib.suppress(Exception):
                log.error("builder VM log: %s", vm.serial_tail())
            raise
        finally:
            await vm.close()
