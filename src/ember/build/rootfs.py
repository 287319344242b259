"""Root filesystem trees on the host: Debian bases (mmdebstrap) and tree -> disk.

A tree becomes an ext4 filesystem (``mkfs.ext4 -d``, owners, modes and times
kept) in a qcow2 file. Built-in bases are Debian bookworm made by mmdebstrap
and cached as tarballs; these Docker Hub names never go to Docker Hub:
``debian:bookworm``, ``debian:bookworm-slim`` and ``python:3.11`` resolve to
these (other Docker Hub names are pulled, see ember.build.bases). Debian
bookworm ships Python 3.11 only.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ember.build.unpack import remove_tree
from ember.errors import HostSetupError
from ember.host.qemuimg import QemuImg

SLIM_EXCLUDES = ("/usr/share/man/*", "/usr/share/doc/*", "/usr/share/info/*", "/usr/share/locale/*")
PYTHON_PACKAGES = ("python3", "python3-pip", "python-is-python3", "ca-certificates")


@dataclass(frozen=True)
class DebianBase:
    key: str  # cache name
    packages: tuple[str, ...]
    slim: bool
    python: bool = False


BUILTIN = {
    "debian:bookworm": DebianBase("debian-bookworm", (), slim=False),
    "debian:bookworm-slim": DebianBase("debian-bookworm-slim", (), slim=True),
    "debian:12": DebianBase("debian-bookworm", (), slim=False),
    "debian:12-slim": DebianBase("debian-bookworm-slim", (), slim=True),
    "debian:latest": DebianBase("debian-bookworm", (), slim=False),
    "debian": DebianBase("debian-bookworm", (), slim=False),
    "ember:debian-python3": DebianBase("debian-bookworm-python3", ("python3",), slim=False),
}
PYTHON = DebianBase("python-3.11-bookworm", PYTHON_PACKAGES, slim=True, python=True)
PYTHON_TAGS = (
    "",
    "latest",
    "3",
    "3.11",
    "3-slim",
    "3.11-slim",
    "3-bookworm",
    "3.11-bookworm",
    "3-slim-bookworm",
    "3.11-slim-bookworm",
)


def builtin_base(ref: str) -> DebianBase | None:
    """The built-in base standing in for a Docker Hub reference, None if there is none."""
    ref = ref.removeprefix("docker.io/").removeprefix("library/")
    if ref in BUILTIN:
        return BUILTIN[ref]
    name, _, tag = ref.partition(":")
    if name == "python" and tag in PYTHON_TAGS:
        return PYTHON
    return None


async def debian_tarball(base: DebianBase, cache_dir: Path, mirror: str) -> Path:
    cache = cache_dir / f"{base.key}.tar"
    if cache.exists():
        return cache
    if shutil.which("mmdebstrap") is None:
        raise HostSetupError("mmdebstrap is missing: apt-get install mmdebstrap (scripts/install.sh does this)")
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_name(f".{cache.name}")  # mmdebstrap picks the format from the .tar suffix
    cmd = ["mmdebstrap", "--mode=root", "--variant=minbase", "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr"]
    if base.packages:
        cmd.append(f"--include={','.join(base.packages)}")
    if base.slim:
        cmd += [f"--dpkgopt=path-exclude={p}" for p in SLIM_EXCLUDES]
    if base.python:
        # Like the python image: pip installs into the system Python without a venv.
        cmd.append("--customize-hook=rm -f $1/usr/lib/python3*/EXTERNALLY-MANAGED")
    cmd += ["bookworm", str(partial), f"deb {mirror} bookworm main"]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "SOURCE_DATE_EPOCH": "1700000000"}, umask=0o022,  # a guest tree, not daemon state
    )  # fmt: skip
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        partial.unlink(missing_ok=True)
        tail = out.decode(errors="replace")[-3000:]
        raise HostSetupError(f"mmdebstrap failed (is the Debian mirror reachable?):\n{tail}")
    os.replace(partial, cache)
    return cache


def unpack_trusted(tarball: Path, tree: Path) -> None:
    """Unpack a tarball Ember made itself (mmdebstrap output)."""
    with tarfile.open(tarball) as tar:
        tar.extractall(tree, filter="fully_trusted")
    etc = tree / "etc"
    if etc.is_dir():
        # mmdebstrap copies the host's files in: a guest gets its own
        (etc / "resolv.conf").unlink(missing_ok=True)
        (etc / "resolv.conf").write_text("")
        (etc / "hostname").write_text("ember\n")
        for name in ("resolv.conf", "hostname"):
            os.chmod(etc / name, 0o644)  # world-readable in the guest, whatever the daemon's umask


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise HostSetupError(f"{cmd[0]} failed: {proc.stderr.strip()[-2000:]}")


def tree_to_qcow2(tree: Path, out: Path, size_gib: int, qemu_img: QemuImg | None = None) -> None:
    """An ext4 filesystem of ``tree`` (owners, modes, times kept) in a qcow2 file (blocking: run it
    in a worker thread). The conversion runs unprivileged through ``qemu_img``; without it (only
    images.py's base image, until it passes one) root converts, still naming the format."""
    raw = out.with_name(out.name + ".raw")
    try:
        _run(["mkfs.ext4", "-q", "-b", "4096", "-m", "0", "-E", "root_owner=0:0", "-d", str(tree), "-F", str(raw),
              f"{size_gib}G"])  # fmt: skip
        if qemu_img is not None:
            asyncio.run(qemu_img.convert_raw(raw, out))  # this worker thread's own loop
        else:
            _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out)])
    finally:
        raw.unlink(missing_ok=True)


def disk_from_tree(
    fill: Callable[[Path], None], out: Path, size_gib: int, work_parent: Path, qemu_img: QemuImg | None = None
) -> None:
    """A qcow2 disk holding the tree ``fill`` makes in a scratch directory under ``work_parent``."""
    tree = Path(tempfile.mkdtemp(dir=work_parent, prefix=".rootfs-"))
    try:
        fill(tree)
        tree_to_qcow2(tree, out, size_gib, qemu_img)
    finally:
        remove_tree(tree)


def disk_from_tarball(
    tarball: Path | None, out: Path, size_gib: int, work_parent: Path, qemu_img: QemuImg | None = None
) -> None:
    """A qcow2 disk holding an Ember-made tarball's tree (an empty filesystem for None)."""

    def fill(tree: Path) -> None:
        if tarball is not None:
            unpack_trusted(tarball, tree)

    disk_from_tree(fill, out, size_gib, work_parent, qemu_img)


def flatten(top: Path, out: Path) -> None:
    """One self-contained qcow2 from a single-file qcow2 Ember already flattened and checked
    (ember.host.qemuimg.QemuImg.flatten): images.py's copy into the image, until it moves to qemuimg."""
    _run(["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", str(top), str(out)])
