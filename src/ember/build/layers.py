"""The layer cache: one qcow2 overlay per filesystem step, keyed by what produced it.

A layer's key hashes its parent's key, the instruction after expansion, the
build args and environment it saw, and the content of the context files it
read. ``<key>.qcow2`` backs onto its parent layer's file; ``<key>.json``
written after the step succeeded marks it usable. A file without its marker
is the remains of a failed or interrupted step and is removed.

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
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from ember.build.dockerfile import ImageConfig


@dataclass(frozen=True)
class Layer:
    key: str
    disk: Path  # top of a qcow2 chain
    config: ImageConfig


def step_key(parent: str, *parts: object) -> str:
    return hashlib.sha256(json.dumps([parent, *parts], sort_keys=True, default=str).encode()).hexdigest()[:32]


class LayerCache:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._claims: dict[str, tuple[asyncio.Lock, int]] = {}  # key -> (lock, holders and waiters)

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

    def get(self, key: str) -> Layer | None:
        try:
            data = json.loads(self._marker(key).read_text())
        except (OSError, ValueError):
            return None
        disk = self.disk(key)
        return Layer(key, disk, ImageConfig.from_json(data["config"])) if disk.exists() else None

    def put(self, key: str, config: ImageConfig, parent: str) -> Layer:
        disk = self.disk(key)
        os.chmod(disk, 0o400)  # never written again; only the builder uid reads it
        tmp = self._marker(key).with_suffix(".tmp")
        tmp.write_text(json.dumps({"config": config.to_json(), "parent": parent}))
        os.replace(tmp, self._marker(key))
        return Layer(key, disk, config)

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
