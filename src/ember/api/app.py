"""Ember's REST API (FastAPI; the OpenAPI schema is served at /openapi.json).

Long-running or streaming answers (exec output, image build progress) are
NDJSON: one JSON object per line. Errors are ``{"error": KIND, "message":
...}`` with the status code of the :mod:`ember.errors` class.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ember.agent import ExecRequest, ExecResult
from ember.api.builds import add_build_routes, build_view
from ember.api.execstdin import StdinPipe, StdinPipes
from ember.api.streaming import Emit, ndjson, stream_job
from ember.errors import EmberError, InvalidRequest, log_with_id
from ember.models import BuildRecord, ImageRecord, VmRecord
from ember.vmm.accel import TCG_WARNING

if TYPE_CHECKING:
    from ember.daemon import Daemon


class RunBody(BaseModel):
    image: str = Field(min_length=1, max_length=200)


class SnapshotBody(BaseModel):
    name: str = Field(min_length=1, max_length=63)


class ExecBody(BaseModel):
    # unknown fields are refused: the removed ``stdin_b64`` must not be ignored silently
    model_config = ConfigDict(extra="forbid")

    argv: list[str] = Field(min_length=1, max_length=1000)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str = ""
    user: str = ""
    timeout_s: float = Field(default=0, ge=0, le=86400)
    stdin: bool = False  # the input follows in PUT /v1/vms/{id}/exec/stdin/{the first event's "stdin"}


def accel_view(record_accel: str) -> dict[str, Any]:
    secure = record_accel == "kvm"
    return {
        "name": record_accel,
        "security_boundary": secure,
        **({} if secure else {"warning": TCG_WARNING}),
    }


def vm_view(vm: VmRecord) -> dict[str, Any]:
    return {
        "id": vm.id,
        "image": vm.image,
        "state": vm.state.value,
        "state_reason": vm.state_reason,
        "accelerator": accel_view(vm.machine.accel.value),
        "memory_mib": vm.machine.memory_mib,
        "vcpus": vm.machine.vcpus,
        "pid": vm.pid or None,
        "created_at": vm.created_at,
        "updated_at": vm.updated_at,
    }


def image_view(image: ImageRecord) -> dict[str, Any]:
    return {
        "name": image.name,
        "created_at": image.created_at,
        "parent": image.parent or None,
        "disk_bytes": image.disk_bytes,
        "memory_bytes": image.memory_bytes,
        "memory_mib": image.machine.memory_mib,
        "accelerator": image.machine.accel.value,
        "qemu_version": image.machine.qemu_version,
    }


def add_error_handlers(app: FastAPI) -> None:
    """Errors as ``{"error": KIND, "message": ...}``; an unexpected one says only its id."""

    @app.exception_handler(EmberError)
    async def ember_error(_: Request, exc: EmberError) -> JSONResponse:
        return JSONResponse({"error": type(exc).__name__, "message": str(exc)}, status_code=exc.http_status)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # the exception's text may hold host paths or internals: the client gets an id to quote
        error_id = log_with_id(f"internal error in {request.method} {request.url.path}", exc=exc)
        message = f"internal error; the daemon log has the details under id {error_id}"
        return JSONResponse({"error": "InternalError", "message": message, "id": error_id}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": "InvalidRequest", "message": details}, status_code=400)


def create_app(daemon: Daemon) -> FastAPI:
    engine, images = daemon.engine, daemon.images

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        # inside uvicorn's graceful shutdown: it re-raises SIGTERM afterwards, so later
        # cleanup would never run. Running VMs are left for the next daemon to re-adopt.
        await engine.close()

    app = FastAPI(
        title="Ember", version="0.1.0", description="Stateful micro-VMs for untrusted code", lifespan=lifespan
    )

    add_error_handlers(app)

    @app.get("/v1/info")
    async def info() -> dict[str, Any]:
        return {
            "accelerator": {**accel_view(images.accel.accel.value), "reason": images.accel.reason},
            "qemu_version": images.qemu_version,
        }

    # ---- images ------------------------------------------------------------

    @app.get("/v1/images")
    async def list_images() -> list[dict[str, Any]]:
        built = {b.name: b for b in daemon.builds.store.list_builds()}
        plain = [{**image_view(i), "state": "CREATED"} for i in images.list() if i.name not in built]
        return plain + [_with_image(b) for b in built.values()]

    def _with_image(build: BuildRecord) -> dict[str, Any]:
        image = images.store.get_image(build.name)
        return {**(image_view(image) if image else {}), **build_view(build)}

    @app.get("/v1/images/{name}")
    async def get_image(name: str) -> dict[str, Any]:
        build = daemon.builds.store.get_build(name)
        if build is None:
            image = images.get(name)
            build = daemon.builds.store.get_build(image.name)
            if build is None:
                return {**image_view(image), "state": "CREATED"}
        return _with_image(build)

    add_build_routes(app, engine, daemon.builds)

    @app.post("/v1/images/debian/prepare")
    async def prepare_base() -> StreamingResponse:
        """Build the built-in base image if needed; streams progress lines."""

        async def build(emit: Emit) -> dict[str, Any]:
            image = await images.ensure_base(lambda msg, metrics=None: emit({"progress": msg, **(metrics or {})}))
            engine.warm_up(image)
            return {"image": image_view(image)}

        return stream_job(build, "base image build", backlog_bytes=daemon.settings.stream_backlog_bytes,
                          marker_key="progress")  # fmt: skip

    # ---- VMs -------------------------------------------------------------

    @app.post("/v1/vms", status_code=201)
    async def run_vm(body: RunBody) -> dict[str, Any]:
        return vm_view(await engine.run(body.image))

    @app.get("/v1/vms")
    async def list_vms() -> list[dict[str, Any]]:
        # every record read and decoded: milliseconds with hundreds of VMs, so off the event loop
        return await asyncio.to_thread(lambda: [vm_view(v) for v in engine.list_vms()])

    @app.get("/v1/vms/{vm_id}")
    async def inspect_vm(vm_id: str) -> dict[str, Any]:
        view = vm_view(engine.get(vm_id))
        view.update(await engine.inspect(vm_id))
        return view

    @app.delete("/v1/vms/{vm_id}", status_code=204)
    async def remove_vm(vm_id: str) -> Response:
        await engine.remove(vm_id)
        return Response(status_code=204)

    @app.post("/v1/vms/{vm_id}/suspend")
    async def suspend_vm(vm_id: str) -> dict[str, Any]:
        t = await engine.suspend(vm_id)
        view = vm_view(engine.get(vm_id))
        return {**view, "elapsed_ms": round(t.total_ms, 1), "phases_ms": t.phases_ms, "snapshot_bytes": t.bytes_written}

    @app.post("/v1/vms/{vm_id}/resume")
    async def resume_vm(vm_id: str) -> dict[str, Any]:
        t = await engine.resume(vm_id)
        return {**vm_view(engine.get(vm_id)), "elapsed_ms": round(t.total_ms, 1), "phases_ms": t.phases_ms}

    @app.post("/v1/vms/{vm_id}/snapshot", status_code=201)
    async def snapshot_vm(vm_id: str, body: SnapshotBody) -> dict[str, Any]:
        return image_view(await engine.snapshot(vm_id, body.name))

    stdin_pipes = StdinPipes()

    @app.post("/v1/vms/{vm_id}/exec")
    async def exec_vm(vm_id: str, body: ExecBody) -> StreamingResponse:
        """Run a command; NDJSON output events, then its exit status. With ``stdin`` the first
        event is ``{"stdin": ID}``: stream the input with PUT /v1/vms/{vm_id}/exec/stdin/ID."""
        for key in body.env:
            if not key or "=" in key:
                raise InvalidRequest(f"bad environment variable name {key!r}")
        req = ExecRequest(
            argv=body.argv, env=[f"{k}={v}" for k, v in body.env.items()], cwd=body.cwd, user=body.user,
            timeout_s=body.timeout_s,
        )  # fmt: skip
        pipe = stdin_pipes.open(vm_id, daemon.settings.agent_timeout_s) if body.stdin else None
        try:
            events = await engine.exec(vm_id, req, pipe)
        except BaseException:
            if pipe is not None:
                stdin_pipes.close(pipe)  # no exec (unknown VM, not running, bad input): no pipe
            raise
        # Fail before the 200 if the command cannot start (bad input, cwd, unknown user...):
        # its first event, or the agent pulling stdin, shows that it runs.
        first = asyncio.ensure_future(anext(events))
        try:
            if pipe is not None:
                wanted = asyncio.ensure_future(pipe.wanted.wait())
                await asyncio.wait({first, wanted}, return_when=asyncio.FIRST_COMPLETED)
                wanted.cancel()
                if first.done():
                    first.result()
            else:
                await first
        except BaseException:
            await _end_exec(events, first, pipe)
            raise

        async def stream() -> AsyncIterator[bytes]:
            try:
                if pipe is not None:
                    yield ndjson({"stdin": pipe.id})
                item: tuple[str, bytes] | ExecResult | None = await first
                while item is not None:
                    if isinstance(item, ExecResult):
                        yield ndjson({"exit_code": item.exit_code, "signal": item.signal, "timed_out": item.timed_out})
                        return
                    yield ndjson({"stream": item[0], "data": base64.b64encode(item[1]).decode()})
                    item = await anext(events, None)
            except EmberError as exc:
                yield ndjson({"error": type(exc).__name__, "message": str(exc)})
            finally:
                await _end_exec(events, first, pipe)

        return StreamingResponse(stream(), media_type="application/x-ndjson")

    async def _end_exec(
        events: AsyncIterator[tuple[str, bytes] | ExecResult], first: asyncio.Future[Any], pipe: StdinPipe | None
    ) -> None:
        if pipe is not None:
            stdin_pipes.close(pipe)
        if not first.done():
            first.cancel()
        with contextlib.suppress(BaseException):
            await first
        with contextlib.suppress(Exception):
            await events.aclose()  # type: ignore[attr-defined]

    @app.put("/v1/vms/{vm_id}/exec/stdin/{stdin_id}")
    async def exec_stdin(vm_id: str, stdin_id: str, request: Request) -> dict[str, Any]:
        """The stdin of a running exec, as the raw request body (streamed, flow-controlled)."""
        pipe = stdin_pipes.claim(vm_id, stdin_id)
        return {"bytes": await pipe.attach(request.stream())}

    @app.put("/v1/vms/{vm_id}/files")
    async def put_file(
        vm_id: str, request: Request, path: str = Query(...), mode: int = Query(0o644, ge=0, le=0o7777),
        mkdirs: bool = False,
    ) -> dict[str, Any]:  # fmt: skip
        size = await engine.write_file(vm_id, path, request.stream(), mode, mkdirs)
        return {"path": path, "bytes": size}

    @app.get("/v1/vms/{vm_id}/files")
    async def get_file(vm_id: str, path: str = Query(...)) -> StreamingResponse:
        size, chunks = await engine.read_file(vm_id, path)
        # the size at open time; the stream ends at EOF even if the file grew
        return StreamingResponse(chunks, media_type="application/octet-stream", headers={"X-Ember-Size": str(size)})

    @app.get("/v1/vms/{vm_id}/ls")
    async def list_files(vm_id: str, path: str = Query(...)) -> dict[str, Any]:
        """``entries`` sorted by name; ``truncated``: the directory has more than EMBER_LS_MAX_ENTRIES."""
        listing = await engine.list_dir(vm_id, path)
        entries = [
            {"name": e.name, "mode": e.mode, "size": e.size, "mtime": e.mtime}
            for e in sorted(listing.entries, key=lambda entry: entry.name)
        ]
        return {"entries": entries, "truncated": listing.truncated}

    return app
