"""Ember's one reader of untrusted tar archives: streaming, bounded, no ``tarfile``.

Every tar that a tenant or a guest controls (build contexts, image layers,
``oci-archive://`` bases, ``ADD`` of local archives, ``COPY --from`` streams)
is read here, header by header, from a stream that is never rewound. Nothing
here writes a file: :class:`ember.build.unpack.Tree` does that, confined to
its root. What a hostile archive can cost is bounded by :class:`TarLimits`
(each limit a ``Settings`` field): decompressed bytes, members, the size of
one PAX or GNU long-name header, path depth and one file's size. Extended
headers are a loop, not a recursion, and no member list is kept.

Formats: ustar, GNU (long names and links) and PAX (local and global
headers; ``path``, ``linkpath``, ``size``, ``uid``, ``gid``, ``mtime``,
``SCHILY.xattr.*``), uncompressed or gzip, zstd, bzip2 or xz. Sparse files
and unknown member types are refused.
"""

from __future__ import annotations

import bz2
import contextlib
import enum
import gzip
import lzma
import posixpath
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

import zstandard

from ember.errors import InvalidRequest
from ember.guest.protocol import MAX_ID

if TYPE_CHECKING:
    from ember.config import Settings

BLOCK = 512
MAX_META_IN_A_ROW = 8  # extended headers before one member
MAX_PAX_RECORDS = 256  # records in one PAX header
MAX_XATTRS = 64  # extended attributes of one member
PAX_KEYS = frozenset({"path", "linkpath", "size", "uid", "gid", "mtime"})  # and SCHILY.xattr.*, GNU.sparse.*
DECIMAL = re.compile(r"[0-9]{1,30}")
MAX_TIME = 1 << 40  # seconds either side of 1970 (what the host's utime takes, with room to spare)
COMPRESSIONS = (
    (b"\x1f\x8b", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
)


class ArchiveError(InvalidRequest):
    """An archive is malformed, over a limit, or tries something unsafe; the message says which."""


@dataclass(frozen=True)
class TarLimits:
    """What one archive may cost; ``from_settings`` is where the values come from."""

    max_bytes: int  # decompressed bytes of the whole archive (headers and data)
    max_members: int
    max_header: int  # one PAX header or GNU long name/link; also all global PAX headers together
    max_depth: int  # directory levels of a member's path, and of anything created in a tree
    max_file: int  # one member's data

    @classmethod
    def from_settings(cls, settings: Settings) -> TarLimits:
        return cls(
            max_bytes=settings.tar_max_bytes, max_members=settings.tar_max_members,
            max_header=settings.tar_max_header_bytes, max_depth=settings.tar_max_depth,
            max_file=settings.tar_max_file_bytes,
        )  # fmt: skip


class Kind(enum.Enum):
    FILE = "file"
    DIR = "directory"
    SYMLINK = "symlink"
    HARDLINK = "hard link"
    CHAR = "character device"
    BLOCK = "block device"
    FIFO = "fifo"


TYPES = {
    b"0": Kind.FILE, b"\0": Kind.FILE, b"7": Kind.FILE, b"1": Kind.HARDLINK, b"2": Kind.SYMLINK,
    b"3": Kind.CHAR, b"4": Kind.BLOCK, b"5": Kind.DIR, b"6": Kind.FIFO,
}  # fmt: skip


@dataclass
class Member:
    name: str  # as stored (not cleaned); bytes that are not UTF-8 are kept as surrogates
    kind: Kind
    mode: int
    uid: int
    gid: int
    mtime: int
    size: int  # data bytes (regular files only)
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _number(raw: bytes, what: str) -> int:
    if raw[:1] and raw[0] & 0x80:  # GNU base-256
        if raw[0] == 0xFF:
            raise ArchiveError(f"a tar header holds a negative {what}")
        value = raw[0] & 0x7F
        for byte in raw[1:]:
            value = value << 8 | byte
        return value
    digits = raw.split(b"\0", 1)[0].strip(b" ")
    if digits.strip(b"01234567"):  # a sign, a space inside, anything int() would take that tar does not write
        raise ArchiveError(f"a tar header holds a malformed {what}")
    return int(digits, 8) if digits else 0


def clean(name: str) -> str:
    """A member name made lexically clean and relative, as Docker does (``a/../b`` -> ``b``)."""
    return posixpath.normpath("/" + name).lstrip("/")


class TarReader:
    """Members of one archive in order; ``read`` returns the current member's data."""

    def __init__(self, stream: BinaryIO, limits: TarLimits) -> None:
        self._stream = stream
        self.limits = limits
        self.consumed = 0  # decompressed bytes read so far
        self.members = 0
        self._remaining = 0  # data of the current member not read yet
        self._padding = 0
        self._global: dict[str, bytes] = {}

    def _read(self, n: int) -> bytes:
        data = self._stream.read(n)
        self.consumed += len(data)
        if self.consumed > self.limits.max_bytes:
            raise ArchiveError(f"the archive unpacks to more than {self.limits.max_bytes} bytes (EMBER_TAR_MAX_BYTES)")
        return data

    def _exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self._read(min(n - len(out), 1 << 20))
            if not chunk:
                raise ArchiveError("the archive ends in the middle of a member (truncated?)")
            out += chunk
        return bytes(out)

    def _skip(self, n: int) -> None:
        while n > 0:
            n -= len(self._exact(min(n, 1 << 20)))

    def read(self, n: int = 1 << 20) -> bytes:
        """Up to ``n`` bytes of the current member's data; b"" at its end."""
        if self._remaining <= 0:
            return b""
        data = self._exact(min(n, self._remaining))
        self._remaining -= len(data)
        return data

    def __iter__(self) -> Iterator[Member]:
        while True:
            self._skip(self._remaining + self._padding)
            self._remaining = self._padding = 0
            member = self._next()
            if member is None:
                return
            yield member

    def _next(self) -> Member | None:
        local: dict[str, bytes] = {}
        long_name = long_link = None
        for _ in range(MAX_META_IN_A_ROW + 1):
            header = self._read(BLOCK)
            if len(header) < BLOCK:
                if not header and self.consumed == 0:
                    raise ArchiveError("the archive is empty")
                if header:
                    raise ArchiveError("the archive ends in the middle of a header (truncated?)")
                return None  # some writers omit the end-of-archive blocks
            if header == bytes(BLOCK):
                return None
            _check_sum(header)
            flag = header[156:157]
            size = _number(header[124:136], "size")
            if flag not in (b"x", b"g", b"L", b"K", b"X"):
                return self._member(header, flag, size, {**self._global, **local}, long_name, long_link)
            if size > self.limits.max_header:
                raise ArchiveError(
                    f"an extended tar header of {size} bytes is over the {self.limits.max_header} allowed "
                    "(EMBER_TAR_MAX_HEADER_BYTES)"
                )
            data = self._exact(size)
            self._skip(-size % BLOCK)
            if flag == b"L":
                long_name = _text(data)
            elif flag == b"K":
                long_link = _text(data)
            elif flag == b"g":
                self._global.update(_pax_records(data))
                if sum(len(k) + len(v) for k, v in self._global.items()) > self.limits.max_header:
                    raise ArchiveError("the archive's global PAX headers are over the allowed size")
            else:
                local.update(_pax_records(data))
        raise ArchiveError(f"more than {MAX_META_IN_A_ROW} extended headers in a row")

    def _member(
        self, h: bytes, flag: bytes, size: int, pax: dict[str, bytes], long_name: str | None, long_link: str | None
    ) -> Member:
        self.members += 1
        if self.members > self.limits.max_members:
            raise ArchiveError(f"the archive has more than {self.limits.max_members} members (EMBER_TAR_MAX_MEMBERS)")
        name = _text(h[0:100])
        if h[257:263] == b"ustar\0" and h[345:500].strip(b"\0"):
            name = f"{_text(h[345:500])}/{name}"
        name = long_name if long_name is not None else name
        linkname = long_link if long_link is not None else _text(h[157:257])
        kind = TYPES.get(flag)
        if kind is None:
            raise ArchiveError(f"{name[:200]!r}: unsupported tar member type {flag!r}")
        m = Member(
            name=name, kind=kind, mode=_number(h[100:108], "mode") & 0o7777, uid=_number(h[108:116], "uid"),
            gid=_number(h[116:124], "gid"), mtime=_number(h[136:148], "mtime"), size=size, linkname=linkname,
            devmajor=_number(h[329:337], "device number"), devminor=_number(h[337:345], "device number"),
        )  # fmt: skip
        _apply_pax(m, pax)
        if m.kind is Kind.FILE and m.name.endswith("/"):
            m.kind = Kind.DIR  # pre-POSIX archives mark directories by the name alone
        if m.kind is Kind.DIR:
            m.name = m.name.rstrip("/") or m.name
        if m.uid > MAX_ID or m.gid > MAX_ID:
            raise ArchiveError(f"{m.name[:200]!r}: owner ids above {MAX_ID} are not valid")
        if abs(m.mtime) > MAX_TIME or m.devmajor > MAX_ID or m.devminor > MAX_ID:
            raise ArchiveError(f"{m.name[:200]!r}: a time or device number out of range")
        if "\0" in m.name or "\0" in m.linkname or any("\0" in k for k in m.xattrs):
            raise ArchiveError("a member name, link target or xattr name holds a NUL byte")
        depth = clean(m.name).count("/") + 1
        if depth > self.limits.max_depth:
            raise ArchiveError(f"a member path is deeper than {self.limits.max_depth} levels (EMBER_TAR_MAX_DEPTH)")
        if m.kind is Kind.FILE:
            if m.size > self.limits.max_file:
                raise ArchiveError(
                    f"{m.name[:200]!r} is {m.size} bytes, over the {self.limits.max_file} allowed for one file "
                    "(EMBER_TAR_MAX_FILE_BYTES)"
                )
            self._remaining, self._padding = m.size, -m.size % BLOCK
        else:
            m.size = 0  # only regular files carry data (as tar implementations agree)
        return m


def _check_sum(h: bytes) -> None:
    stored = _number(h[148:156], "checksum")
    unsigned = sum(h[:148]) + 8 * 0x20 + sum(h[156:])
    if stored != unsigned and stored != unsigned - 256 * sum(b > 127 for b in (*h[:148], *h[156:])):
        raise ArchiveError("not a tar archive, or a damaged one (a header checksum does not match)")


def _pax_records(data: bytes) -> dict[str, bytes]:
    """The records of a PAX header (``LEN KEY=VALUE\\n``) that Ember uses; the rest are dropped here."""
    out: dict[str, bytes] = {}
    pos = records = 0
    while pos < len(data):
        records += 1
        if records > MAX_PAX_RECORDS:
            raise ArchiveError(f"a PAX header holds more than {MAX_PAX_RECORDS} records")
        space = data.find(b" ", pos, pos + 20)
        try:
            length = int(data[pos:space]) if space > pos else 0
        except ValueError:
            length = 0
        record = data[pos : pos + length]
        if length <= space - pos or len(record) != length or not record.endswith(b"\n") or b"=" not in record:
            raise ArchiveError("a PAX header is malformed")
        key, _, value = record[space - pos + 1 : -1].partition(b"=")
        name = key.decode("utf-8", "surrogateescape")
        if name in PAX_KEYS or name.startswith(("SCHILY.xattr.", "GNU.sparse.")):
            out[name] = value
        pos += length
    return out


def _apply_pax(m: Member, pax: dict[str, bytes]) -> None:
    for key, value in pax.items():
        text = value.decode("utf-8", "surrogateescape")
        if key == "path":
            m.name = text
        elif key == "linkpath":
            m.linkname = text
        elif key in ("size", "uid", "gid"):
            if not DECIMAL.fullmatch(text):
                raise ArchiveError(f"a PAX header holds a malformed {key}")
            setattr(m, key, int(text))
        elif key == "mtime":
            try:
                m.mtime = int(float(text))
            except (ValueError, OverflowError):
                raise ArchiveError("a PAX header holds a malformed mtime") from None
        elif key.startswith("SCHILY.xattr."):
            m.xattrs[key.removeprefix("SCHILY.xattr.")] = value
            if len(m.xattrs) > MAX_XATTRS:
                raise ArchiveError(f"{m.name[:200]!r} has more than {MAX_XATTRS} extended attributes")
        elif key.startswith("GNU.sparse."):
            raise ArchiveError(f"{m.name[:200]!r}: sparse files in archives are not supported")


@contextlib.contextmanager
def open_tar(raw: BinaryIO, limits: TarLimits) -> Iterator[TarReader]:
    """A reader over ``raw`` (positioned at its start), its compression found from its first bytes."""
    magic = raw.read(6)
    raw.seek(0)
    kind = next((name for prefix, name in COMPRESSIONS if magic.startswith(prefix)), "")
    with contextlib.ExitStack() as stack:
        stream: BinaryIO = raw
        if kind == "gzip":
            stream = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))  # type: ignore[assignment]
        elif kind == "zstd":
            stream = stack.enter_context(zstandard.ZstdDecompressor().stream_reader(raw))
        elif kind == "bzip2":
            stream = stack.enter_context(bz2.BZ2File(raw, mode="rb"))  # type: ignore[assignment]
        elif kind == "xz":
            stream = stack.enter_context(lzma.LZMAFile(raw, mode="rb"))  # type: ignore[assignment]
        try:
            yield TarReader(stream, limits)
        except (OSError, EOFError, zlib.error, zstandard.ZstdError, lzma.LZMAError) as exc:
            if isinstance(exc, OSError) and exc.errno is not None:
                raise  # a host error (disk full, ...), not the archive's fault
            raise ArchiveError(f"the {kind or 'tar'} stream is damaged: {type(exc).__name__}") from None


def is_tar(raw: BinaryIO, limits: TarLimits) -> bool:
    """True when ``raw`` starts with a (possibly compressed) tar header."""
    try:
        with open_tar(raw, limits) as reader:
            next(iter(reader), None)
            return reader.consumed >= BLOCK
    except ArchiveError:
        return False
    finally:
        raw.seek(0)
