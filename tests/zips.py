"""Code-artifact zips for the tests: good ones (zipfile) and hostile ones, written byte by byte so every field
(names, flags, modes, declared sizes, offsets, counts) says what the attack needs."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass

DOCKERFILE = b"FROM debian\nCOPY app.py /app.py\nCMD python3 /app.py\n"
UTF8 = 0x800


def good_zip(files: dict[str, bytes] | None = None) -> bytes:
    """A zip as `zip -r` makes it: a Dockerfile at the root, a file, a directory, an executable."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in (files or {"Dockerfile": DOCKERFILE, "app.py": b"print(42)\n"}).items():
            z.writestr(name, data)
        z.writestr(zipfile.ZipInfo("lib/"), b"")
        run = zipfile.ZipInfo("lib/run.sh")
        run.external_attr = 0o100755 << 16
        z.writestr(run, b"#!/bin/sh\necho hi\n")
    return out.getvalue()


@dataclass(frozen=True)
class Raw:
    name: bytes
    data: bytes = b""  # the uncompressed content
    deflate: bool = False
    size: int | None = None  # the declared uncompressed size (default: the content's)
    crc: int | None = None  # default: the content's
    flags: int = UTF8
    mode: int = 0o100644  # the Unix mode in the external attributes
    offset: int | None = None  # where the directory says its local header is (default: where it is)
    local: bool = True  # False: in the central directory only


def local_record(e: Raw) -> bytes:
    stored = _stored(e)
    size = min(_size(e), 0xFFFFFFFF)
    head = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, e.flags, _method(e), 0, 0x21, _crc(e), len(stored), size,
                       len(e.name), 0)  # fmt: skip
    return head + e.name + stored


def raw_zip(entries: list[Raw], *, count: int | None = None) -> bytes:
    """A zip of ``entries``; ``count`` overrides the number of entries its end record declares."""
    out, directory = bytearray(), bytearray()
    for e in entries:
        at = len(out)
        if e.local:
            out += local_record(e)
        size = _size(e)
        extra = struct.pack("<2HQ", 1, 8, size) if size >= 0xFFFFFFFF else b""  # zip64: the real size
        directory += struct.pack(
            "<4s6H3L5H2L", b"PK\x01\x02", 0x031E, 45 if extra else 20, e.flags, _method(e), 0, 0x21, _crc(e),
            len(_stored(e)), min(size, 0xFFFFFFFF), len(e.name), len(extra), 0, 0, 0, e.mode << 16,
            at if e.offset is None else e.offset,
        ) + e.name + extra  # fmt: skip
    n = len(entries) if count is None else count
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, n, n, len(directory), len(out), 0)
    return bytes(out + directory + end)


def _stored(e: Raw) -> bytes:
    if not e.deflate:
        return e.data
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(e.data) + c.flush()


def _size(e: Raw) -> int:
    return len(e.data) if e.size is None else e.size


def _crc(e: Raw) -> int:
    return zlib.crc32(e.data) if e.crc is None else e.crc


def _method(e: Raw) -> int:
    return 8 if e.deflate else 0


DOCKER = Raw(b"Dockerfile", DOCKERFILE)


def overlapping() -> bytes:
    """'b' lies inside 'a''s stored bytes: two entries, one copy of the data (the overlapping zip bomb)."""
    b = Raw(b"b", b"x" * 1000)
    inner = local_record(b)
    a_data_at = len(local_record(DOCKER)) + 30 + len(b"a")
    return raw_zip([DOCKER, Raw(b"a", inner), Raw(b"b", b.data, offset=a_data_at, local=False)])


# every hostile zip, and the words its refusal must say (each is caught by its own check)
HOSTILE: dict[str, tuple[Callable[[], bytes], str]] = {
    "traversal": (lambda: raw_zip([DOCKER, Raw(b"../../etc/cron.d/x", b"x")]), "climbs out"),
    "traversal-inside": (lambda: raw_zip([DOCKER, Raw(b"a/../../x", b"x")]), "climbs out"),
    "absolute": (lambda: raw_zip([DOCKER, Raw(b"/etc/passwd", b"x")]), "absolute name"),
    "backslash": (lambda: raw_zip([DOCKER, Raw(b"..\\..\\x", b"x")]), "backslash"),
    "nul": (lambda: raw_zip([DOCKER, Raw(b"a\0/../../x", b"x")]), "control character"),
    "empty-component": (lambda: raw_zip([DOCKER, Raw(b"a//b", b"x")]), "empty or '.'"),
    "symlink": (lambda: raw_zip([DOCKER, Raw(b"link", b"/etc/shadow", mode=0o120777)]), "symbolic link"),
    "device": (lambda: raw_zip([DOCKER, Raw(b"dev", mode=0o020644)]), "character device"),
    "fifo": (lambda: raw_zip([DOCKER, Raw(b"pipe", mode=0o010644)]), "FIFO"),
    "duplicate": (lambda: raw_zip([DOCKER, Raw(b"a", b"1"), Raw(b"a", b"2")]), "twice"),
    "duplicate-dir": (lambda: raw_zip([DOCKER, Raw(b"a", b"1"), Raw(b"a/", mode=0o40755)]), "twice"),
    "encrypted": (lambda: raw_zip([DOCKER, Raw(b"secret", b"x", flags=UTF8 | 1)]), "encrypted"),
    "ratio": (lambda: raw_zip([DOCKER, Raw(b"zeros", bytes(4 << 20), deflate=True)]), "compressed more than"),
    "zip64-size": (lambda: raw_zip([DOCKER, Raw(b"big", b"x", deflate=True, size=1 << 40)]), "TAR_MAX_FILE_BYTES"),
    "short": (lambda: raw_zip([DOCKER, Raw(b"short", b"x" * 10, deflate=True, size=100)]), "unpacks to 10"),
    "stored-sizes": (
        lambda: raw_zip([DOCKER, Raw(b"s", b"x" * 10, size=5, crc=zlib.crc32(b"x" * 5))]),
        "two different",
    ),
    "overlap": (overlapping, "overlapping entries"),
    "dir-with-data": (lambda: raw_zip([DOCKER, Raw(b"d/", b"data")]), "directory entry with data"),
    "file-then-child": (lambda: raw_zip([DOCKER, Raw(b"a", b"1"), Raw(b"a/b", b"2")]), "cannot be unpacked"),
    "not-a-zip": (lambda: b"\x1f\x8b" + bytes(100), "is not a zip"),
    "no-dockerfile": (lambda: raw_zip([Raw(b"app/Dockerfile", DOCKERFILE)]), "no Dockerfile at its root"),
}
