"""qemu-img on hostile disks (ember.host.qemuimg), with the real qemu-img: a header that names a
host file, a VMDK descriptor, an external data file or a file a VMM can write is refused, and
nothing of the host file lands in the output."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.host.qemuimg import ChainError, QemuImg, pinned_chain

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="qemu-img runs as another uid: needs root")

TOOL_UID = 4_242_425
SIZE = 16 << 20
SECRET = b"ROOT-ONLY-SECRET" * 4096


def tool() -> QemuImg:
    return QemuImg(uid=TOOL_UID, gid=TOOL_UID, timeout_s=30, max_virtual_size=1 << 30)


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def write(disk: Path, pattern: int, offset: int) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} {offset} 1M", str(disk)], check=True,
                   capture_output=True)  # fmt: skip


def read_all(disk: Path) -> bytes:
    raw = disk.with_suffix(".raw")
    qemu_img("convert", "-f", "qcow2", "-O", "raw", str(disk), str(raw))
    return raw.read_bytes()


@pytest.fixture
def d(tmp_path: Path) -> Iterator[Path]:
    # under pytest's 0700 directory: the tool uid gets every file open, never reaches one by name
    yield from _files(tmp_path)


def _files(tmp_path: Path) -> Iterator[Path]:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    os.chmod(secret, 0o600)
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "base.qcow2"), str(SIZE))
    write(tmp_path / "base.qcow2", 0x41, 0)
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(tmp_path / "base.qcow2"), "-F", "qcow2",
             str(tmp_path / "top.qcow2"))  # fmt: skip
    write(tmp_path / "top.qcow2", 0x42, 1 << 20)
    for name in ("base.qcow2", "top.qcow2"):
        os.chmod(tmp_path / name, 0o444)
    yield tmp_path


async def test_a_checked_chain_flattens_into_one_root_owned_disk(d: Path) -> None:
    chain = [d / "top.qcow2", d / "base.qcow2"]
    nodes = await tool().check_chain(chain[0], chain)
    assert [n.virtual_size for n in nodes] == [SIZE, SIZE]
    await tool().flatten(chain, d / "out.qcow2")
    st = os.stat(d / "out.qcow2")
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600)
    data = read_all(d / "out.qcow2")
    assert data[: 1 << 20] == b"\x41" * (1 << 20) and data[1 << 20 : 2 << 20] == b"\x42" * (1 << 20)
    info = json.loads(subprocess.run(["qemu-img", "info", "-f", "qcow2", "--output=json", str(d / "out.qcow2")],
                                     check=True, capture_output=True).stdout)  # fmt: skip
    assert "backing-filename" not in info


@pytest.mark.parametrize("backing_format", ["raw", "qcow2"])
async def test_a_backing_file_naming_a_root_only_host_file_is_refused(d: Path, backing_format: str) -> None:
    evil = d / "evil.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", str(d / "secret"), "-F", backing_format, str(evil), str(SIZE))
    os.chmod(evil, 0o444)
    with pytest.raises(ChainError):
        await tool().check_chain(evil, [evil])
    with pytest.raises(ChainError):
        await tool().flatten([evil], d / "out.qcow2")
    assert not (d / "out.qcow2").exists()
    # named as the chain Ember expects, it is still refused: the header names another file
    with pytest.raises(ChainError):
        await tool().flatten([evil, d / "base.qcow2"], d / "out.qcow2")
    assert not (d / "out.qcow2").exists()


async def test_a_backing_file_naming_a_readable_host_file_is_not_the_expected_chain(d: Path) -> None:
    visible = d / "visible"
    visible.write_bytes(SECRET)
    os.chmod(visible, 0o644)
    evil = d / "evil.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(visible), "-F", "raw", str(evil), str(SIZE))
    os.chmod(evil, 0o444)
    for chain in ([evil], [evil, d / "base.qcow2"]):
        with pytest.raises(ChainError):
            await tool().flatten(chain, d / "out.qcow2")
        assert not (d / "out.qcow2").exists()


async def test_the_pinned_chain_never_reads_the_backing_a_header_names(d: Path) -> None:
    """Even without the check, the data comes from the files Ember names, not from the header."""
    evil = d / "evil.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(d / "secret"), "-F", "raw", str(evil), str(SIZE))
    out = d / "out.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", pinned_chain([evil]), str(out)], check=True)
    assert SECRET[:64] not in out.read_bytes()


async def test_a_vmdk_descriptor_with_a_flat_extent_on_a_host_file_is_refused(d: Path) -> None:
    vmdk = d / "disk.qcow2"
    vmdk.write_text(
        '# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\n'
        f'RW 128 FLAT "{d / "secret"}" 0\n'
    )
    os.chmod(vmdk, 0o444)
    with pytest.raises(ChainError):
        await tool().check_chain(vmdk, [vmdk])
    with pytest.raises(ChainError):
        await tool().flatten([vmdk], d / "out.qcow2")
    assert not (d / "out.qcow2").exists()


async def test_an_external_data_file_is_refused(d: Path) -> None:
    readable = d / "data"
    readable.write_bytes(SECRET)
    os.chmod(readable, 0o644)
    evil = d / "evil.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={readable},data_file_raw=on", str(evil), str(SIZE))
    os.chmod(evil, 0o444)
    with pytest.raises(ChainError, match="external data file"):
        await tool().flatten([evil], d / "out.qcow2")
    assert not (d / "out.qcow2").exists()


async def test_a_disk_a_vmm_can_write_is_refused(d: Path) -> None:
    top = d / "top.qcow2"
    os.chown(top, 640_001, 640_001)  # a VMM's: it could change the header between check and read
    with pytest.raises(ChainError, match="writable"):
        await tool().flatten([top, d / "base.qcow2"], d / "out.qcow2")
    os.chown(top, 0, 0)
    os.chmod(top, 0o666)
    with pytest.raises(ChainError, match="writable"):
        await tool().check_chain(top, [top, d / "base.qcow2"])


async def test_a_virtual_size_beyond_the_limit_is_refused(d: Path) -> None:
    huge = d / "huge.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(huge), "10T")
    os.chmod(huge, 0o444)
    with pytest.raises(ChainError, match="virtual size"):
        await tool().flatten([huge], d / "out.qcow2")
    assert not (d / "out.qcow2").exists()


async def test_an_overlay_names_its_backing_without_opening_it(d: Path) -> None:
    out = d / "overlay.qcow2"
    # the backing is root-only: the tool could not open it, and does not need to
    os.chmod(d / "base.qcow2", 0o400)
    await tool().create_overlay(d / "base.qcow2", out, owner_uid=640_002, virtual_size=SIZE)
    st = os.stat(out)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (640_002, 0, 0o600)
    info = json.loads(subprocess.run(["qemu-img", "info", "-f", "qcow2", "--output=json", str(out)], check=True,
                                     capture_output=True).stdout)  # fmt: skip
    assert info["backing-filename"] == str(d / "base.qcow2") and info["virtual-size"] == SIZE
    with pytest.raises(FileExistsError):  # never writes over an existing file
        await tool().create_overlay(d / "base.qcow2", out, owner_uid=640_002, virtual_size=SIZE)


async def test_qemu_img_runs_unprivileged(d: Path) -> None:
    argv = tool().argv(["info"], fsize=0)
    assert f"--reuid={TOOL_UID}" in argv and "--no-new-privs" in argv and "--fsize=0" in argv
    root_only = d / "rootonly.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(root_only), str(SIZE))
    os.chmod(root_only, 0o600)
    with pytest.raises(ChainError):  # it cannot read what only root can
        await tool().check_chain(root_only, [root_only])
    os.chown(root_only, 0, 4_242_426)
    os.chmod(root_only, 0o440)
    with pytest.raises(ChainError):
        await tool().check_chain(root_only, [root_only])
    await tool().with_groups(4_242_426).check_chain(root_only, [root_only])  # a group it is given


async def test_raw_to_qcow2(d: Path) -> None:
    raw = d / "fs.raw"
    raw.write_bytes(b"\x43" * (1 << 20))
    os.chmod(raw, 0o600)
    await tool().convert_raw(raw, d / "fs.qcow2")
    assert read_all(d / "fs.qcow2") == b"\x43" * (1 << 20)
    assert os.stat(d / "fs.qcow2").st_uid == 0
