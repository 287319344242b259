"""Every ``qemu-img`` Ember runs: unprivileged, qcow2 only, on chains it names itself.

A qcow2 header is data its writer chose: a VMM (or a guest that escaped into
one) can point its disk's backing file at ``/etc/shadow``, add an external
data file, or replace the file with a VMDK descriptor whose FLAT extent is any
host file. So here:

- ``qemu-img`` never runs as root: as :attr:`QemuImg.uid` (a uid of its own,
  no capabilities, ``no_new_privs``, a file size limit), with only the groups a
  call grants, so a header can name only what that uid may read anyway;
- the format is always given (``-f qcow2``; ``-f raw`` only for the ext4
  images Ember made itself): nothing is probed;
- :meth:`QemuImg.check_chain` compares ``info --backing-chain`` with the exact
  chain the caller expects (file names, qcow2 on the ``file`` protocol, no
  external data file, no further backing, sane sizes) before anything reads
  data;
- :meth:`QemuImg.flatten` opens the chain through a ``json:`` file name that
  names every backing node and ends it with ``"backing": null``: no backing
  path written in a header is ever followed;
- files the tool writes are created by root, handed to the tool uid for the
  run, and handed back to root (then checked) when it is done.

Inputs must be files no VMM can write at the time (root-owned, not group- or
world-writable: checked), or a check would race with the writer. Every run
has a host deadline; a cancelled or late run is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ember.config import Settings
from ember.errors import HostSetupError, VmmError, logged

MAX_INFO_BYTES = 1 << 20  # `info --backing-chain` of a chain Ember accepts is a few KiB
MAX_CHAIN = 256  # layers in one chain (a Dockerfile's filesystem steps plus its base)
QCOW2_OVERHEAD = 1 / 64  # metadata a flattened qcow2 may add to its data (L2 tables, refcounts)


class ChainError(VmmError):
    """A disk is not the qcow2 chain Ember expects (a VMM may have rewritten its header)."""


@dataclass(frozen=True)
class ChainNode:
    path: Path
    virtual_size: int
    actual_size: int


@dataclass(frozen=True)
class QemuImg:
    """How Ember runs ``qemu-img``: the binary, the uid and groups it runs as, limits."""

    uid: int
    gid: int
    timeout_s: float
    max_virtual_size: int  # largest virtual disk size a checked chain may have
    groups: tuple[int, ...] = ()
    binary: str = field(default_factory=lambda: shutil.which("qemu-img") or "qemu-img")

    @classmethod
    def of(cls, settings: Settings) -> QemuImg:
        return cls(
            uid=settings.qemu_img_uid, gid=settings.qemu_img_uid, timeout_s=settings.qemu_img_timeout_s,
            max_virtual_size=settings.disk_gib << 30,
        )  # fmt: skip

    def with_groups(self, *gids: int) -> QemuImg:
        """The same tool with read access through ``gids`` (e.g. an image's group, the layer group)."""
        return replace(self, groups=tuple(sorted({*self.groups, *gids})))

    # ---- the runs ----------------------------------------------------------

    def argv(self, args: Sequence[str], *, fsize: int) -> list[str]:
        """``qemu-img args`` as the tool uid: no capabilities, no_new_privs, files at most ``fsize`` bytes."""
        setpriv, prlimit = shutil.which("setpriv"), shutil.which("prlimit")
        if setpriv is None or prlimit is None:
            raise HostSetupError("setpriv and prlimit are missing: apt-get install util-linux")
        groups = ["--groups", ",".join(map(str, self.groups))] if self.groups else ["--clear-groups"]
        return [
            setpriv, f"--reuid={self.uid}", f"--regid={self.gid}", *groups, "--no-new-privs", "--inh-caps=-all",
            "--bounding-set=-all", "--", prlimit, f"--fsize={fsize}", "--nofile=64", "--", self.binary, *args,
        ]  # fmt: skip

    async def run(self, args: Sequence[str], what: str, *, fsize: int = 0, fds: Sequence[int] = ()) -> bytes:
        """Run ``qemu-img args`` within the deadline (killed past it or when cancelled), with ``fds``
        open in it under their own numbers; its stdout (at most MAX_INFO_BYTES)."""
        proc = await asyncio.create_subprocess_exec(
            *self.argv(args, fsize=fsize), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env={}, cwd="/", start_new_session=True, pass_fds=tuple(fds),
        )  # fmt: skip
        try:
            async with asyncio.timeout(self.timeout_s):
                out, err = await asyncio.gather(_read_capped(proc.stdout), _read_capped(proc.stderr))
                await proc.wait()
        except TimeoutError:
            raise VmmError(f"{what} did not finish within {self.timeout_s:.0f} s (EMBER_QEMU_IMG_TIMEOUT)") from None
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if proc.returncode != 0:
            raise VmmError(logged(f"{what} failed", err.decode(errors="replace").strip()[-2000:]))
        return out

    # ---- what Ember asks of it ---------------------------------------------

    async def check_chain(self, path: Path, expected: Sequence[Path]) -> list[ChainNode]:
        """The chain under ``path`` (``path`` first; every file absolute, root-owned and written by
        no one else), refused with ChainError unless its headers name exactly ``expected``.

        Each file is handed over open and described on its own (``info`` without following its
        backing file), and its header's backing name compared with the next file Ember expects:
        no path a header names is ever opened (``info --backing-chain`` would open them, by name,
        which also needs every directory on the way open to the tool uid)."""
        if not expected or expected[0] != path or len(expected) > MAX_CHAIN:
            raise ValueError("the expected chain must start with the path checked")
        with _open_inputs(expected) as fds:
            try:
                infos = await asyncio.gather(*(
                    self.run(["info", "-f", "qcow2", "--output=json", _fd_path(fd)], "checking a disk", fds=[fd])
                    for fd in fds
                ))  # fmt: skip
            except VmmError as exc:
                raise ChainError(logged("the disk is not the qcow2 chain Ember made", str(exc))) from None
        return parse_chain(infos, expected, [Path(_fd_path(fd)) for fd in fds], self.max_virtual_size)

    async def create_overlay(
        self, backing: Path, out: Path, *, owner_uid: int, virtual_size: int, owner_gid: int = 0, mode: int = 0o600
    ) -> None:
        """A new qcow2 ``out`` (must not exist) backed by ``backing``, owned by ``owner_uid``.

        ``backing`` is named in its header, never opened here (``-u``): whoever opens ``out``
        opens it, with their own rights. ``virtual_size`` is the backing disk's."""
        if not 0 < virtual_size <= self.max_virtual_size:
            raise ChainError(f"a disk of {virtual_size} bytes is not one Ember makes")
        if not backing.is_absolute():
            raise ValueError("the backing file must be an absolute path")
        with self._output(out) as fd:
            await self.run(["create", "-q", "-f", "qcow2", "-u", "-b", str(backing), "-F", "qcow2", _fd_path(fd),
                            str(virtual_size)], "creating the disk overlay", fsize=1 << 20, fds=[fd])  # fmt: skip
            os.fchown(fd, owner_uid, owner_gid)
            os.fchmod(fd, mode)

    async def flatten(self, chain: Sequence[Path], out: Path) -> None:
        """One self-contained qcow2 ``out`` (must not exist; root-owned 0600 after) holding the data
        of ``chain`` (top first), which is checked first; refused (and ``out`` removed) otherwise.
        The data is read through open files and a pinned chain: no header's backing name is used."""
        nodes = await self.check_chain(chain[0], chain)
        size = nodes[0].virtual_size
        fsize = int(size * (1 + QCOW2_OVERHEAD)) + (64 << 20)
        with _open_inputs(chain) as fds, self._output(out) as fd:
            target = _fd_path(fd)
            await self.run(["create", "-q", "-f", "qcow2", target, str(size)], "creating the image disk",
                           fsize=fsize, fds=[fd])  # fmt: skip
            await self.run(["convert", "-n", "--target-is-zero", "-f", "qcow2", "-O", "qcow2",
                            pinned_chain([Path(_fd_path(f)) for f in fds]), target], "flattening the disk",
                           fsize=fsize, fds=[*fds, fd])  # fmt: skip
            await self._check_output(fd)

    async def convert_raw(self, raw: Path, out: Path) -> None:
        """A qcow2 ``out`` (must not exist; root-owned 0600 after) of ``raw``, an ext4 image Ember made."""
        with _open_inputs([raw], group=self.gid) as fds, self._output(out) as fd:
            size = os.fstat(fds[0]).st_size
            await self.run(["convert", "-f", "raw", "-O", "qcow2", _fd_path(fds[0]), _fd_path(fd)],
                           "converting the disk", fsize=int(size * (1 + QCOW2_OVERHEAD)) + (64 << 20),
                           fds=[*fds, fd])  # fmt: skip
            await self._check_output(fd)

    @contextlib.contextmanager
    def _output(self, out: Path) -> Iterator[int]:
        """``out`` created by root (it must not exist) and open, the tool's while the block runs,
        root's 0600 after; removed if the block fails."""
        fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchown(fd, self.uid, self.gid)
            yield fd
            if os.fstat(fd).st_gid == self.gid:
                os.fchown(fd, 0, 0)
                os.fchmod(fd, 0o600)
        except BaseException:
            out.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)

    async def _check_output(self, fd: int) -> None:
        """The file the tool wrote is a qcow2 without backing or data file (root's by then: the
        tool only reads it, through its group)."""
        os.fchown(fd, 0, self.gid)
        os.fchmod(fd, 0o440)
        info = await self.run(["info", "-f", "qcow2", "--output=json", _fd_path(fd)], "checking the new disk",
                              fds=[fd])  # fmt: skip
        parse_chain([info], [Path(_fd_path(fd))], [Path(_fd_path(fd))], self.max_virtual_size)


def _fd_path(fd: int) -> str:
    return f"/dev/fd/{fd}"


@contextlib.contextmanager
def _open_inputs(paths: Sequence[Path], *, group: int | None = None) -> Iterator[list[int]]:
    """``paths`` open read-only (no symlink followed); each must be a regular file owned by root
    that no one else can write (so no VMM changes it while it is checked and read). ``group``:
    hand the file to that group (0640) for the run, for files only root could read."""
    fds: list[int] = []
    try:
        for path in paths:
            if not path.is_absolute():
                raise ValueError("chain files must be absolute paths")
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError as exc:
                raise ChainError(logged("a disk of the chain cannot be opened", f"{path}: {exc}")) from None
            fds.append(fd)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
                raise ChainError(logged("a disk of the chain is writable by a VMM", f"{path}: {st}"))
            if group is not None:
                os.fchown(fd, 0, group)
                os.fchmod(fd, 0o640)
        yield fds
    finally:
        for fd in fds:
            os.close(fd)


def pinned_chain(chain: Sequence[Path]) -> str:
    """A ``json:`` file name opening ``chain`` (top first) as qcow2 on plain files, each backing
    named here and the last one without any: the headers' backing names are never used."""
    node: dict[str, Any] | None = None
    for path in reversed(chain):
        node = {"driver": "qcow2", "file": {"driver": "file", "filename": str(path)}, "backing": node}
    return "json:" + json.dumps(node, separators=(",", ":"))


def parse_chain(
    infos: Sequence[bytes], expected: Sequence[Path], opened_as: Sequence[Path], max_virtual_size: int
) -> list[ChainNode]:
    """``info --output=json`` of each file of a chain (``expected``, top first, each opened as
    ``opened_as``), refused unless each is a plain qcow2 whose header names the next as its backing."""
    nodes = []
    for i, (info, path, opened) in enumerate(zip(infos, expected, opened_as, strict=True)):
        try:
            item = json.loads(info)
        except ValueError:
            raise ChainError("qemu-img info did not answer JSON") from None
        backing = expected[i + 1] if i + 1 < len(expected) else None
        nodes.append(_node(item, path, opened, backing, max_virtual_size=max_virtual_size))
    if any(n.virtual_size != nodes[0].virtual_size for n in nodes):
        raise ChainError("the disks of the chain have different sizes")
    return nodes


def _node(item: Any, path: Path, opened: Path, backing: Path | None, *, max_virtual_size: int) -> ChainNode:
    where = f"layer {path.name}"
    if not isinstance(item, dict):
        raise ChainError(f"{where}: not described by qemu-img")
    if item.get("format") != "qcow2" or item.get("filename") != str(opened):
        raise ChainError(f"{where}: not a qcow2 file")
    specific = item.get("format-specific", {}).get("data", {})
    if not isinstance(specific, dict) or "data-file" in specific or "encrypt" in specific:
        raise ChainError(f"{where}: has an external data file or encryption")
    children = item.get("children", [])
    if [c.get("name") for c in children] != ["file"] or children[0].get("info", {}).get("format") != "file":
        raise ChainError(f"{where}: is not a qcow2 file on a plain host file")
    if backing is None and ("backing-filename" in item or "backing-filename-format" in item):
        raise ChainError(f"{where}: has a backing file where the chain must end")
    if backing is not None and (
        item.get("backing-filename") != str(backing) or item.get("backing-filename-format") != "qcow2"
    ):
        raise ChainError(f"{where}: its header names another backing file than the chain Ember made")
    size, actual = item.get("virtual-size"), item.get("actual-size", 0)
    if not isinstance(size, int) or not 0 < size <= max_virtual_size or not isinstance(actual, int):
        raise ChainError(f"{where}: a virtual size of {size!r} bytes is not one Ember makes")
    return ChainNode(path, size, actual)


async def _read_capped(stream: asyncio.StreamReader | None) -> bytes:
    """Read all of ``stream``, keeping at most MAX_INFO_BYTES (qemu-img's own output is small)."""
    assert stream is not None
    kept = bytearray()
    while chunk := await stream.read(1 << 16):
        if len(kept) < MAX_INFO_BYTES:
            kept += chunk[: MAX_INFO_BYTES - len(kept)]
    return bytes(kept)
