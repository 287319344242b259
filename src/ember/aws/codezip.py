"""A code artifact's zip unpacked into a build context, refusing what a hostile zip tries.

The zip is a tenant's: every byte of it may be an attack on the daemon, which is root. Python's ``zipfile``
parses it, but only after its end records have been read here (so no central directory larger than the
limits allow is ever loaded), and nothing is written until every entry has passed every check: a plain
relative name (no ``..``, no absolute path, no backslash, no control character, not deeper than
EMBER_TAR_MAX_DEPTH), no duplicate, no symbolic link, device, FIFO or socket, no encryption, declared sizes
within EMBER_TAR_MAX_FILE_BYTES per file and EMBER_MAX_BUILD_CONTEXT_BYTES in all, no entry expanding more
than EMBER_ZIP_MAX_RATIO times (zip bombs), and no two entries sharing bytes of the archive (overlapping
entries are how a small zip declares a huge total honestly). Each file is then written through
:class:`ember.build.unpack.Tree` (fd-relative, O_NOFOLLOW, O_EXCL) and must decompress to exactly its
declared size, and its CRC must match (``zipfile`` checks it at the end).
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import zipfile
import zlib
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ember.aws.errors import ValidationException
from ember.build.tarread import ArchiveError, TarLimits
from ember.build.unpack import DIR_FLAGS, Tree, remove_entry
from ember.errors import ResourceExhausted

if TYPE_CHECKING:
    from ember.config import Settings

EOCD, EOCD_LEN = b"PK\x05\x06", 22
LOCATOR64, LOCATOR64_LEN = b"PK\x06\x07", 20
EOCD64, EOCD64_LEN = b"PK\x06\x06", 56
LOCAL, LOCAL_LEN = b"PK\x03\x04", 30
MAX_COMMENT = 1 << 16
CD_BYTES_PER_ENTRY = 256  # central directory bytes allowed per allowed entry (46 + name + extra fields)
MAX_NAME = 4096  # bytes of one entry's name
RATIO_EXEMPT = 1 << 20  # entries expanding to less than this may have any ratio
ENCRYPTED = 0x1
CHUNK = 1 << 20
DOCKERFILE = "Dockerfile"
SPECIAL = {
    stat.S_IFLNK: "a symbolic link", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
}  # fmt: skip
HOW = "zip the directory that holds the Dockerfile and its files (e.g. 'cd app && zip -r ../app.zip .')"


@dataclass(frozen=True)
class ZipLimits:
    """What one code zip may hold; ``from_settings`` says which setting each comes from."""

    entries: int  # EMBER_ZIP_MAX_ENTRIES
    ratio: int  # EMBER_ZIP_MAX_RATIO
    total: int  # EMBER_MAX_BUILD_CONTEXT_BYTES: the declared sizes of all files together
    file: int  # EMBER_TAR_MAX_FILE_BYTES
    depth: int  # EMBER_TAR_MAX_DEPTH

    @classmethod
    def from_settings(cls, settings: Settings) -> ZipLimits:
        return cls(
            entries=settings.zip_max_entries, ratio=settings.zip_max_ratio, total=settings.max_build_context_bytes,
            file=settings.tar_max_file_bytes, depth=settings.tar_max_depth,
        )  # fmt: skip


@dataclass(frozen=True)
class Entry:
    info: zipfile.ZipInfo
    path: str  # clean and relative, no trailing slash
    directory: bool
    mode: int  # permission bits the file or directory gets


def refuse(what: str, fix: str = HOW) -> ValidationException:
    return ValidationException(f"the code artifact {what}: {fix}")


def _shown(name: str) -> str:
    return repr(name[:200])


def check_end_records(archive: BinaryIO, limits: ZipLimits) -> None:
    """Refuse a zip whose end records declare more entries or central directory bytes than the limits allow.

    They are found as ``zipfile`` finds them (the last 22 bytes, else the last signature within a comment's
    reach; then the zip64 locator and record before them), so the directory it loads is the one checked."""
    size = archive.seek(0, os.SEEK_END)
    if size < EOCD_LEN:
        raise refuse("is not a zip (too short)")
    archive.seek(size - EOCD_LEN)
    record = archive.read(EOCD_LEN)
    at = size - EOCD_LEN
    if record[:4] != EOCD or record[-2:] != b"\0\0":
        start = max(size - MAX_COMMENT - EOCD_LEN, 0)
        archive.seek(start)
        tail = archive.read()
        found = tail.rfind(EOCD)
        if found < 0 or len(tail) - found < EOCD_LEN:
            raise refuse("is not a zip (no end of central directory record)")
        at = start + found
        record = tail[found : found + EOCD_LEN]
    _, _, _, here, count, cd_size, _, _ = struct.unpack("<4s4H2LH", record)
    if at >= LOCATOR64_LEN + EOCD64_LEN:
        archive.seek(at - LOCATOR64_LEN)
        if archive.read(4) == LOCATOR64:
            archive.seek(at - LOCATOR64_LEN - EOCD64_LEN)
            record64 = archive.read(EOCD64_LEN)
            if record64[:4] == EOCD64:
                here, count, cd_size = struct.unpack("<4sQ2H2L4Q", record64)[6:9]
    if max(here, count) > limits.entries:
        raise refuse(f"declares {max(here, count)} entries, more than the {limits.entries} allowed "
                     "(EMBER_ZIP_MAX_ENTRIES)", "fewer files per zip, or ask the operator")  # fmt: skip
    if cd_size > limits.entries * CD_BYTES_PER_ENTRY:
        raise refuse(f"has a central directory of {cd_size} bytes, more than {limits.entries} entries need",
                     "shorter file names, or fewer files")  # fmt: skip


def plan(zf: zipfile.ZipFile, limits: ZipLimits) -> list[Entry]:
    """Every entry checked (names, kinds, sizes) before anything is written; refused as a whole otherwise."""
    infos = zf.infolist()
    if len(infos) > limits.entries:
        raise refuse(f"holds {len(infos)} entries, more than the {limits.entries} allowed (EMBER_ZIP_MAX_ENTRIES)",
                     "fewer files per zip, or ask the operator")  # fmt: skip
    seen: set[str] = set()
    total = 0
    entries = []
    for info in infos:
        entry = _entry(info, limits)
        if entry.path in seen:
            raise refuse(f"holds {_shown(entry.path)} twice", "zip each file once")
        seen.add(entry.path)
        if entry.directory:
            if info.file_size:
                raise refuse(f"has a directory entry with data ({_shown(info.orig_filename)})")
        else:
            total += info.file_size
            if total > limits.total:
                raise refuse(f"unpacks to more than {limits.total} bytes (EMBER_MAX_BUILD_CONTEXT_BYTES)",
                             "make the code smaller, or ask the operator")  # fmt: skip
        entries.append(entry)
    if not any(e.path == DOCKERFILE and not e.directory for e in entries):
        raise refuse("has no Dockerfile at its root", HOW)
    return entries


def _entry(info: zipfile.ZipInfo, limits: ZipLimits) -> Entry:
    name = info.orig_filename  # as stored: zipfile's filename is cut at a NUL
    shown = _shown(name)
    if any(ord(c) < 0x20 or c == "\x7f" for c in name):
        raise refuse(f"has an entry whose name holds a control character ({shown})")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME:
        raise refuse(f"has an entry whose name is longer than {MAX_NAME} bytes ({name[:100]!r}...)")
    if "\\" in name:
        raise refuse(f"has a name with a backslash ({shown})", "zip it with a tool that writes '/' between names")
    if name.startswith("/"):
        raise refuse(f"has an absolute name ({shown})", "names must be relative to the zip's root")
    directory = name.endswith("/")
    parts = (name[:-1] if directory else name).split("/")
    if ".." in parts:
        raise refuse(f"has a name that climbs out of its directory with '..' ({shown})")
    if any(p in ("", ".") for p in parts):
        raise refuse(f"has a name with an empty or '.' component ({shown})")
    if len(parts) > limits.depth:
        raise refuse(f"has a name deeper than {limits.depth} directories ({name[:100]!r}...) (EMBER_TAR_MAX_DEPTH)")
    if info.flag_bits & ENCRYPTED:
        raise refuse(f"holds an encrypted entry ({shown})", "zip it without a password")
    mode = info.external_attr >> 16  # the Unix mode, where the zip was made on Unix
    kind = stat.S_IFMT(mode)
    if kind in SPECIAL:
        raise refuse(f"holds {SPECIAL[kind]} ({shown}); only regular files and directories are unpacked",
                     "zip the files themselves (zip -r without -y stores what a link points to)")  # fmt: skip
    directory = directory or kind == stat.S_IFDIR
    if not directory:
        if info.file_size > limits.file:
            raise refuse(f"holds {shown} of {info.file_size} bytes, more than the {limits.file} allowed "
                         "(EMBER_TAR_MAX_FILE_BYTES)", "make it smaller, or ask the operator")  # fmt: skip
        if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
            raise refuse(f"stores {shown} with two different sizes ({info.compress_size} and {info.file_size})")
        if info.file_size >= RATIO_EXEMPT and info.file_size > info.compress_size * limits.ratio:
            raise refuse(f"holds {shown}, compressed more than {limits.ratio} times (EMBER_ZIP_MAX_RATIO): a zip "
                         "bomb?", "store such a file uncompressed, or generate it in the Dockerfile")  # fmt: skip
    perms = stat.S_IMODE(mode) & 0o777
    return Entry(info, "/".join(parts), directory, perms or (0o755 if directory else 0o644))


def check_layout(archive: BinaryIO, zf: zipfile.ZipFile, entries: list[Entry]) -> None:
    """Refuse entries whose bytes in the archive overlap each other or the central directory."""
    spans = []
    for e in entries:
        archive.seek(e.info.header_offset)
        head = archive.read(LOCAL_LEN)
        if len(head) < LOCAL_LEN or head[:4] != LOCAL:
            raise refuse(f"has no local header where its directory puts {_shown(e.info.orig_filename)} (corrupt?)")
        name_len, extra_len = struct.unpack("<2H", head[26:30])
        end = e.info.header_offset + LOCAL_LEN + name_len + extra_len + e.info.compress_size
        spans.append((e.info.header_offset, end, e.info.orig_filename))
    spans.sort()
    for (_, end, first), (start, _, second) in pairwise(spans):
        if start < end:
            raise refuse(f"has overlapping entries ({_shown(first)} and {_shown(second)}): a zip bomb?")
    if spans and spans[-1][1] > zf.start_dir:
        raise refuse(f"has an entry overlapping its central directory ({_shown(spans[-1][2])})")


def unpack(archive: BinaryIO, into: Path, settings: Settings) -> None:
    """Unpack the zip in ``archive`` into the empty directory ``into``; on any refusal ``into`` is left empty."""
    limits = ZipLimits.from_settings(settings)
    check_end_records(archive, limits)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, NotImplementedError, ValueError, EOFError, struct.error) as exc:
        raise refuse(f"is not a zip Ember can read ({_reason(exc)})", HOW) from None
    try:
        with zf:
            entries = plan(zf, limits)
            check_layout(archive, zf, entries)
            _write(zf, entries, into, TarLimits.from_settings(settings))
    except BaseException:
        _empty(into)
        raise


def _reason(exc: BaseException) -> str:
    return str(exc)[:200] or type(exc).__name__


def _write(zf: zipfile.ZipFile, entries: list[Entry], into: Path, tar_limits: TarLimits) -> None:
    entry: Entry | None = None
    try:
        with Tree(into, tar_limits) as tree:
            for entry in entries:
                with tree.parent(entry.path) as (fd, name):
                    if entry.directory:
                        _directory(fd, name, entry.mode)
                    else:
                        _file(zf, entry, fd, name)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceExhausted("the host disk is full: free space and retry") from None
        where = _shown(entry.path) if entry else "an entry"
        raise refuse(f"cannot be unpacked at {where} ({exc.strerror or type(exc).__name__})") from None
    except (ArchiveError, zipfile.BadZipFile, NotImplementedError, EOFError, zlib.error) as exc:
        where = _shown(entry.path) if entry else "an entry"
        raise refuse(f"cannot be unpacked at {where} ({_reason(exc)})") from None


def _directory(fd: int, name: str, mode: int) -> None:
    try:
        os.mkdir(name, 0o700, dir_fd=fd)
    except FileExistsError:
        if not stat.S_ISDIR(os.lstat(name, dir_fd=fd).st_mode):
            raise
    sub = os.open(name, DIR_FLAGS, dir_fd=fd)
    try:
        os.fchmod(sub, mode)
    finally:
        os.close(sub)


def _file(zf: zipfile.ZipFile, entry: Entry, fd: int, name: str) -> None:
    written = 0
    out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=fd)
    with os.fdopen(out, "wb") as f, zf.open(entry.info) as data:
        # zipfile stops at the declared size (more data fails its CRC check); less is refused here
        while chunk := data.read(CHUNK):
            written += len(chunk)
            f.write(chunk)
        os.fchmod(f.fileno(), entry.mode)
    if written != entry.info.file_size:
        raise refuse(f"declares {_shown(entry.path)} as {entry.info.file_size} bytes but it unpacks to {written}")


def _empty(into: Path) -> None:
    fd = os.open(into, DIR_FLAGS)
    try:
        for child in os.listdir(fd):
            remove_entry(fd, child)
    finally:
        os.close(fd)
