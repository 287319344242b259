"""Applying image layers (tar, tar+gzip, tar+zstd) to a tree on the host, safely.

Layers come from registries and uploaded archives: untrusted input unpacked by
root. Every member's path is resolved inside the tree the way a chroot would
resolve it (symlinks, absolute or relative, never leave the tree; ``..`` stops
at its root), one component at a time through directory descriptors opened
with O_NOFOLLOW, and every write, link and delete goes through such a
descriptor, so no member can touch anything outside the tree. Whiteouts
(``.wh.NAME``) delete a lower layer's NAME; an opaque marker (``.wh..wh..opq``)
empties its directory of lower-layer entries (OCI image spec, "Whiteouts").
The bytes written are capped: the tree has to fit the disk it becomes.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import posixpath
import shutil
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import zstandard

from ember.errors import EmberError

OPAQUE = ".wh..wh..opq"
WHITEOUT = ".wh."
MAX_SYMLINKS = 40
XATTRS = ("security.capability", "user.")
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
CHUNK = 1 << 20


class LayerError(EmberError):
    """A layer is malformed or tries something unsafe; the message names the member."""


@contextlib.contextmanager
def open_layer(path: Path) -> Iterator[tarfile.TarFile]:
    """A streaming tar reader over a layer blob, its compression found from its first bytes."""
    with open(path, "rb") as raw, contextlib.ExitStack() as stack:
        magic = raw.read(4)
        raw.seek(0)
        stream: BinaryIO = raw
        if magic.startswith(GZIP_MAGIC):
            stream = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))  # type: ignore[assignment]
        elif magic == ZSTD_MAGIC:
            stream = stack.enter_context(zstandard.ZstdDecompressor().stream_reader(raw))
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            yield tar


def clean(name: str) -> str:
    """A member name made lexically clean and relative, as Docker does (``a/../b`` -> ``b``)."""
    return posixpath.normpath("/" + name).lstrip("/")


class Tree:
    """A root filesystem being assembled from layers; ``limit`` caps the bytes written."""

    def __init__(self, root: Path, limit: int) -> None:
        self.root = root
        self.limit = limit
        self.written = 0
        self.fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Tree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- resolution inside the tree -----------------------------------------

    def _walk(self, parts: list[str], create: bool) -> int:
        """A descriptor of the directory ``parts`` names, resolved as if the tree were ``/``."""
        fd = os.dup(self.fd)
        stack: list[int] = []  # descriptors of the directories above fd, for '..'
        todo = list(reversed(parts))
        links = 0
        try:
            while todo:
                name = todo.pop()
                if name in ("", "."):
                    continue
                if name == "..":
                    if stack:
                        os.close(fd)
                        fd = stack.pop()
                    continue
                try:
                    st = os.lstat(name, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(name, 0o755, dir_fd=fd)
                    st = os.lstat(name, dir_fd=fd)
                if stat.S_ISLNK(st.st_mode):
                    links += 1
                    if links > MAX_SYMLINKS:
                        raise LayerError(f"too many levels of symbolic links under /{'/'.join(parts)}")
                    target = os.readlink(name, dir_fd=fd)
                    if target.startswith("/"):
                        for held in stack:
                            os.close(held)
                        stack = []
                        os.close(fd)
                        fd = os.dup(self.fd)
                    todo.extend(reversed(target.split("/")))
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    raise NotADirectoryError(f"/{'/'.join(parts)}: {name} is not a directory")
                child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                stack.append(fd)
                fd = child
            return fd
        except BaseException:
            os.close(fd)
            raise
        finally:
            for held in stack:
                os.close(held)

    @contextlib.contextmanager
    def parent(self, path: str, create: bool = True) -> Iterator[tuple[int, str]]:
        """(descriptor of the parent directory, final name) for a member path."""
        parts = clean(path).split("/")
        if parts == [""]:
            raise LayerError(f"'{path}' names the root directory")
        fd = self._walk(parts[:-1], create)
        try:
            yield fd, parts[-1]
        finally:
            os.close(fd)

    # ---- applying a layer ----------------------------------------------------

    def apply(self, blob: Path) -> None:
        """Apply one layer blob: its whiteouts first affect lower layers only."""
        mine: set[str] = set()  # paths this layer created: an opaque marker keeps them
        try:
            with open_layer(blob) as tar:
                for member in tar:
                    self._member(tar, member, mine)
        except (OSError, tarfile.TarError, zstandard.ZstdError, EOFError) as exc:
            raise LayerError(f"layer {blob.name[:12]}: {exc}") from None

    def _member(self, tar: tarfile.TarFile, member: tarfile.TarInfo, mine: set[str]) -> None:
        path = clean(member.name)
        if not path:
            return  # the layer's root directory entry
        directory, _, name = path.rpartition("/")
        if name == OPAQUE:
            with self.parent(path) as (fd, _):
                for child in os.listdir(fd):
                    if f"{directory}/{child}".lstrip("/") not in mine:
                        _remove(fd, child)
            return
        if name.startswith(WHITEOUT):
            gone = name[len(WHITEOUT) :]
            if gone in ("", ".", ".."):
                raise LayerError(f"{member.name}: a whiteout must name an entry")
            with contextlib.suppress(FileNotFoundError), self.parent(path, create=False) as (fd, _):
                _remove(fd, gone)
            return
        mine.add(path)
        self._add(tar, member, path)

    def _add(self, tar: tarfile.TarFile, m: tarfile.TarInfo, path: str) -> None:
        with self.parent(path) as (fd, name):
            try:
                old = os.lstat(name, dir_fd=fd)
            except FileNotFoundError:
                old = None
            if old is not None and not (stat.S_ISDIR(old.st_mode) and m.isdir()):
                _remove(fd, name)
            mode = m.mode & 0o7777
            if m.isdir():
                if old is None or not stat.S_ISDIR(old.st_mode):
                    os.mkdir(name, 0o700, dir_fd=fd)
                self._finish(fd, name, m, mode)
            elif m.isreg():
                self._file(tar, m, fd, name, mode)
            elif m.issym():
                os.symlink(m.linkname, name, dir_fd=fd)
                os.chown(name, m.uid, m.gid, dir_fd=fd, follow_symlinks=False)
                os.utime(name, (m.mtime, m.mtime), dir_fd=fd, follow_symlinks=False)
            elif m.islnk():
                with self.parent(m.linkname, create=False) as (src_fd, src_name):
                    if stat.S_ISDIR(os.lstat(src_name, dir_fd=src_fd).st_mode):
                        raise LayerError(f"{m.name}: a hard link to a directory")
                    os.link(src_name, name, src_dir_fd=src_fd, dst_dir_fd=fd, follow_symlinks=False)
            elif m.ischr() or m.isblk() or m.isfifo():
                kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK if m.isblk() else stat.S_IFIFO
                os.mknod(name, kind | 0o600, os.makedev(m.devmajor, m.devminor), dir_fd=fd)
                self._finish(fd, name, m, mode)
            else:
                raise LayerError(f"{m.name}: unsupported tar member type {m.type!r}")

    def _file(self, tar: tarfile.TarFile, m: tarfile.TarInfo, dir_fd: int, name: str, mode: int) -> None:
        self.written += m.size
        if self.written > self.limit:
            raise LayerError(f"the image is larger than the {self.limit >> 30} GiB disk it must fit (EMBER_DISK_GIB)")
        src = tar.extractfile(m)
        assert src is not None
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(src, out, CHUNK)
            out.flush()
            _set_meta(out.fileno(), m, mode)

    def _finish(self, dir_fd: int, name: str, m: tarfile.TarInfo, mode: int) -> None:
        if m.isdir():
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            try:
                _set_meta(fd, m, mode)
            finally:
                os.close(fd)
        else:  # a device node or FIFO just made here: never opened, set by name
            os.chown(name, m.uid, m.gid, dir_fd=dir_fd, follow_symlinks=False)
            os.chmod(name, mode, dir_fd=dir_fd)
            os.utime(name, (m.mtime, m.mtime), dir_fd=dir_fd, follow_symlinks=False)


def _set_meta(fd: int, m: tarfile.TarInfo, mode: int) -> None:
    os.fchown(fd, m.uid, m.gid)
    os.fchmod(fd, mode)  # after chown, which clears set-id bits
    for key, value in (m.pax_headers or {}).items():
        attr = key.removeprefix("SCHILY.xattr.")
        if attr != key and attr.startswith(XATTRS):
            os.setxattr(fd, attr, value.encode("utf-8", "surrogateescape"))
    os.utime(fd, (m.mtime, m.mtime))


def _remove(dir_fd: int, name: str) -> None:
    """Delete ``name`` (a whole directory tree too) inside ``dir_fd``, never following links."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        for child in os.listdir(fd):
            _remove(fd, child)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)
