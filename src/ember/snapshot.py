"""Snapshot directories: atomic, checksummed, refused when damaged.

A snapshot is a directory holding VMM state, optional RAM and disk files, and
``manifest.json`` (SHA-256 and size of every file, the exact machine config,
QEMU's version). It is assembled in a temporary sibling directory, every file
and the directory are fsynced, and only then is it renamed into place, so a
crash leaves either the old snapshot or the new one, never a mix.

Migration streams are hashed while they flow (QEMU -> pipe -> hasher -> file,
and back on restore), so integrity costs no extra pass over the data; a
mismatch found at the end of a restore stops the VM before it ever runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import mmap
import os
import shutil
import stat
import struct
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import xxhash

from ember.errors import ResourceExhausted, SnapshotError, VmmError, logged
from ember.models import FileDigest, utcnow
from ember.vmm.machine import MachineConfig
from ember.vmm.qemu import Vmm

MANIFEST = "manifest.json"
FORMAT = 1
BUF = 1024 * 1024


@dataclass(frozen=True)
class Snapshot:
    """A snapshot directory and the files it names: VMM device state, guest RAM (an image's
    template, or a suspended VM's own RAM file), the disk, and the manifest that lists them.
    The only place these names are spelled."""

    STATE: ClassVar[str] = "state"
    RAM: ClassVar[str] = "ram"
    DISK: ClassVar[str] = "disk.qcow2"
    # A VM's own files: they move into its suspend snapshot and back out on resume.
    VM_FILES: ClassVar[tuple[str, str]] = (DISK, RAM)

    path: Path

    @property
    def state(self) -> Path:
        return self.path / self.STATE

    @property
    def ram(self) -> Path:
        return self.path / self.RAM

    @property
    def disk(self) -> Path:
        return self.path / self.DISK

    @property
    def manifest_file(self) -> Path:
        return self.path / MANIFEST

    @property
    def saved_file(self) -> Path:
        """A suspend's manifest before its VM's files are in (see runtime.finish_suspend)."""
        return self.path / "saved.json"

    def load(self) -> SnapshotManifest:
        return load_manifest(self.path)

    def write_saved(self, partial: SnapshotManifest) -> None:
        self.saved_file.write_text(partial.to_json())
        durable([self.saved_file, self.path])

    def write(self, manifest: SnapshotManifest) -> None:
        write_manifest(self.path, manifest)


@dataclass(frozen=True)
class SnapshotManifest:
    kind: str  # "image" or "suspend"
    machine: MachineConfig
    files: dict[str, FileDigest]
    ignore_shared: bool
    created_at: str
    # Where guest RAM starts in the RAM file: 0 for a plain RAM file; a QEMU mapped-ram file (a
    # clone's first suspend) keeps its header before the pages and serves as the VM's RAM file after.
    ram_offset: int = 0
    mapped_ram: bool = False  # the RAM file holds the whole migration stream (no separate state file)

    def to_json(self) -> str:
        data = asdict(self)
        data["machine"] = json.loads(self.machine.to_json())
        data["format"] = FORMAT
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, raw: str) -> SnapshotManifest:
        data = json.loads(raw)
        if data.get("format") != FORMAT:
            raise SnapshotError(f"unsupported snapshot format {data.get('format')!r}")
        return cls(
            kind=data["kind"],
            machine=MachineConfig.from_json(json.dumps(data["machine"])),
            files={k: FileDigest(**v) for k, v in data["files"].items()},
            ignore_shared=bool(data["ignore_shared"]),
            created_at=data["created_at"],
            ram_offset=int(data.get("ram_offset", 0)),
            mapped_ram=bool(data.get("mapped_ram", False)),
        )


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


TREE_CHUNK = 1024 * 1024
_ZEROS = bytes(TREE_CHUNK)
_hashers = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="ember-hash")

# How the chunks of a sparse file are summed (the list of sums is then hashed with SHA-256):
SHA256 = "sha256"  # cryptographic: files a VMM could have written, or that leave root's hands
# 128-bit xxh3, ~6x faster here: for files only root can write (a suspended VM's RAM and disk once
# its VMM is gone, image templates, cached layers), where the check is for damage (bit rot, torn
# or lost writes, a mix-up of files), not for forgery: a forger would need root already.
XXH3 = "xxh3-128"
_CHUNK_SUMS: dict[str, Callable[[bytes], bytes]] = {
    SHA256: lambda data: hashlib.sha256(data).digest(),
    XXH3: lambda data: xxhash.xxh3_128_digest(data),
}


@functools.cache
def _zeros_digest(algo: str, length: int) -> bytes:
    return _CHUNK_SUMS[algo](bytes(length))


def _chunk_digest(fd: int, offset: int, length: int, algo: str) -> bytes:
    try:
        if os.lseek(fd, offset, os.SEEK_DATA) >= offset + length:
            return _zeros_digest(algo, length)  # all hole
    except OSError as exc:
        if exc.errno != errno.ENXIO:  # ENXIO: nothing but holes from here on
            raise
        return _zeros_digest(algo, length)
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise SnapshotError("a file shrank while it was being hashed")
    if data == _ZEROS[:length]:  # a memcmp, far cheaper than hashing: most of a guest's RAM is zero
        return _zeros_digest(algo, length)
    return _CHUNK_SUMS[algo](data)


def hash_file(path: Path, sparse: bool = False, *, algo: str = SHA256) -> FileDigest:
    """SHA-256 of a file.

    ``sparse`` (guest RAM files and disks: large, mostly never written) gives the
    SHA-256 of the list of the sums (``algo``: SHA-256 or xxh3-128) of its 1 MiB
    chunks, computed on every core; a chunk that is all hole is not read (its sum
    is that of zeros, exactly what reading it would give). The result depends only
    on the file's bytes, not on how the filesystem or page cache lays them out.
    """
    if algo not in _CHUNK_SUMS or (algo != SHA256 and not sparse):
        raise SnapshotError(f"unknown file digest {algo!r}")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        h = hashlib.sha256()
        if not sparse:
            while chunk := os.read(fd, BUF):
                h.update(chunk)
            return FileDigest(h.hexdigest(), size)
        offsets = range(0, size, TREE_CHUNK)
        for digest in _hashers.map(lambda off: _chunk_digest(fd, off, min(TREE_CHUNK, size - off), algo), offsets):
            h.update(digest)
        return FileDigest(h.hexdigest(), size, sparse=True, algo=algo)
    finally:
        os.close(fd)


_PAGE = mmap.PAGESIZE


def _data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: only a hole is left
                raise
            return
        offset = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, offset


def _copy_nonzero_pages(src: int, dst: int, start: int, end: int) -> None:
    for chunk in range(start, end, TREE_CHUNK):
        data = os.pread(src, min(TREE_CHUNK, end - chunk), chunk)
        if data == _ZEROS[: len(data)]:
            continue
        run = -1  # where the current run of non-zero pages starts
        for page in range(0, len(data) + _PAGE, _PAGE):
            zero = page >= len(data) or data[page : page + _PAGE] == _ZEROS[:_PAGE]
            if not zero and run < 0:
                run = page
            elif zero and run >= 0:
                os.pwrite(dst, data[run:page], chunk + run)
                run = -1


def rewrite_copy(path: Path, *, zero_pages_to_holes: bool, gid: int = 0, mode: int = 0o600) -> None:
    """Replace the regular file ``path`` by a new inode root writes with the same bytes, owned
    root:``gid`` with ``mode``: holes stay holes (data copied in the kernel), and with
    ``zero_pages_to_holes`` all-zero pages become holes too. Whoever held the old file open (a
    VMM that wrote it) keeps the old inode, which is no longer ``path``."""
    src = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    tmp = path.with_name(f".{path.name}.copy")
    tmp.unlink(missing_ok=True)
    try:
        st = os.fstat(src)
        if not stat.S_ISREG(st.st_mode):
            raise SnapshotError(logged("a file to copy is not a regular file", str(path)))
        dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o400)
        try:
            for start, end in _data_extents(src, st.st_size):
                if zero_pages_to_holes:
                    _copy_nonzero_pages(src, dst, start, end)
                    continue
                while start < end:
                    copied = os.copy_file_range(src, dst, end - start, start, start)
                    if copied <= 0:
                        raise SnapshotError(logged("a file shrank while it was copied", str(path)))
                    start += copied
            os.ftruncate(dst, st.st_size)
            os.fchown(dst, 0, gid)
            os.fchmod(dst, mode)
            os.fsync(dst)
        finally:
            os.close(dst)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(src)


def _disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def raise_storage(exc: OSError, what: str) -> None:
    if _disk_full(exc):
        raise ResourceExhausted(f"{what} failed: the host disk is full; free space and retry") from exc
    raise SnapshotError(logged(f"{what} failed ({exc.strerror or type(exc).__name__})", str(exc))) from exc


class StreamTap:
    """A pipe whose far end is handed to QEMU; a thread hashes what crosses it.

    ``StreamTap.sink(path)``: QEMU writes into :attr:`fd`, the thread writes
    ``path``. ``StreamTap.source(path)``: the thread reads ``path`` into the
    pipe, QEMU reads :attr:`fd`. :meth:`finish` joins and returns the digest.
    """

    def __init__(self, path: Path, writing: bool, limit: int = 0) -> None:
        self.path = path
        self._limit = limit  # a sink takes at most this many bytes (a VMM chooses what it streams)
        r, w = os.pipe2(os.O_CLOEXEC)
        self.fd, own = (w, r) if writing else (r, w)
        self._hash = hashlib.sha256()
        self._size = 0
        self._error: BaseException | None = None
        self._writing = writing
        self._thread = threading.Thread(target=self._run, args=(own, writing), daemon=True)
        self._thread.start()

    @classmethod
    def sink(cls, path: Path, *, limit: int) -> StreamTap:
        """A stream QEMU writes, cut off (and failed) past ``limit`` bytes."""
        return cls(path, writing=True, limit=limit)

    @classmethod
    def source(cls, path: Path) -> StreamTap:
        return cls(path, writing=False)

    def _run(self, own: int, writing: bool) -> None:
        try:
            if writing:
                with open(self.path, "wb") as out:
                    while chunk := os.read(own, BUF):
                        self._hash.update(chunk)
                        self._size += len(chunk)
                        if self._size > self._limit:  # closing our end fails QEMU's migration too
                            raise SnapshotError(f"the VMM's state stream passed {self._limit} bytes")
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
            else:
                reader_gone = False  # QEMU stops reading a stream it rejects: keep hashing
                with open(self.path, "rb") as src:
                    while chunk := src.read(BUF):
                        self._hash.update(chunk)
                        self._size += len(chunk)
                        view = memoryview(chunk)
                        while view and not reader_gone:
                            try:
                                view = view[os.write(own, view) :]
                            except BrokenPipeError:
                                reader_gone = True
        except BaseException as exc:  # reported by finish()
            self._error = exc
        finally:
            os.close(own)

    def close_fd(self) -> None:
        """Drop our copy of QEMU's end (after QEMU received it)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def finish(self, timeout: float = 120) -> FileDigest:
        self.close_fd()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise SnapshotError(f"stream {self.path.name} did not finish")
        if isinstance(self._error, OSError):
            raise_storage(self._error, f"{'writing' if self._writing else 'reading'} {self.path.name}")
        if isinstance(self._error, SnapshotError):
            raise self._error
        if self._error is not None:
            raise SnapshotError(logged(f"stream {self.path.name} failed", f"{self.path}: {self._error!r}"))
        return FileDigest(self._hash.hexdigest(), self._size)


@contextlib.asynccontextmanager
async def staging(final: Path) -> AsyncIterator[Path]:
    """Yield a temporary sibling of ``final``; on success it atomically becomes ``final``
    (its fsyncs and renames run off the event loop)."""
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(mode=0o700, parents=True)
    try:
        yield tmp
        await asyncio.to_thread(commit, tmp, final)
    except BaseException:
        await asyncio.to_thread(shutil.rmtree, tmp, True)
        raise


def commit(tmp: Path, final: Path) -> None:
    durable([*tmp.iterdir(), tmp])
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_manifest(directory: Path, manifest: SnapshotManifest) -> None:
    (directory / MANIFEST).write_text(manifest.to_json())


def new_manifest(
    kind: str, machine: MachineConfig, files: dict[str, FileDigest], ignore_shared: bool, *, ram_offset: int = 0,
    mapped_ram: bool = False,
) -> SnapshotManifest:  # fmt: skip
    return SnapshotManifest(
        kind=kind, machine=machine, files=files, ignore_shared=ignore_shared, created_at=utcnow(),
        ram_offset=ram_offset, mapped_ram=mapped_ram,
    )  # fmt: skip


def stream_limit(memory_mib: int) -> int:
    """The most a VMM may write as one saved state: all of guest RAM and room for devices."""
    return (memory_mib + 64) << 20


MAPPED_RAM_HEADER = struct.Struct(">IQQQ")  # version, page size, bitmap offset, pages offset (QEMU's MappedRamHeader)
MAPPED_RAM_SCAN = 1 << 20  # the header sits in the stream's first MiB (block list, one RAM block)


def mapped_ram_offset(path: Path, ram_bytes: int) -> int:
    """Where the guest pages start in a ``mapped-ram`` migration file of a guest with ``ram_bytes``
    of RAM (the ``pages_offset`` of its ``mem`` block's header). The file was written by a VMM, so
    the answer is bounded: page-aligned, inside the file, leaving room for all of guest RAM; a
    wrong one could only misplace that VM's own memory."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        head, size = os.pread(fd, MAPPED_RAM_SCAN, 0), os.fstat(fd).st_size
    finally:
        os.close(fd)
    block = head.find(b"\x03mem" + struct.pack(">Q", ram_bytes))
    found = head.find(struct.pack(">IQ", 1, mmap.PAGESIZE), block) if block >= 0 else -1
    if found < 0 or found + MAPPED_RAM_HEADER.size > len(head):
        raise SnapshotError(logged("the suspended VM's RAM file has no mapped-ram header", str(path)))
    _, _, _, offset = MAPPED_RAM_HEADER.unpack_from(head, found)
    if offset % mmap.PAGESIZE or not 0 < offset <= size - ram_bytes:
        raise SnapshotError(logged("the suspended VM's RAM file has a bad mapped-ram header", f"{path}: {offset}"))
    return int(offset)


def load_manifest(directory: Path) -> SnapshotManifest:
    """Read and sanity-check a manifest; every listed file must exist with its size."""
    path = directory / MANIFEST
    try:
        manifest = SnapshotManifest.from_json(path.read_text())
    except FileNotFoundError:
        raise SnapshotError(
            logged("the snapshot is incomplete (no manifest): it cannot be restored", str(path))
        ) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise SnapshotError(logged("the snapshot's manifest is corrupt", f"{path}: {exc!r}")) from None
    for name, digest in manifest.files.items():
        if "/" in name or name.startswith("."):
            raise SnapshotError(logged(f"the snapshot's manifest names a bad file {name!r}", str(path)))
        try:
            size = (directory / name).stat().st_size
        except FileNotFoundError:
            raise SnapshotError(
                logged(f"the snapshot is missing {name}: it cannot be restored", str(directory))
            ) from None
        if size != digest.size:
            raise SnapshotError(
                logged(f"snapshot file {name} is {size} bytes, the manifest says {digest.size}: it is damaged",
                       str(directory))
            )  # fmt: skip
    return manifest


def verify_files(manifest: SnapshotManifest, paths: dict[str, Path]) -> None:
    """Check the named manifest entries against the files at ``paths``."""
    for name, path in paths.items():
        expected = manifest.files[name]
        check_digest(path, expected, hash_file(path, expected.sparse, algo=expected.algo))


_SYS_CACHESTAT = 451  # x86_64, Linux >= 6.5


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("cache", "dirty", "writeback", "evicted", "recently_evicted")]


def unwritten_bytes(path: Path) -> int | None:
    """Bytes of ``path`` still to reach the disk (dirty or under writeback); None if
    the kernel cannot tell (``cachestat`` needs Linux 6.5)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        stat, whole = _Cachestat(), _CachestatRange(0, 0)
        if libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(whole), ctypes.byref(stat), 0) != 0:
            return None
        return int(stat.dirty + stat.writeback) * mmap.PAGESIZE
    finally:
        os.close(fd)


def durable(paths: list[Path]) -> None:
    for path in paths:
        fsync_path(path)


def check_digest(path: Path, expected: FileDigest, actual: FileDigest) -> None:
    if expected != actual:
        raise SnapshotError(logged(f"snapshot file {path.name} fails its SHA-256 check: it is damaged", str(path)))


async def save_streamed(
    vmm: Vmm, path: Path, *, ignore_shared: bool, memory_mib: int, deadline_s: float, what: str
) -> FileDigest:
    """Save a VMM's state into ``path`` through a hashing tap (the twin of :func:`load_verified`):
    at most ``stream_limit(memory_mib)`` bytes, the migration within ``deadline_s``."""
    tap = StreamTap.sink(path, limit=stream_limit(memory_mib))
    try:
        async with migration_deadline(deadline_s, what):
            await vmm.save_state(tap.fd, ignore_shared)
    finally:
        digest = await asyncio.to_thread(tap.finish)
    return digest


async def load_verified(vmm: Vmm, path: Path, expected: FileDigest, ignore_shared: bool) -> None:
    """Stream a saved state into a paused VMM, checking its SHA-256 on the way.

    The guest has not run when this returns or raises: a damaged file is
    reported as damaged (even when QEMU gave up on it first) and the caller
    must not resume the VMM.
    """
    tap = StreamTap.source(path)
    try:
        await vmm.load_state(tap.fd, ignore_shared)
    except BaseException:
        check_digest(path, expected, tap.finish())
        raise
    check_digest(path, expected, tap.finish())


@contextlib.asynccontextmanager
async def migration_deadline(limit_s: float, what: str) -> AsyncIterator[None]:
    """A host deadline on a migration (saving or loading a VM's state): a VMM that stops
    making progress cannot hold a VM's lock forever."""
    try:
        async with asyncio.timeout(limit_s):
            yield
    except TimeoutError:
        raise VmmError(f"{what} did not finish within {limit_s:.0f} s (EMBER_MIGRATION_TIMEOUT)") from None
