"""The builder snapshot (ember.build.template): what a restored build VM's devices are, which
disks fit it, and how a stored template is checked before any build VM restores from it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ember.build.template import FROM_SLOTS, TOKEN, BuilderTemplate, BuilderTemplates, device_args
from ember.config import Settings
from ember.errors import SnapshotError
from ember.host.cgroup import CgroupsV2
from ember.models import FileDigest
from ember.runtime import Host, UidPool
from ember.snapshot import Snapshot, hash_file, new_manifest, rewrite_copy
from ember.vmm.machine import Accel, MachineConfig, readonly_disk_args, user_network_args

MACHINE = MachineConfig(Accel.TCG, 1024, 1, "/k", "/i", "console=ttyS0 ember.build=1", "QEMU 10")
GIB = 1 << 30


@pytest.fixture
def templates(tmp_path: Path) -> BuilderTemplates:
    settings = Settings(data_dir=tmp_path, socket_path=tmp_path / "ember.sock", disk_gib=2)
    cgroup_root = tmp_path / "cgroup"  # a plain directory: nothing here makes a cgroup
    cgroup_root.mkdir()
    (cgroup_root / "cgroup.subtree_control").write_text("cpu io memory pids")
    (cgroup_root / "cgroup.controllers").write_text("cpu io memory pids")
    host = Host(settings, CgroupsV2("ember-unit", cgroup_root), tmp_path / "jailer", UidPool(lambda taken: 1))
    return BuilderTemplates(host, lambda: MACHINE)


def template(path: Path) -> BuilderTemplate:
    return BuilderTemplate(Snapshot(path), MACHINE, True, FileDigest("0" * 64, 1), "t" * 32, 2 * GIB)


def test_restored_build_vms_have_the_cold_boot_device_order(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert device_args(True, [a, b]) == (*user_network_args(), *readonly_disk_args(0, a), *readonly_disk_args(1, b))
    assert device_args(False, []) == ()
    slots = template(tmp_path / "t").slots([a])
    assert slots == [a, *[tmp_path / "t" / Snapshot.DISK] * (FROM_SLOTS - 1)]


def test_only_disks_of_the_placeholder_size_and_up_to_the_slots_fit(tmp_path: Path) -> None:
    t = template(tmp_path)
    assert t.fits([2 * GIB])
    assert t.fits([2 * GIB] * (1 + FROM_SLOTS))
    assert not t.fits([2 * GIB] * (2 + FROM_SLOTS))  # more COPY --from sources than slots
    assert not t.fits([3 * GIB])  # the guest kernel keeps the capacity it probed
    assert not t.fits([2 * GIB, GIB])


def make_stored(templates: BuilderTemplates, network: bool) -> Path:
    """A template directory as _make leaves it (files root's, the layer group on RAM and disk)."""
    path = templates.root / templates._key(network)
    path.mkdir(parents=True)
    snap = Snapshot(path)
    gid = templates.settings.layer_gid
    contents = {Snapshot.STATE: b"state", Snapshot.RAM: b"\0" * 4096 + b"ram", Snapshot.DISK: b"disk", TOKEN: b"t" * 32}
    for name, data in contents.items():
        (path / name).write_bytes(data)
        os.chown(path / name, 0, gid if name in (Snapshot.RAM, Snapshot.DISK) else 0)
        os.chmod(path / name, 0o440 if name in (Snapshot.RAM, Snapshot.DISK) else 0o400)
    files = {name: hash_file(path / name, name == Snapshot.RAM) for name in contents}
    snap.write(new_manifest("builder", MACHINE, files, ignore_shared=True))
    return path


def test_a_stored_template_is_verified(templates: BuilderTemplates) -> None:
    path = make_stored(templates, True)
    t = templates._verify(path, True)
    assert (t.token, t.disk_size, t.network) == ("t" * 32, 2 * GIB, True)


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: os.chmod(p / Snapshot.RAM, 0o640),  # a VMM of the layer group could write the RAM others map
        lambda p: os.chown(p / Snapshot.RAM, 1234, -1),
        lambda p: os.chmod(p / Snapshot.STATE, 0o440),  # the state is the daemon's alone
        lambda p: os.chown(p / TOKEN, 0, 5),
        lambda p: (p / Snapshot.RAM).write_bytes(b"\0" * 4096 + b"RAM"),  # same size, other bytes
        lambda p: (p / Snapshot.DISK).write_bytes(b"DISK"),
        lambda p: (p / Snapshot.RAM).unlink() or (p / Snapshot.RAM).symlink_to(p / Snapshot.DISK),
    ],
)
def test_a_damaged_template_is_refused(templates: BuilderTemplates, damage: object) -> None:
    path = make_stored(templates, False)
    damage(path)  # type: ignore[operator]
    with pytest.raises(SnapshotError):
        templates._verify(path, False)


def test_a_template_of_another_machine_is_refused_and_swept(templates: BuilderTemplates) -> None:
    path = make_stored(templates, True)
    other = BuilderTemplates(templates.host, lambda: MachineConfig(**{**MACHINE.__dict__, "memory_mib": 2048}))
    with pytest.raises(SnapshotError):
        other._verify(path, True)
    stray = templates.root / ".net-x.tmp-1234"  # what a killed daemon's staging left
    stray.mkdir()
    templates.clean()
    assert path.exists() and not stray.exists()
    other.clean()  # a daemon on another machine configuration drops it
    assert not path.exists()


def test_rewrite_copy_keeps_every_byte_and_leaves_holes_for_zero_pages(tmp_path: Path) -> None:
    ram = tmp_path / "ram"
    page = 4096
    with open(ram, "wb") as f:
        f.write(b"\0" * (3 << 20))  # written zeros, as a booted guest leaves them
        for offset, data in ((0, b"a"), (page * 5 - 1, b"bc"), ((1 << 20) + 7, b"d" * page * 3), ((3 << 20) - 1, b"e")):
            f.seek(offset)
            f.write(data)
    before, digest = ram.read_bytes(), hash_file(ram, True)
    rewrite_copy(ram, zero_pages_to_holes=True)
    assert ram.read_bytes() == before and hash_file(ram, True) == digest
    # pages 0, 4, 5 of the first MiB, 256..259 of the second, the last page: 9 pages allocated
    assert ram.stat().st_blocks * 512 <= 9 * page + 64 * 1024  # (metadata slack)
    assert not list(tmp_path.glob(".*"))
