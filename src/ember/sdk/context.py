"""A build context directory as a tar, streamed (the caller's own files; the daemon re-checks all of it).

What the context's .dockerignore excludes is left out, as the daemon would leave it out (the
Dockerfile is always sent); symlinks are sent as symlinks, never followed. A file is read in
pieces as the upload goes, so a large context never sits in memory.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

from ember.dockerignore import IgnoreError, IgnoreMatcher, Verdicts
from ember.sdk.errors import ContextError

CHUNK = 1024 * 1024
MAX_DOCKERIGNORE = 1 << 20
BLOCK = tarfile.BLOCKSIZE


def context_tar(root: Path, dockerfile: str = "Dockerfile") -> Iterator[bytes]:
    """The context's tar in chunks; a context that cannot be sent raises :class:`ContextError` here,
    before anything is uploaded."""
    if not root.is_dir():
        raise ContextError(f"the build context {root} is not a directory")
    ignore = root / ".dockerignore"
    try:
        with open(ignore, "rb") as f:
            text = f.read(MAX_DOCKERIGNORE + 1)
    except FileNotFoundError:
        text = b""
    except OSError as exc:
        raise ContextError(f"cannot read {ignore}: {exc.strerror}") from None
    if len(text) > MAX_DOCKERIGNORE:
        raise ContextError(f"{ignore} is larger than {MAX_DOCKERIGNORE} bytes")
    try:
        matcher = IgnoreMatcher(text.decode("utf-8").splitlines())
    except (IgnoreError, UnicodeDecodeError) as exc:
        raise ContextError(f"{ignore}: {exc}") from None
    return _stream(root, matcher, dockerfile)


def _walk(root: Path, matcher: IgnoreMatcher, dockerfile: str) -> Iterator[str]:
    """Paths relative to ``root`` (parents first, sorted), not excluded; directories are entered
    when something under them may be re-included, symlinks never."""
    stack: list[tuple[str, Verdicts | None]] = [("", None)]
    sent_dockerfile = False
    while stack:
        base, verdicts = stack.pop()
        with os.scandir(root / base if base else root) as it:
            entries = sorted(it, key=lambda e: e.name, reverse=True)
        later: list[tuple[str, Verdicts | None]] = []
        for entry in reversed(entries):
            rel = f"{base}/{entry.name}" if base else entry.name
            sub, excluded = matcher.verdicts(rel, verdicts)
            if not excluded or rel == dockerfile:
                sent_dockerfile |= rel == dockerfile
                yield rel
            if entry.is_dir(follow_symlinks=False) and (not excluded or matcher.may_match_under(rel)):
                later.append((rel, sub))
        stack.extend(reversed(later))
    if not sent_dockerfile and (root / dockerfile).is_file():
        yield dockerfile  # in an excluded directory


def _stream(root: Path, matcher: IgnoreMatcher, dockerfile: str) -> Iterator[bytes]:
    tar = tarfile.TarFile(fileobj=io.BytesIO(), mode="w", format=tarfile.GNU_FORMAT)
    for rel in _walk(root, matcher, dockerfile):
        path = root / rel
        try:
            info = tar.gettarinfo(str(path), arcname=rel)
        except OSError:
            continue  # gone since it was listed
        if info is None:
            continue  # a socket or a device: not part of a context
        if not info.isreg():
            yield info.tobuf(tarfile.GNU_FORMAT, tar.encoding, tar.errors)
            continue
        try:
            f = open(path, "rb")  # noqa: SIM115 (closed below; the header goes first)
        except OSError as exc:
            raise ContextError(f"cannot read {path}: {exc.strerror}") from None
        with f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                continue  # replaced since it was listed
            yield info.tobuf(tarfile.GNU_FORMAT, tar.encoding, tar.errors)
            left = info.size
            while left:
                chunk = f.read(min(CHUNK, left)) or bytes(min(CHUNK, left))  # a file cut short: zeros
                left -= len(chunk)
                yield chunk
        if info.size % BLOCK:
            yield bytes(BLOCK - info.size % BLOCK)
    yield bytes(2 * BLOCK)
