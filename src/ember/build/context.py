"""The build context on the host: ``.dockerignore``, COPY/ADD sources, tar streams.

The context is a tree the daemon unpacked from the tenant's upload
(ember.build.unpack, confined and bounded), so it may hold any symlink. It is
only ever read through that tree's descriptors: a path resolves inside the
context as in a chroot, and a COPY source that is a symlink is copied as one.
Everything the guest receives for a COPY/ADD is one tar stream built here,
with Docker's destination rules, ``--chown``/``--chmod`` applied to the
headers, and local archives for ADD read by Ember's bounded tar reader (names
cleaned, so nothing lands outside the destination). The guest extracts it
chrooted into the image being built.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import posixpath
import stat
import tarfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from ember.build.dockerfile import DockerfileError, Instruction
from ember.build.tarread import ArchiveError, Kind, Member, TarLimits, TarReader, clean, is_tar, open_tar
from ember.build.unpack import DIR_FLAGS, Tree, open_at
from ember.dockerignore import IgnoreError, IgnoreMatcher, component_matcher
from ember.errors import BuildFailed

GLOB_CHARS = frozenset("*?[")
MEMBER_TYPES = {
    Kind.FILE: tarfile.REGTYPE, Kind.DIR: tarfile.DIRTYPE,
    Kind.SYMLINK: tarfile.SYMTYPE, Kind.HARDLINK: tarfile.LNKTYPE,
}  # fmt: skip
MAX_DOCKERFILE = 1 << 20  # a Dockerfile or .dockerignore


@dataclass(frozen=True)
class Owner:
    uid: int
    gid: int


class BuildContext:
    """A context directory read through a confined :class:`Tree`; ``close`` releases it."""

    def __init__(
        self, root: Path, limits: TarLimits, dockerfile: str = "Dockerfile", *, scan_s: float | None = None
    ) -> None:
        """``scan_s`` bounds one walk or pass over the context's files (None: no bound)."""
        if not root.is_dir():
            raise DockerfileError(f"the build context {root.name} is not a directory")
        self.tree = Tree(root, limits)
        self.dockerfile = dockerfile
        self.scan_s = scan_s
        try:
            patterns = self._text(".dockerignore").splitlines() if self.exists(".dockerignore") else []
            self.matcher = IgnoreMatcher(patterns)
        except IgnoreError as exc:
            self.close()
            raise DockerfileError(f".dockerignore: {exc}") from None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.tree.close()

    def __enter__(self) -> BuildContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _text(self, rel: str) -> str:
        try:
            text = self.tree.read_bytes(rel, MAX_DOCKERFILE).decode("utf-8")
        except UnicodeDecodeError:
            raise DockerfileError(f"{rel} is not UTF-8 text") from None
        except ArchiveError:
            raise DockerfileError(f"{rel} is larger than {MAX_DOCKERFILE} bytes") from None
        except OSError:
            raise DockerfileError(f"{rel} in the build context is not a readable file") from None
        if "\0" in text:
            raise DockerfileError(f"{rel} holds a NUL byte")
        return text

    def dockerfile_text(self) -> str:
        if not self.exists(self.dockerfile):
            raise DockerfileError(f"no {self.dockerfile} in the build context (use -f to name another file)")
        return self._text(self.dockerfile)

    def excluded(self, rel: str) -> bool:
        return bool(rel) and self.matcher.matches(rel)

    @contextlib.contextmanager
    def entry(self, rel: str) -> Iterator[tuple[int, str, os.stat_result]]:
        """(directory descriptor, name, lstat) of a context path, its last component not followed."""
        rel = clean(rel)
        if not rel:
            yield self.tree.fd, ".", os.fstat(self.tree.fd)
            return
        with self.tree.parent(rel, create=False) as (fd, name):
            yield fd, name, os.lstat(name, dir_fd=fd)

    def exists(self, rel: str) -> bool:
        try:
            with self.entry(rel):
                return True
        except (OSError, ArchiveError):
            return False

    def is_dir(self, rel: str) -> bool:
        try:
            with self.entry(rel) as (_, _, st):
                return stat.S_ISDIR(st.st_mode)
        except (OSError, ArchiveError):
            return False

    def open_regular(self, rel: str) -> BinaryIO:
        """A regular file of the context, opened for reading (a symlink is refused, not followed)."""
        with self.entry(rel) as (fd, name, _):
            return open_at(fd, name)

    def _listdir(self, rel: str) -> list[str]:
        fd = self.tree.directory(rel)
        try:
            return sorted(os.listdir(fd))
        finally:
            os.close(fd)

    def resolve(self, pattern: str, ins: Instruction) -> list[str]:
        """Context-relative paths a COPY source names (globs as Docker: '*' stays in one directory)."""
        rel = clean(pattern)
        if any(c in GLOB_CHARS for c in rel):
            try:
                found = [f for f in self._glob(rel.split("/")) if not self.excluded(f)]
            except IgnoreError:
                raise ins.error(f"'{pattern}' is not a valid pattern (an unclosed '[' or a trailing '\\')") from None
            if not found:
                raise ins.error(f"no file in the build context matches '{pattern}'")
            return found
        if rel and (self.excluded(rel) or not self.exists(rel)):
            raise ins.error(f"'{pattern}' is not in the build context (or .dockerignore excludes it)")
        return [rel]

    def _glob(self, parts: list[str]) -> list[str]:
        found = [""]
        for i, part in enumerate(parts):
            nxt = []
            match = component_matcher(part) if any(c in GLOB_CHARS for c in part) else None
            for base in found:
                if i and not self.is_dir(base):
                    continue
                if match is not None:
                    try:
                        names = [n for n in self._listdir(base) if match(n)]
                    except (OSError, ArchiveError):
                        continue
                    nxt += [posixpath.join(base, n) for n in names]
                elif self.exists(posixpath.join(base, part)):
                    nxt.append(posixpath.join(base, part))
            found = nxt
        return sorted(found)

    def walk(self, rel: str) -> list[str]:
        """``rel`` and everything under it (not excluded), parents first, symlinks not followed.

        One descriptor per directory level and .dockerignore verdicts carried down the tree: an
        entry costs one lstat and one match per pattern, however deep it is."""
        out = [rel]
        if not self.is_dir(rel):
            return out
        deadline = self._deadline()
        verdicts, _ = self.matcher.path_verdicts(rel)
        fd = self.tree.directory(rel)
        levels = [(rel, fd, iter(sorted(os.listdir(fd))), verdicts)]
        try:
            while levels:
                base, fd, names, parent = levels[-1]
                name = next(names, None)
                if name is None:
                    levels.pop()
                    os.close(fd)
                    continue
                self._in_time(deadline)
                sub = posixpath.join(base, name)
                is_dir = stat.S_ISDIR(os.lstat(name, dir_fd=fd).st_mode)
                verdicts, excluded = self.matcher.verdicts(sub, parent)
                if not excluded:
                    out.append(sub)
                if is_dir and (not excluded or self.matcher.may_match_under(sub)):
                    child = os.open(name, DIR_FLAGS, dir_fd=fd)
                    levels.append((sub, child, iter(sorted(os.listdir(child))), verdicts))
        finally:
            for _, fd, _, _ in levels:
                os.close(fd)
        return out

    def entries(self, rels: Iterable[str]) -> Iterator[tuple[str, int, str, os.stat_result]]:
        """(path, directory descriptor, name, lstat) for each path, its last component not followed;
        consecutive paths in one directory (as ``walk`` lists them) share its descriptor."""
        deadline = self._deadline()
        current, fd = "", -1
        try:
            for rel in rels:
                self._in_time(deadline)
                path = clean(rel)
                if not path:
                    yield rel, self.tree.fd, ".", os.fstat(self.tree.fd)
                    continue
                directory, _, name = path.rpartition("/")
                if fd < 0 or directory != current:
                    if fd >= 0:
                        os.close(fd)
                        fd = -1
                    fd, current = self.tree.directory(directory), directory
                yield rel, fd, name, os.lstat(name, dir_fd=fd)
        finally:
            if fd >= 0:
                os.close(fd)

    def _deadline(self) -> float | None:
        return None if self.scan_s is None else time.monotonic() + self.scan_s

    def _in_time(self, deadline: float | None) -> None:
        if deadline is not None and time.monotonic() > deadline:
            raise BuildFailed(
                f"reading the build context took more than {self.scan_s:.0f} s (EMBER_BUILD_TOOL_TIMEOUT): "
                "send a smaller context (.dockerignore) or fewer, simpler .dockerignore patterns"
            )

    def file_digest(self, rels: list[str]) -> str:
        h = hashlib.sha256()
        for rel, fd, name, st in self.entries(rels):
            h.update(f"{rel}\0{st.st_mode}\0".encode())
            if stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(name, dir_fd=fd).encode())
            elif stat.S_ISREG(st.st_mode):
                with open_at(fd, name) as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
        return h.hexdigest()

    def is_archive(self, rel: str) -> bool:
        """A regular file (not a symlink) holding a tar, plain or compressed: ADD unpacks those."""
        try:
            with self.entry(rel) as (fd, name, st):
                archive = open_at(fd, name) if stat.S_ISREG(st.st_mode) else None
        except (OSError, ArchiveError):
            return False
        if archive is None:
            return False
        with archive:
            return is_tar(archive, self.tree.limits)


def parse_chmod(value: str, ins: Instruction) -> int | None:
    if not value:
        return None
    try:
        mode = int(value, 8)
    except ValueError:
        raise ins.error(f"--chmod={value}: Ember takes an octal mode like 755") from None
    if mode > 0o7777:
        raise ins.error(f"--chmod={value} is not a file mode")
    return mode


def dest_path(dest: str, workdir: str) -> str:
    full = dest if dest.startswith("/") else posixpath.join(workdir or "/", dest)
    norm = posixpath.normpath(full)
    return norm + "/" if dest.endswith("/") and norm != "/" else norm


class TarWriter:
    """Writes the COPY/ADD stream; names are relative to the image root."""

    def __init__(self, out: BinaryIO, owner: Owner | None, chmod: int | None) -> None:
        self.tar = tarfile.open(fileobj=out, mode="w|", format=tarfile.GNU_FORMAT)  # noqa: SIM115 (close())
        self.owner = owner
        self.chmod = chmod

    def _finish(self, info: tarfile.TarInfo, target: str) -> tarfile.TarInfo:
        info.name = target.lstrip("/")
        if self.owner is not None:
            info.uid, info.gid = self.owner.uid, self.owner.gid
        info.uname = info.gname = ""
        if self.chmod is not None and not info.issym():
            info.mode = self.chmod
        return info

    def add_entry(self, fd: int, name: str, st: os.stat_result, target: str) -> None:
        """A context entry (see ``BuildContext.entries``; a symlink is copied as a symlink)."""
        info = tarfile.TarInfo()
        info.mode = stat.S_IMODE(st.st_mode)
        info.mtime = int(st.st_mtime)
        if stat.S_ISDIR(st.st_mode):
            info.type = tarfile.DIRTYPE
            self.tar.addfile(self._finish(info, target))
        elif stat.S_ISLNK(st.st_mode):
            info.type = tarfile.SYMTYPE
            info.linkname = os.readlink(name, dir_fd=fd)
            self.tar.addfile(self._finish(info, target))
        elif stat.S_ISREG(st.st_mode):
            with open_at(fd, name) as f:
                info.size = os.fstat(f.fileno()).st_size
                self.tar.addfile(self._finish(info, target), f)
        # sockets, fifos and devices in a context are skipped, as Docker does

    def add_member(self, m: Member, reader: TarReader, target: str) -> None:
        """A member of an untrusted archive, renamed to ``target`` (ids, names and special files dropped)."""
        if m.kind not in MEMBER_TYPES:
            return
        info = tarfile.TarInfo(target.lstrip("/"))
        info.type, info.mode, info.mtime = MEMBER_TYPES[m.kind], m.mode, m.mtime
        info.uid, info.gid = m.uid, m.gid
        info.linkname = m.linkname
        if m.kind is Kind.FILE:
            info.size = m.size
        data = cast(BinaryIO, reader) if m.kind is Kind.FILE else None  # tarfile only calls read(n)
        self.tar.addfile(self._finish(info, target), data)

    def add_bytes(self, data: bytes, target: str, mode: int = 0o644) -> None:
        info = tarfile.TarInfo()
        info.mode, info.size = mode, len(data)
        self.tar.addfile(self._finish(info, target), io.BytesIO(data))

    def add_dir(self, target: str, mode: int = 0o755) -> None:
        info = tarfile.TarInfo()
        info.type, info.mode = tarfile.DIRTYPE, mode
        self.tar.addfile(self._finish(info, target))

    def add_archive(self, archive: BinaryIO, dest_dir: str, limits: TarLimits) -> None:
        """ADD of a local archive: its members under ``dest_dir``, none escaping it."""
        with open_tar(archive, limits) as reader:
            for member in reader:
                name = clean(member.name)
                if not name:
                    continue
                if member.kind is Kind.HARDLINK:
                    member.linkname = posixpath.join(dest_dir, clean(member.linkname)).lstrip("/")
                self.add_member(member, reader, posixpath.join(dest_dir, name))

    def close(self) -> None:
        self.tar.close()
