"""The layer cache: one qcow2 overlay per filesystem step, keyed by what produced it.

A layer's key hashes its parent's key, the instruction after expansion, the
build args and environment it saw, and the content of the context files it
read. ``<key>.qcow2`` backs onto its parent layer's file; ``<key>.json``
written after the step succeeded marks it usable. A file without its marker
is the remains of a failed or interrupted step and is removed.

A layer is written by one build VM, as that VM's own uid; when the VM has moved
on (or stopped), the layer is finished: it becomes root's, 0440 with the layer
group (build VMMs and qemu-img get that group; no VMM can write a layer), its
header must name exactly the chain Ember made (ember.host.qemuimg), and its
SHA-256 and those of the layers below it go into its marker. Every cache hit
checks the whole chain against those digests: a layer that changed on disk is
dropped with everything above it, and rebuilt. A file is re-hashed only when
its (inode, size, mtime, ctime) changed since this daemon last hashed it: a
root-owned 0440 file in a root-owned directory changes only through root, and
any write, chmod, chown or replacement changes one of those.

Builds run concurrently and share one cache: a step holds its key's claim
while it makes the layer, so a second build needing the same key waits and
then finds it made; unfinished layers are swept only at daemon start, when no
step can be making one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from ember.build.dockerfile import ImageConfig
from ember.host.qemuimg import ChainError, QemuImg
from ember.snapshot import XXH3, hash_file, rewrite_copy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layer:
    key: str
    disk: Path  # top of a qcow2 chain
    config: ImageConfig
    chain: tuple[Path, ...]  # every file of the chain, top (``disk``) first
    virtual_size: int


@dataclass(frozen=True)
class _Seen:
    identity: tuple[int, int, int, int]  # (inode, size, mtime, ctime) when it was hashed
    digest: str


def step_key(parent: str, *parts: object) -> str:
    return hashlib.sha256(json.dumps([parent, *parts], sort_keys=True, default=str).encode()).hexdigest()[:32]


class LayerCache:
    def __init__(self, root: Path, qemu_img: QemuImg, gid: int) -> None:
        self.root = root
        self.gid = gid  # the layer group: finished layers are root:gid 0440
        self.qemu_img = qemu_img.with_groups(gid)
        root.mkdir(parents=True, exist_ok=True)
        self._claims: dict[str, tuple[asyncio.Lock, int]] = {}  # key -> (lock, holders and waiters)
        self._seen: dict[str, _Seen] = {}  # key -> the layer file as this daemon last hashed it

    @contextlib.asynccontextmanager
    async def claim(self, key: str) -> AsyncIterator[None]:
        """Hold ``key`` while making its layer: one maker per key at a time."""
        lock, users = self._claims.get(key, (asyncio.Lock(), 0))
        self._claims[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._claims[key]
            if users == 1:
                del self._claims[key]
            else:
                self._claims[key] = (lock, users - 1)

    def disk(self, key: str) -> Path:
        return self.root / f"{key}.qcow2"

    def _marker(self, key: str) -> Path:
        return self.root / f"{key}.json"

    async def get(self, key: str) -> Layer | None:
        """The finished layer ``key`` if it and every layer below it are as they were recorded;
        else None (a changed layer is dropped, with ``key``, so that it is made again)."""
        try:
            data = json.loads(self._marker(key).read_text())
            chain = [(str(k), str(d)) for k, d in data["chain"]]
            config = ImageConfig.from_json(data["config"])
            virtual_size = int(data["virtual_size"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        for k, digest in chain:
            if not await self._intact(k, digest):
                log.warning("layer %s changed on disk since it was made: dropping it and what was built on it", k)
                self._drop(k)
                self._drop(key)
                return None
        return Layer(key, self.disk(key), config, tuple(self.disk(k) for k, _ in chain), virtual_size)

    async def _intact(self, key: str, digest: str) -> bool:
        try:
            fd = os.open(self.disk(key), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or (st.st_uid, st.st_gid, st.st_mode & 0o7777, st.st_nlink) != (
                0,
                self.gid,
                0o440,
                1,
            ):
                return False
            identity = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            seen = self._seen.get(key)
            if seen is not None and seen == _Seen(identity, digest):
                return True
        finally:
            os.close(fd)
        seen = await self._hash(key)
        if seen is None or seen.digest != digest or seen.identity != identity:
            return False
        self._seen[key] = seen
        return True

    async def put(self, key: str, config: ImageConfig, below: Layer | None, virtual_size: int) -> Layer:
        """Finish ``disk(key)`` (no VMM writes it any more), made on top of ``below``: root's and
        read-only, its header checked, its digest recorded. A layer failing that is discarded."""
        disk = self.disk(key)
        chain = (disk, *(below.chain if below is not None else ()))
        try:
            # a new inode of root's: the build VMM that wrote the layer may still hold the old one open
            # (a VMM that escaped its guest can keep a writable fd), which now points at nothing cached
            await asyncio.to_thread(rewrite_copy, disk, zero_pages_to_holes=False, gid=self.gid, mode=0o440)
            await self.qemu_img.check_chain(disk, chain)
            seen = await self._hash(key)
            if seen is None:
                raise ChainError("a layer changed while it was recorded")
            self._seen[key] = seen
        except BaseException:
            self._drop(key)
            raise
        # the marker of the file below: a metadata-only step (ENV, WORKDIR...) shares its parent's disk
        below_digests = [] if below is None else json.loads(self._marker(below.disk.stem).read_text())["chain"]
        record = {
            "config": config.to_json(), "virtual_size": virtual_size,
            "chain": [[key, self._seen[key].digest], *below_digests],
        }  # fmt: skip
        tmp = self._marker(key).with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self._marker(key))
        return Layer(key, disk, config, chain, virtual_size)

    async def _hash(self, key: str) -> _Seen | None:
        """The layer file's digest, if it did not change (or get replaced) while it was hashed."""
        path = self.disk(key)

        def identity() -> tuple[int, int, int, int]:
            st = os.stat(path, follow_symlinks=False)
            return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

        before = identity()
        digest = (await asyncio.to_thread(hash_file, path, True, algo=XXH3)).sha256  # root's 0440: see XXH3
        return _Seen(before, digest) if identity() == before else None

    def _drop(self, key: str) -> None:
        self._seen.pop(key, None)
        self._marker(key).unlink(missing_ok=True)
        self.disk(key).unlink(missing_ok=True)

    def discard(self, key: str) -> None:
        if not self._marker(key).exists():
            self.disk(key).unlink(missing_ok=True)

    def clean_unfinished(self) -> None:
        """Remove layers without a marker (at daemon start: no build is making one then)."""
        for disk in self.root.glob("*.qcow2"):
            if not disk.with_suffix(".json").exists():
                disk.unlink(missing_ok=True)
        for tmp in self.root.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
