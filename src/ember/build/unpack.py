"""Trees on the host built from untrusted archives, and confined reads of them.

Archives come from registries, uploads and build VMs: untrusted input handled
by root. Every path is resolved inside the tree the way a chroot would resolve
it (symlinks, absolute or relative, never leave the tree; ``..`` stops at its
root), one component at a time through directory descriptors opened with
O_NOFOLLOW, and every write, link, read and delete goes through such a
descriptor, so no member can touch anything outside the tree. Nothing in a
tree is deeper than ``TarLimits.max_depth`` directories, and removal is
iterative, so no input can exhaust the stack.

Image layers (``layer=True``) keep owners, modes, device nodes and some
xattrs, and apply whiteouts: ``.wh.NAME`` deletes a lower layer's NAME; an
opaque marker (``.wh..wh..opq``) empties its directory of lower-layer entries
(OCI image spec, "Whiteouts"). Other archives (build contexts, OCI archives)
are plain files owned by root: no whiteouts, no device nodes, no owners.
The bytes written can be capped: a layer's tree has to fit the disk it becomes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ember.build.tarread import ArchiveError, Kind, Member, TarLimits, TarReader, clean, open_tar
from ember.errors import ResourceExhausted

OPAQUE = ".wh..wh..opq"
WHITEOUT = ".wh."
MAX_SYMLINKS = 40
MAX_STEPS = 4096  # path components one resolution may walk (symlink targets included)
STEPS_PER_MEMBER = 256  # what applying an archive may walk on average per member, beyond a first STEPS_BASE
STEPS_BASE = 1 << 16
XATTRS = ("security.capability", "user.")
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Capacity:
    """What the files an archive writes into a tree may add up to, and the setting that says so."""

    bytes: int
    setting: str


class Tree:
    """A directory tree handled as if it were ``/``; ``capacity`` caps the file bytes ``apply`` writes."""

    def __init__(self, root: Path, limits: TarLimits, *, capacity: Capacity | None = None) -> None:
        self.root = root
        self.limits = limits
        self.capacity = capacity
        self.written = 0
        self.steps_left: int | None = None  # while applying an archive: path components it may still walk
        self.fd = os.open(root, DIR_FLAGS)
        self._close = weakref.finalize(self, os.close, self.fd)  # also when dropped without close()

    def close(self) -> None:
        self._close()

    def __enter__(self) -> Tree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- resolution inside the tree -----------------------------------------

    def _walk(self, parts: list[str], *, create: bool) -> int:
        """A descriptor of the directory ``parts`` names, resolved as if the tree were ``/``."""
        fd = os.dup(self.fd)
        stack: list[int] = []  # descriptors of the directories above fd, for '..'
        todo = list(reversed(parts))
        links = steps = 0
        try:
            while todo:
                name = todo.pop()
                steps += 1
                if steps > MAX_STEPS:
                    raise ArchiveError(f"resolving /{'/'.join(parts)[:200]} walks more than {MAX_STEPS} components")
                if self.steps_left is not None:
                    self.steps_left -= 1
                    if self.steps_left < 0:
                        raise ArchiveError("the archive's paths take too many steps to resolve (symlink chains)")
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
                    os.chmod(name, 0o755, dir_fd=fd)  # as Docker makes implicit parents, whatever the umask
                    st = os.lstat(name, dir_fd=fd)
                if stat.S_ISLNK(st.st_mode):
                    links += 1
                    if links > MAX_SYMLINKS:
                        raise ArchiveError(f"too many levels of symbolic links under /{'/'.join(parts)[:200]}")
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
                    raise NotADirectoryError(errno.ENOTDIR, f"/{'/'.join(parts)[:200]}: {name} is not a directory")
                if len(stack) >= self.limits.max_depth:
                    raise ArchiveError(f"a path goes deeper than {self.limits.max_depth} levels (EMBER_TAR_MAX_DEPTH)")
                child = os.open(name, DIR_FLAGS, dir_fd=fd)
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
    def parent(self, path: str, *, create: bool = True) -> Iterator[tuple[int, str]]:
        """(descriptor of the parent directory, final name) for a path, the name itself not followed."""
        parts = clean(path).split("/")
        if parts == [""]:
            raise ArchiveError(f"'{path[:200]}' names the root directory")
        fd = self._walk(parts[:-1], create=create)
        try:
            yield fd, parts[-1]
        finally:
            os.close(fd)

    def directory(self, path: str) -> int:
        """A descriptor (the caller closes it) of the directory ``path`` names, symlinks resolved inside."""
        return self._walk(clean(path).split("/"), create=False)

    def open_file(self, path: str) -> BinaryIO:
        """The regular file ``path`` names, opened for reading, symlinks (the last one too) resolved inside."""
        parts = path.split("/")
        for _ in range(MAX_SYMLINKS):
            if parts[-1] in ("", ".", ".."):
                raise IsADirectoryError(errno.EISDIR, f"{clean(path)[:200]} is a directory")
            fd = self._walk(parts[:-1], create=False)
            try:
                st = os.lstat(parts[-1], dir_fd=fd)
                if stat.S_ISLNK(st.st_mode):
                    target = os.readlink(parts[-1], dir_fd=fd).split("/")
                    parts = target if target[0] == "" else parts[:-1] + target
                    continue
                if not stat.S_ISREG(st.st_mode):
                    raise IsADirectoryError(errno.EISDIR, f"{clean(path)[:200]} is not a regular file")
                return open_at(fd, parts[-1])
            finally:
                os.close(fd)
        raise ArchiveError(f"too many levels of symbolic links at {clean(path)[:200]}")

    def read_bytes(self, path: str, limit: int) -> bytes:
        """A regular file's bytes (see ``open_file``); more than ``limit`` bytes is an ArchiveError."""
        with self.open_file(path) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise ArchiveError(f"{clean(path)[:200]} is larger than the {limit} bytes allowed")
        return data

    # ---- applying an archive -------------------------------------------------

    def apply(self, blob: Path, *, layer: bool = True) -> None:
        """Apply one archive file: a layer's whiteouts affect lower layers only."""
        with open(blob, "rb") as raw:
            self.apply_stream(raw, layer=layer)

    def apply_stream(self, raw: BinaryIO, *, layer: bool) -> None:
        mine: set[int] = set()  # hashes of the paths this layer created: an opaque marker keeps them
        member: Member | None = None
        self.steps_left = STEPS_BASE
        try:
            with open_tar(raw, self.limits) as reader:
                for member in reader:
                    self.steps_left += STEPS_PER_MEMBER
                    self._member(reader, member, mine, layer=layer)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhausted("the host disk is full: free space and retry") from None
            where = f"{member.name[:200]!r}: " if member is not None else ""
            raise ArchiveError(f"{where}{exc.strerror or type(exc).__name__}") from None
        finally:
            self.steps_left = None

    def _member(self, reader: TarReader, m: Member, mine: set[int], *, layer: bool) -> None:
        path = clean(m.name)
        if not path:
            return  # the archive's root directory entry
        directory, _, name = path.rpartition("/")
        if layer and name == OPAQUE:
            with self.parent(path) as (fd, _):
                for child in os.listdir(fd):
                    if _key(f"{directory}/{child}".lstrip("/")) not in mine:
                        remove_entry(fd, child)
            return
        if layer and name.startswith(WHITEOUT):
            gone = name[len(WHITEOUT) :]
            if gone in ("", ".", ".."):
                raise ArchiveError(f"{m.name[:200]!r}: a whiteout must name an entry")
            with contextlib.suppress(FileNotFoundError), self.parent(path, create=False) as (fd, _):
                remove_entry(fd, gone)
            return
        if not layer and m.kind in (Kind.CHAR, Kind.BLOCK, Kind.FIFO):
            return  # special files in a context or OCI archive are skipped, as Docker does
        if layer:
            mine.add(_key(path))
        self._add(reader, m, layer=layer)

    def _add(self, reader: TarReader, m: Member, *, layer: bool) -> None:
        with self.parent(m.name) as (fd, name):
            try:
                old = os.lstat(name, dir_fd=fd)
            except FileNotFoundError:
                old = None
            if old is not None and not (stat.S_ISDIR(old.st_mode) and m.kind is Kind.DIR):
                remove_entry(fd, name)
            if m.kind is Kind.DIR:
                if old is None or not stat.S_ISDIR(old.st_mode):
                    os.mkdir(name, 0o700, dir_fd=fd)
                sub = os.open(name, DIR_FLAGS, dir_fd=fd)
                try:
                    _set_meta(sub, m, layer=layer)
                finally:
                    os.close(sub)
            elif m.kind is Kind.FILE:
                self._file(reader, m, fd, name, layer=layer)
            elif m.kind is Kind.SYMLINK:
                os.symlink(m.linkname, name, dir_fd=fd)
                if layer:
                    os.chown(name, m.uid, m.gid, dir_fd=fd, follow_symlinks=False)
                os.utime(name, (m.mtime, m.mtime), dir_fd=fd, follow_symlinks=False)
            elif m.kind is Kind.HARDLINK:
                with self.parent(m.linkname, create=False) as (src_fd, src_name):
                    if stat.S_ISDIR(os.lstat(src_name, dir_fd=src_fd).st_mode):
                        raise ArchiveError(f"{m.name[:200]!r}: a hard link to a directory")
                    os.link(src_name, name, src_dir_fd=src_fd, dst_dir_fd=fd, follow_symlinks=False)
            else:  # a device node or FIFO of a layer: made here, never opened, set by name
                kind = {Kind.CHAR: stat.S_IFCHR, Kind.BLOCK: stat.S_IFBLK}.get(m.kind, stat.S_IFIFO)
                os.mknod(name, kind | 0o600, os.makedev(m.devmajor, m.devminor), dir_fd=fd)
                os.chown(name, m.uid, m.gid, dir_fd=fd, follow_symlinks=False)
                os.chmod(name, m.mode, dir_fd=fd)
                os.utime(name, (m.mtime, m.mtime), dir_fd=fd, follow_symlinks=False)

    def _file(self, reader: TarReader, m: Member, dir_fd: int, name: str, *, layer: bool) -> None:
        self.written += m.size
        if self.capacity is not None and self.written > self.capacity.bytes:
            raise ArchiveError(f"the files add up to more than {self.capacity.bytes} bytes ({self.capacity.setting})")
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        with os.fdopen(fd, "wb") as out:
            while chunk := reader.read():
                out.write(chunk)
            out.flush()
            _set_meta(out.fileno(), m, layer=layer)


def open_at(dir_fd: int, name: str) -> BinaryIO:
    """``name`` in ``dir_fd`` opened for reading; a symlink there is refused, never followed."""
    return os.fdopen(os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd), "rb")


def _key(path: str) -> int:
    return int.from_bytes(hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "big")


def _set_meta(fd: int, m: Member, *, layer: bool) -> None:
    if layer:
        os.fchown(fd, m.uid, m.gid)
    os.fchmod(fd, m.mode)  # after chown, which clears set-id bits
    if layer:
        for attr, value in m.xattrs.items():
            if attr.startswith(XATTRS):
                os.setxattr(fd, attr, value)
    os.utime(fd, (m.mtime, m.mtime))


def remove_entry(dir_fd: int, name: str) -> None:
    """Delete ``name`` inside ``dir_fd`` (a whole directory tree too), never following a link.

    Iterative: one directory descriptor open at a time, ``..`` to climb back
    (safe here: the tree is root's own and nothing else changes it)."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    pending: list[tuple[str, list[str]]] = [(name, os.listdir(fd))]
    try:
        while pending:
            children = pending[-1][1]
            if children:
                child = children.pop()
                if stat.S_ISDIR(os.lstat(child, dir_fd=fd).st_mode):
                    sub = os.open(child, DIR_FLAGS, dir_fd=fd)
                    os.close(fd)
                    fd = sub
                    pending.append((child, os.listdir(fd)))
                else:
                    os.unlink(child, dir_fd=fd)
                continue
            up = os.open("..", DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = up
            os.rmdir(pending.pop()[0], dir_fd=fd)
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """Delete a directory tree (iteratively, see ``remove_entry``); a missing one is fine."""
    try:
        parent = os.open(path.parent, DIR_FLAGS)
    except FileNotFoundError:
        return
    try:
        remove_entry(parent, path.name)
    finally:
        os.close(parent)
