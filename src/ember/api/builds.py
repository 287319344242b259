"""Image build routes: upload a context tar, stream the build log, logs/rm afterwards."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import PlainTextResponse, StreamingResponse

from ember.api.auth import principal
from ember.api.limits import Limits
from ember.api.models import ClientToken
from ember.api.schema import errors, raw_body, streamed
from ember.api.streaming import Emit, stream_job
from ember.build.builder import BuildOptions
from ember.build.service import MAX_READY_TIMEOUT_S, BuildRequest, BuildService, split_name
from ember.build.tarread import ArchiveError, TarLimits
from ember.build.unpack import Capacity, Tree, remove_tree
from ember.engine import Engine
from ember.errors import ImageNotFound, InvalidRequest, UnsupportedMediaType
from ember.metrics import Operation
from ember.models import BuildRecord, BuildState
from ember.tenancy import names
from ember.tenancy.idempotency import Idempotency, Settle
from ember.tenancy.principal import Principal
from ember.tenancy.quotas import Ask, Quota

log = logging.getLogger(__name__)

LOG_TAIL_DEFAULT = 1024 * 1024  # bytes of a build log answered unless ?tail= asks for more
LOG_TAIL_MAX = 64 * 1024 * 1024


def build_view(record: BuildRecord) -> dict[str, Any]:
    return {
        "name": names.public(record.name), "repo": names.public(record.repo), "version": record.version,
        "state": record.state.value, "tenant": record.tenant,
        "error": record.error or None, "failed_step": record.step or None,
        "config": json.loads(record.config) if record.config else None,
        "build": json.loads(record.steps) if record.steps else None,
        "disk_bytes": record.disk_bytes, "memory_bytes": record.memory_bytes, "build_seconds": round(record.seconds, 2),
        "created_at": record.created_at, "finished_at": record.finished_at or None,
    }  # fmt: skip


async def _receive_context(request: Request, into: Path, limits: TarLimits, capacity: Capacity) -> None:
    """The uploaded context tar, unpacked by Ember's confined, bounded reader (never tarfile, never as paths)."""
    upload = into / "context.tar"
    with open(upload, "wb") as f:
        async for chunk in request.stream():  # its size is capped by ember.api.guard (EMBER_MAX_BUILD_CONTEXT_BYTES)
            f.write(chunk)
    root = into / "context"
    root.mkdir()

    def unpack() -> None:
        with Tree(root, limits, capacity=capacity) as tree:
            tree.apply(upload, layer=False)

    try:
        await asyncio.to_thread(unpack)
    except ArchiveError as exc:
        raise InvalidRequest(f"the build context must be a tar (plain, gzip, zstd, bzip2 or xz): {exc}") from None
    finally:
        upload.unlink(missing_ok=True)


def _log_tail(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        start = max(0, size - limit)
        f.seek(start)
        data = f.read(limit)
    if start == 0:
        return data.decode(errors="replace")
    cut = data.find(b"\n") + 1  # start at a whole line
    skipped = start + cut
    note = f"... {skipped} earlier bytes of the log not shown (more with ?tail=BYTES, 'ember image logs --tail') ...\n"
    return note + data[cut:].decode(errors="replace")


def add_build_routes(app: FastAPI, engine: Engine, builds: BuildService, limits: Limits) -> None:
    once = Idempotency(limits.daemon.tenants)

    @app.post(
        "/v1/images/build", response_class=StreamingResponse,
        responses={**streamed("application/x-ndjson", "The build log as NDJSON events, then the build"),
                   **errors(409, 415)},
        openapi_extra=raw_body("application/x-tar", "The build context: a tar (plain, gzip, zstd, bzip2 or xz)"),
    )  # fmt: skip
    async def build_image(
        request: Request,
        name: str = Query(min_length=1, max_length=200),
        who: Principal = Depends(principal),
        client_token: ClientToken | None = None,
        dockerfile: str = "Dockerfile",
        build_arg: list[str] = Query(default=[]),
        target: str = "",
        ready_cmd: str = "",
        ready_timeout: float = Query(default=120.0, gt=0, le=MAX_READY_TIMEOUT_S, allow_inf_nan=False),
        no_cache: bool = False,
        network: bool = True,
        host_ca_certs: bool = False,
    ) -> StreamingResponse:
        """Build an image from a context tar (request body); streams the build log as NDJSON."""
        if request.headers.get("content-type", "").partition(";")[0].strip().lower() != "application/x-tar":
            # a browser can send text/plain anywhere without asking (CSRF); a tar is declared as one
            raise UnsupportedMediaType("send the build context as a tar with 'Content-Type: application/x-tar'")
        split_name(name)
        names.new_repo(who.tenant, name.partition(":")[0])
        args = []
        for item in build_arg:
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise InvalidRequest(f"--build-arg {item!r}: expected NAME=VALUE")
            args.append((key, value))
        tmp = Path(tempfile.mkdtemp(prefix="build-", dir=builds.settings.data_dir))
        try:
            tar_limits = TarLimits.from_settings(builds.settings)
            capacity = Capacity(builds.settings.max_build_context_bytes, "EMBER_MAX_BUILD_CONTEXT_BYTES")
            await _receive_context(request, tmp, tar_limits, capacity)
            await builds.parser.check(tmp / "context", dockerfile, dict(args))
        except BaseException:
            await asyncio.to_thread(remove_tree, tmp)
            raise
        req = BuildRequest(
            name=name, tenant=who.tenant, dockerfile=dockerfile,
            options=BuildOptions(build_args=tuple(args), target=target, no_cache=no_cache, network=network,
                                 host_ca_certs=host_ca_certs),
            ready_cmd=("/bin/sh", "-c", ready_cmd) if ready_cmd else (), ready_timeout_s=ready_timeout,
        )  # fmt: skip

        # a build's size is known only at its end: a tenant already past its storage quota builds nothing
        asks = [Ask(Quota.IMAGES, 1), Ask(Quota.CONCURRENT_BUILDS, 1), Ask(Quota.STORAGE_BYTES, 0)]
        body = {"name": name, "dockerfile": dockerfile, "build_arg": build_arg, "target": target,
                "ready_cmd": ready_cmd, "ready_timeout": ready_timeout, "no_cache": no_cache, "network": network,
                "host_ca_certs": host_ca_certs}  # fmt: skip

        async def start(settle: Settle) -> StreamingResponse:
            # the quota is checked (429) before the answer starts; the build's record makes its use count
            admitted = limits.admit(who.tenant, asks, Operation.BUILD)
            release = await admitted.__aenter__()

            async def run(emit: Emit) -> dict[str, Any]:
                made: list[BuildRecord] = []

                def recorded(record: BuildRecord) -> None:
                    made.append(record)
                    settle(record.name)
                    release()

                try:
                    record = await builds.build(req, tmp / "context", lambda line: emit({"log": line}), recorded)
                finally:
                    await admitted.__aexit__(None, None, None)
                    await asyncio.to_thread(remove_tree, tmp)
                    if not made:  # refused before its record (a name taken, bad input): a retry runs again
                        once.release(who, "build", client_token)
                image = builds.store.get_image(record.name) if record.state is BuildState.CREATED else None
                if image is not None:
                    engine.warm_up(image)
                return {"build": build_view(record)}

            return stream_job(run, "image build", backlog_bytes=builds.settings.stream_backlog_bytes)

        async def existing(build_name: str) -> StreamingResponse:
            await asyncio.to_thread(remove_tree, tmp)
            record = builds.store.get_build(build_name)
            view = build_view(record) if record else {}

            async def done(_: Emit) -> dict[str, Any]:
                return {"build": view}

            return stream_job(done, "image build", backlog_bytes=builds.settings.stream_backlog_bytes)

        try:
            return await once.create(who, "build", client_token, body, start, existing)
        except BaseException:
            await asyncio.to_thread(remove_tree, tmp)
            raise

    @app.get("/v1/images/{name}/logs", response_class=PlainTextResponse)
    async def image_logs(
        name: str,
        tail: int = Query(default=LOG_TAIL_DEFAULT, gt=0, le=LOG_TAIL_MAX),
        who: Principal = Depends(principal),
    ) -> str:
        """The last ``tail`` bytes of a build's log (from a line start); says how much it left out."""
        internal = names.internal(who.tenant, name)
        record = builds.store.get_build(internal)
        if record is None and ":" not in name:
            latest = builds.store.latest_image(internal)
            record = builds.store.get_build(latest.name) if latest else None
        if record is None:
            raise ImageNotFound(name)
        try:
            return await asyncio.to_thread(_log_tail, builds.log_path(record.name), tail)
        except FileNotFoundError:
            return ""

    @app.delete("/v1/images/{name}", status_code=204, responses=errors(409))
    async def remove_image(
        name: str, every_version: bool = Query(default=False, alias="all"), who: Principal = Depends(principal)
    ) -> None:
        """Remove an image version; a repo name with several versions needs ``all=true``."""
        internal = names.writable(who.tenant, name)
        try:
            removed_names = await engine.remove_image(internal, every_version=every_version)
        except ImageNotFound:
            raise ImageNotFound(name) from None  # the public name, as the caller gave it
        for removed in removed_names:
            builds.log_path(removed).unlink(missing_ok=True)
