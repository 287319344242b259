"""FROM references -> base layers: scratch, built-in Debian bases, registries, OCI layouts.

Docker Hub names that match a built-in base (``debian:bookworm[-slim]``,
``python:3.11``; see ember.build.rootfs) are made locally with mmdebstrap;
every other reference is pulled (ember.build.oci) and its layers applied to a
fresh tree (ember.build.unpack). Either way the tree becomes a qcow2 disk kept
in the layer cache, keyed by the image manifest's digest (or the tarball), so a
base is unpacked once and a moved tag is noticed on the next build.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from ember.build import oci, rootfs
from ember.build.context import BuildContext
from ember.build.dockerfile import DEFAULT_PATH, ImageConfig
from ember.build.layers import Layer, LayerCache, step_key
from ember.build.tarread import ArchiveError, TarLimits
from ember.build.unpack import Capacity, Tree, remove_tree
from ember.config import Settings
from ember.errors import BuildFailed
from ember.host.qemuimg import QemuImg

Log = Callable[[str], None]


class BaseLayers:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.qemu_img = QemuImg.of(settings)
        self.cache = LayerCache(settings.data_dir / "layers", self.qemu_img, settings.layer_gid)
        self.blobs = oci.BlobStore(settings.cache_dir)
        self.blobs.clean_partial()
        self._debootstrap = asyncio.Lock()  # one mmdebstrap at a time (they share the cache directory)

    async def layer(self, ref: str, ctx: BuildContext, log: Log) -> Layer:
        """The base layer ``ref`` names. Builds prepare different bases at once; one base is made
        once (the layer cache's claim), so a slow registry holds up only the builds that want it."""
        if ref == "scratch":
            return await self._from_tarball("scratch", None, ImageConfig(), log)
        if oci.is_local(ref):
            return await self._local(ref, ctx, log)
        base = rootfs.builtin_base(ref)
        if base is not None:
            async with self._debootstrap:
                tarball = await rootfs.debian_tarball(base, self.settings.cache_dir, self.settings.debian_mirror)
            st = tarball.stat()
            identity = f"{base.key}:{st.st_size}:{st.st_mtime_ns}"
            return await self._from_tarball(identity, tarball, ImageConfig(env=(("PATH", DEFAULT_PATH),)), log)
        reference = oci.parse_reference(ref)
        async with oci.client(self.settings) as http:
            registry = oci.Registry(reference, http, self.settings.insecure_registries)
            log(f"resolving {reference}")
            async with self._pulling(ref):
                image = await oci.resolve(registry, self.blobs, reference.reference, ref)
            return await self._from_image(image, registry, ref, log)

    @contextlib.asynccontextmanager
    async def _pulling(self, ref: str) -> AsyncIterator[None]:
        """A host-side deadline on talking to a registry (httpx only bounds each read)."""
        try:
            async with asyncio.timeout(self.settings.pull_timeout_s):
                yield
        except TimeoutError:
            raise BuildFailed(
                f"the image did not arrive within {self.settings.pull_timeout_s:.0f} s (EMBER_PULL_TIMEOUT)",
                step=f"FROM {ref}",
            ) from None

    async def _local(self, ref: str, ctx: BuildContext, log: Log) -> Layer:
        scheme, rel, tag = oci.split_local(ref)
        if scheme == "oci-layout":
            layout = oci.Layout(ctx.tree, rel, ref)
            image = await oci.resolve(layout, self.blobs, layout.index_reference(tag), ref)
            return await self._from_image(image, layout, ref, log)
        if scheme != "oci-archive":
            raise oci.fail(ref, "local images are oci-layout://DIR[:tag] or oci-archive://FILE[:tag]")
        try:
            archive = ctx.tree.open_file(rel)
        except (OSError, ArchiveError):
            raise oci.fail(ref, f"{rel} is not a file in the build context") from None
        tmp = Path(tempfile.mkdtemp(dir=self.settings.data_dir, prefix=".layout-"))
        try:
            with archive:
                capacity = Capacity(self.settings.max_build_context_bytes, "EMBER_MAX_BUILD_CONTEXT_BYTES")
                await asyncio.to_thread(oci.unpack_archive, archive, tmp, ref, ctx.tree.limits, capacity)
            with Tree(tmp, ctx.tree.limits) as tree:
                layout = oci.Layout(tree, "", ref)
                image = await oci.resolve(layout, self.blobs, layout.index_reference(tag), ref)
                return await self._from_image(image, layout, ref, log)
        finally:
            await asyncio.to_thread(remove_tree, tmp)

    async def _from_image(self, image: oci.ResolvedImage, source: oci.Source, ref: str, log: Log) -> Layer:
        limit = self.settings.tar_max_bytes
        if sum(desc.size for desc in image.layers) > limit:
            raise BuildFailed(
                f"the image's layers add up to more than {limit} bytes (EMBER_TAR_MAX_BYTES)", f"FROM {ref}"
            )

        async def make(disk: Path) -> None:
            blobs = []
            async with self._pulling(ref):
                for i, desc in enumerate(image.layers, 1):
                    log(f"pulling layer {i}/{len(image.layers)} {desc.digest[:19]} ({desc.size / 1e6:.1f} MB)")
                    blobs.append(await self.blobs.fetch(source, desc, limit))
            log(f"unpacking {len(blobs)} layers of {image.digest[:19]}")

            def apply(root: Path) -> None:
                limits = TarLimits.from_settings(self.settings)
                disk = Capacity(self.settings.disk_gib << 30, "the image disk, EMBER_DISK_GIB")
                with Tree(root, limits, capacity=disk) as tree:
                    for blob in blobs:
                        tree.apply(blob)

            try:
                await asyncio.to_thread(rootfs.disk_from_tree, apply, disk, self.settings.disk_gib,
                                        self.settings.data_dir, self.qemu_img)  # fmt: skip
            except ArchiveError as exc:
                raise BuildFailed(str(exc), step=f"FROM {ref}") from None

        return await self._cached(f"oci:{image.digest}", image.config, make)

    async def _from_tarball(self, identity: str, tarball: Path | None, config: ImageConfig, log: Log) -> Layer:
        async def make(disk: Path) -> None:
            log(f"making the base disk for {identity.split(':')[0]}")
            await asyncio.to_thread(
                rootfs.disk_from_tarball, tarball, disk, self.settings.disk_gib, self.settings.data_dir, self.qemu_img
            )

        return await self._cached(identity, config, make)

    async def _cached(self, identity: str, config: ImageConfig, make: Callable[[Path], Awaitable[None]]) -> Layer:
        """The base layer for ``identity``: from the layer cache, else ``make`` writes its disk."""
        key = step_key("base", identity, self.settings.disk_gib)
        async with self.cache.claim(key):  # another build making this base: wait for it, then use it
            hit = await self.cache.get(key)
            if hit is not None:
                return hit
            disk = self.cache.disk(key)
            disk.unlink(missing_ok=True)  # a layer dropped above, or left by an interrupted make
            await make(disk)
            return await self.cache.put(key, config, None, self.settings.disk_gib << 30)
