"""The build context on the host: ``.dockerignore``, COPY/ADD sources, tar streams.

Everything the guest receives for a COPY/ADD is one tar stream built here from
the context (never following a symlink out of it), with Docker's destination
rules, ``--chown``/``--chmod`` applied to the headers, and local archives for
ADD unpacked member by member (names checked, so nothing lands outside the
destination). The guest extracts it chrooted into the image being built.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import posixpath
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from e2b_dockerfile_utils import PatternMatcher

from ember.build.dockerfile import DockerfileError, Instruction

GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class Owner:
    uid: int
    gid: int


class BuildContext:
    def __init__(self, root: Path, dockerfile: str = "Dockerfile") -> None:
        self.root = root.resolve()
        if not self.root.is_dir():
            raise DockerfileError(f"the build context {root} is not a directory")
        self.dockerfile = dockerfile
        ignore = self.root / ".dockerignore"
        patterns = ignore.read_text().splitlines() if ignore.is_file() else []
        patterns = [p.strip() for p in patterns if p.strip() and not p.strip().startswith("#")]
        try:
            self.matcher = PatternMatcher(patterns)
        except ValueError as exc:
            raise DockerfileError(f".dockerignore: {exc}") from None

    def dockerfile_text(self) -> str:
        path = self._inside(self.dockerfile)
        if not path.is_file():
            raise DockerfileError(f"no {self.dockerfile} in the build context (use -f to name another file)")
        return path.read_text()

    def _inside(self, rel: str) -> Path:
        clean = posixpath.normpath("/" + rel).lstrip("/")
        return self.root / clean if clean else self.root

    def excluded(self, rel: str) -> bool:
        return bool(rel) and self.matcher.matches(rel)

    def resolve(self, pattern: str, ins: Instruction) -> list[str]:
        """Context-relative paths a COPY source names (globs as Docker: '*' stays in one directory)."""
        clean = posixpath.normpath("/" + pattern).lstrip("/")
        if any(c in GLOB_CHARS for c in clean):
            found = sorted(glob.glob(clean, root_dir=self.root, include_hidden=True))
            found = [f for f in found if not self.excluded(f)]
            if not found:
                raise ins.error(f"no file in the build context matches '{pattern}'")
            return found
        path = self._inside(clean)
        if clean and (self.excluded(clean) or not (path.exists() or path.is_symlink())):
            raise ins.error(f"'{pattern}' is not in the build context (or .dockerignore excludes it)")
        return [clean]

    def walk(self, rel: str) -> list[str]:
        """``rel`` and everything under it (not excluded), parents first, symlinks not followed."""
        out = [rel]
        path = self._inside(rel)
        if path.is_dir() and not path.is_symlink():
            for dirpath, dirnames, filenames in os.walk(path):
                base = os.path.relpath(dirpath, self.root)
                base = "" if base == "." else base
                kept = []
                for d in sorted(dirnames):
                    sub = posixpath.join(base, d)
                    if not self.excluded(sub) or self.matcher.may_match_under(sub):
                        kept.append(d)
                        if not self.excluded(sub):
                            out.append(sub)
                dirnames[:] = kept
                files = [posixpath.join(base, f) for f in sorted(filenames)]
                out += [f for f in files if not self.excluded(f)]
        return out

    def file_digest(self, rels: list[str]) -> str:
        h = hashlib.sha256()
        for rel in rels:
            path = self._inside(rel)
            st = path.lstat()
            h.update(f"{rel}\0{st.st_mode}\0".encode())
            if stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(path).encode())
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
        return h.hexdigest()

    def path(self, rel: str) -> Path:
        return self._inside(rel)


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

    def add_path(self, source: Path, target: str, owner_default: Owner = Owner(0, 0)) -> None:
        st = source.lstat()
        info = tarfile.TarInfo()
        info.mode = stat.S_IMODE(st.st_mode)
        info.mtime = int(st.st_mtime)
        info.uid, info.gid = owner_default.uid, owner_default.gid
        if stat.S_ISDIR(st.st_mode):
            info.type = tarfile.DIRTYPE
            self.tar.addfile(self._finish(info, target))
        elif stat.S_ISLNK(st.st_mode):
            info.type = tarfile.SYMTYPE
            info.linkname = os.readlink(source)
            self.tar.addfile(self._finish(info, target))
        elif stat.S_ISREG(st.st_mode):
            info.size = st.st_size
            with open(source, "rb") as f:
                self.tar.addfile(self._finish(info, target), f)
        # sockets, fifos and devices in a context are skipped, as Docker does

    def add_bytes(self, data: bytes, target: str, mode: int = 0o644) -> None:
        info = tarfile.TarInfo()
        info.mode, info.size = mode, len(data)
        self.tar.addfile(self._finish(info, target), io.BytesIO(data))

    def add_dir(self, target: str, mode: int = 0o755) -> None:
        info = tarfile.TarInfo()
        info.type, info.mode = tarfile.DIRTYPE, mode
        self.tar.addfile(self._finish(info, target))

    def add_archive(self, archive: Path, dest_dir: str) -> None:
        """ADD of a local archive: its members under ``dest_dir``, none escaping it."""
        with tarfile.open(archive, mode="r:*") as src:
            for member in src:
                name = posixpath.normpath("/" + member.name).lstrip("/")
                if not name or name == ".":
                    continue
                if member.islnk():
                    member.linkname = posixpath.join(dest_dir, posixpath.normpath("/" + member.linkname).lstrip("/"))
                if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
                    continue
                member.name = posixpath.join(dest_dir, name).lstrip("/")
                if member.islnk():
                    member.linkname = member.linkname.lstrip("/")
                member.uname = member.gname = ""
                data = src.extractfile(member) if member.isreg() else None
                self.tar.addfile(member, data)

    def close(self) -> None:
        self.tar.close()


def is_archive(path: Path) -> bool:
    if not path.is_file() or path.is_symlink():
        return False
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False
