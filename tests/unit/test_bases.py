"""Base images from registries: a host deadline on pulls, a size cap before any download, no global lock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from pathlib import Path

import pytest

from ember.build import oci
from ember.build.bases import BaseLayers
from ember.build.dockerfile import ImageConfig
from ember.config import Settings
from ember.errors import BuildFailed

LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


class Stalling:
    """A registry that starts a blob and then sends nothing (one byte per minute is as good)."""

    name = "stalling"

    def __init__(self) -> None:
        self.asked = 0

    async def manifest(self, reference: str) -> tuple[bytes, str]:
        raise AssertionError("not asked")

    async def chunks(self, desc: oci.Descriptor) -> AsyncGenerator[bytes, None]:
        self.asked += 1
        yield b"x"
        await asyncio.sleep(3600)


def bases(tmp_path: Path, **overrides: object) -> BaseLayers:
    settings = Settings(data_dir=tmp_path / "data", cache_dir_override=str(tmp_path / "cache"), **overrides)  # type: ignore[arg-type]
    settings.data_dir.mkdir()
    return BaseLayers(settings)


def image(*sizes: int) -> oci.ResolvedImage:
    layers = tuple(oci.Descriptor(LAYER, "sha256:" + f"{i:064x}", size) for i, size in enumerate(sizes, 1))
    return oci.ResolvedImage("sha256:" + "f" * 64, ImageConfig(), layers)


async def test_a_stalling_registry_fails_the_build_at_the_pull_deadline(tmp_path: Path) -> None:
    b = bases(tmp_path, pull_timeout_s=0.3)
    source = Stalling()
    started = asyncio.get_running_loop().time()
    with pytest.raises(BuildFailed, match="EMBER_PULL_TIMEOUT"):
        await b._from_image(image(100), source, "stalling/app", lambda _: None)
    assert source.asked == 1 and asyncio.get_running_loop().time() - started < 5


async def test_layers_over_the_limit_are_refused_before_any_download(tmp_path: Path) -> None:
    b = bases(tmp_path, tar_max_bytes=1 << 20)
    source = Stalling()
    with pytest.raises(BuildFailed, match="EMBER_TAR_MAX_BYTES"):
        await b._from_image(image(600 << 10, 600 << 10), source, "big/app", lambda _: None)
    assert source.asked == 0


async def test_a_slow_pull_does_not_hold_up_other_bases(tmp_path: Path) -> None:
    """One lock for every FROM let one stalling registry stop every build, cached ones too."""
    b = bases(tmp_path, pull_timeout_s=30)
    stalled = asyncio.create_task(b._from_image(image(100), Stalling(), "stalling/app", lambda _: None))
    await asyncio.sleep(0.1)
    scratch = await asyncio.wait_for(b.layer("scratch", None, lambda _: None), 60)  # type: ignore[arg-type]
    assert scratch.disk.exists() and not stalled.done()
    stalled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stalled
