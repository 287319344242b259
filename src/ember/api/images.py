"""Image routes (list, inspect, the built-in base) and how a tenant's image names are resolved.

A tenant sees its own images and the built-in bases (read-only); names are per tenant
(:mod:`ember.tenancy.names`), so another tenant's image answers exactly like a missing one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, Query
from fastapi.responses import StreamingResponse

from ember.api.auth import principal, tenant_filter
from ember.api.builds import build_view
from ember.api.models import UNSET, ImageItem
from ember.api.schema import streamed
from ember.api.streaming import Emit, stream_job
from ember.aws.images import runnable_version
from ember.errors import ImageNotFound
from ember.images import BASE_IMAGE
from ember.models import BuildRecord, ImageRecord
from ember.tenancy import names
from ember.tenancy.principal import Principal

if TYPE_CHECKING:
    from ember.daemon import Daemon


def image_view(image: ImageRecord) -> dict[str, Any]:
    return {
        "name": names.public(image.name),
        "tenant": image.tenant or None,
        "builtin": image.tenant == "",
        "created_at": image.created_at,
        "parent": names.public(image.parent) if image.parent else None,
        "disk_bytes": image.disk_bytes,
        "memory_bytes": image.memory_bytes,
        "memory_mib": image.machine.memory_mib,
        "vcpus": image.machine.vcpus,
        "accelerator": image.machine.accel.value,
        "qemu_version": image.machine.qemu_version,
    }


def find_image(daemon: Daemon, who: Principal, public: str, version: int | None = None) -> ImageRecord:
    """The image ``public`` (a repo's newest version, or ``version``) as ``who`` names it."""
    wanted = f"{public}:{version}" if version is not None and ":" not in public else public
    for name in names.candidates(who.tenant, wanted):
        try:
            return daemon.images.get(name)
        except ImageNotFound:
            continue
    raise ImageNotFound(wanted)


def resolve_image(daemon: Daemon, who: Principal, public: str, version: int | None = None) -> ImageRecord:
    """The image to run for ``public`` (:func:`find_image`): an INACTIVE or deleted version of an image of the AWS
    API is refused here too (ConflictException, as RunMicrovm does)."""
    image = find_image(daemon, who, public, version)
    runnable_version(daemon, image.name)
    return image


def add_image_routes(app: FastAPI, daemon: Daemon) -> None:
    store, images, engine = daemon.engine.store, daemon.images, daemon.engine

    def with_build(build: BuildRecord) -> dict[str, Any]:
        image = store.get_image(build.name)
        return {**(image_view(image) if image else {}), **build_view(build)}

    @app.get("/v1/images", response_model=list[ImageItem], **UNSET)
    async def list_images(
        who: Principal = Depends(principal), tenant: str | None = Query(default=None, max_length=63)
    ) -> list[dict[str, Any]]:
        """The caller's images (an admin's: every tenant's, or ``tenant``'s) and the built-in bases."""
        narrowed = tenant_filter(who, tenant)
        tenants = None if narrowed is None else (narrowed, "")
        built = {b.name: b for b in store.list_builds(tenants)}
        plain = [{**image_view(i), "state": "CREATED"} for i in store.list_images(tenants) if i.name not in built]
        return plain + [with_build(b) for b in built.values()]

    @app.get("/v1/images/{name}", response_model=ImageItem, **UNSET)
    async def get_image(name: str, who: Principal = Depends(principal)) -> dict[str, Any]:
        for internal in names.candidates(who.tenant, name):
            build = store.get_build(internal)
            if build is not None:
                return with_build(build)
        image = find_image(daemon, who, name)
        build = store.get_build(image.name)
        return with_build(build) if build else {**image_view(image), "state": "CREATED"}

    @app.post(
        "/v1/images/debian/prepare", response_class=StreamingResponse,
        responses=streamed("application/x-ndjson", "Progress events as NDJSON, then the image"),
    )  # fmt: skip
    async def prepare_base(who: Principal = Depends(principal)) -> StreamingResponse:
        """Build the built-in base image if needed (only an admin may start that build); streams progress."""
        if not who.admin and store.get_image(BASE_IMAGE) is None:
            raise ImageNotFound(f"{BASE_IMAGE} (the built-in base is not built yet: the operator builds it)")

        async def build(emit: Emit) -> dict[str, Any]:
            image = await images.ensure_base(lambda msg, metrics=None: emit({"progress": msg, **(metrics or {})}))
            engine.warm_up(image)
            return {"image": image_view(image)}

        return stream_job(build, "base image build", backlog_bytes=daemon.settings.stream_backlog_bytes,
                          marker_key="progress")  # fmt: skip
