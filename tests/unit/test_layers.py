"""The layer cache with real qemu-img files: finished layers are root's and read-only, their header
must name the chain Ember made, and a layer changed on disk is dropped (with what was built on it)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from ember.build.dockerfile import ImageConfig
from ember.build.layers import LayerCache
from ember.config import Settings
from ember.host.qemuimg import ChainError, QemuImg

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="layers change owners: needs root")

GID = 4_242_427
VMM_UID = 640_003  # the build VM writing a layer
SIZE = 16 << 20


def cache(root: Path) -> LayerCache:
    tool = QemuImg(uid=4_242_425, gid=4_242_425, timeout_s=30, max_virtual_size=1 << 30)
    return LayerCache(root, tool, GID)


def write(disk: Path, pattern: int) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} 0 1M", str(disk)], check=True,
                   capture_output=True)  # fmt: skip


async def two_layers(c: LayerCache) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(c.disk("base")), str(SIZE)], check=True)
    base = await c.put("base", ImageConfig(), None, SIZE)
    await c.qemu_img.create_overlay(base.disk, c.disk("child"), owner_uid=VMM_UID, virtual_size=SIZE)
    write(c.disk("child"), 0x41)  # what the build VM wrote
    await c.put("child", ImageConfig(user="app"), base, SIZE)


async def test_a_finished_layer_is_roots_read_only_and_found_with_its_chain(tmp_path: Path) -> None:
    c = cache(tmp_path)
    await two_layers(c)
    for key in ("base", "child"):
        st = os.stat(c.disk(key))
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, GID, 0o440)
    hit = await c.get("child")
    assert hit is not None and hit.chain == (c.disk("child"), c.disk("base")) and hit.config.user == "app"


async def test_a_layer_changed_on_disk_is_dropped_with_what_was_built_on_it(tmp_path: Path) -> None:
    c = cache(tmp_path)
    await two_layers(c)
    assert await c.get("child") is not None  # hashed once: later hits only compare (inode, size, times)
    st = os.stat(c.disk("base"))
    with open(c.disk("base"), "r+b") as f:  # a backdoor in the base, its mtime put back
        f.seek(st.st_size - 1)
        f.write(b"\x01")
    os.utime(c.disk("base"), ns=(st.st_atime_ns, st.st_mtime_ns))
    assert await c.get("child") is None
    assert not c.disk("child").exists() and not c.disk("base").exists()
    assert await c.get("base") is None


async def test_a_layer_with_another_owner_or_mode_is_not_used(tmp_path: Path) -> None:
    c = cache(tmp_path)
    await two_layers(c)
    os.chmod(c.disk("child"), 0o640)
    assert await c.get("child") is None
    assert await c.get("base") is not None


async def test_a_layer_whose_vmm_rewrote_its_backing_is_refused(tmp_path: Path) -> None:
    c = cache(tmp_path)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(c.disk("base")), str(SIZE)], check=True)
    base = await c.put("base", ImageConfig(), None, SIZE)
    secret = tmp_path / "secret"
    secret.write_bytes(b"x" * SIZE)
    os.chmod(secret, 0o600)
    child = c.disk("child")
    await c.qemu_img.create_overlay(base.disk, child, owner_uid=VMM_UID, virtual_size=SIZE)
    # the VMM owns its top while it writes it: it points the header at a host file
    subprocess.run(["qemu-img", "rebase", "-q", "-u", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(child)],
                   check=True)  # fmt: skip
    with pytest.raises(ChainError):
        await c.put("child", ImageConfig(), base, SIZE)
    assert not child.exists() and await c.get("child") is None


def test_clean_unfinished_keeps_finished_layers(tmp_path: Path) -> None:
    c = LayerCache(tmp_path, QemuImg.of(Settings()), GID)
    (tmp_path / "done.qcow2").write_bytes(b"")
    (tmp_path / "done.json").write_text("{}")
    (tmp_path / "half.qcow2").write_bytes(b"")
    c.clean_unfinished()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done.json", "done.qcow2"]


async def test_a_writer_that_kept_its_fd_cannot_change_the_finished_layer(tmp_path: Path) -> None:
    """The build VMM that wrote a layer may still hold it open for writing (an escaped guest can
    keep QEMU's fd): the finished layer is a new inode, so those writes land in nothing cached."""
    c = cache(tmp_path)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(c.disk("base")), str(SIZE)], check=True)
    base = await c.put("base", ImageConfig(), None, SIZE)
    await c.qemu_img.create_overlay(base.disk, c.disk("child"), owner_uid=VMM_UID, virtual_size=SIZE)
    write(c.disk("child"), 0x41)
    kept = os.open(c.disk("child"), os.O_RDWR)  # the writer's fd, opened while the file was its own
    try:
        await c.put("child", ImageConfig(), base, SIZE)
        size = os.fstat(kept).st_size
        os.pwrite(kept, b"BACKDOOR" * 512, size - 4096)
    finally:
        os.close(kept)
    hit = await c.get("child")
    assert hit is not None, "the cached layer must be untouched (and still found)"
    assert b"BACKDOOR" not in c.disk("child").read_bytes()
