"""Ember's REST API (FastAPI; the OpenAPI schema is served at /openapi.json).

Long-running or streaming answers (exec output, image build progress) are
NDJSON: one JSON object per line. Errors are ``{"error": KIND, "message":
...}`` with the status code of the :mod:`ember.errors` class.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ember.api.auth import Authenticator
from ember.api.builds import add_build_routes
from ember.api.guard import error_body
from ember.api.images import add_image_routes
from ember.api.limits import Limits
from ember.api.metrics import add_metrics_route
from ember.api.models import Info
from ember.api.schema import document
from ember.api.tenants import add_tenant_routes
from ember.api.usage import add_usage_routes
from ember.api.vms import accel_view, add_vm_routes
from ember.api.webhooks import add_webhook_routes
from ember.aws.router import add_aws_routes
from ember.errors import EmberError, InvalidRequest, TooManyRequests, log_with_id

if TYPE_CHECKING:
    from ember.daemon import Daemon


def add_error_handlers(app: FastAPI) -> None:
    """Errors as ``{"error": KIND, "message": ...}``; an unexpected one says only its id."""

    @app.exception_handler(EmberError)
    async def ember_error(_: Request, exc: EmberError) -> JSONResponse:
        headers = {}
        if isinstance(exc, TooManyRequests) and exc.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
        return JSONResponse(error_body(exc), status_code=exc.http_status, headers=headers)

    @app.exception_handler(DataError)
    async def unstorable(_: Request, exc: DataError) -> JSONResponse:
        # a value the database refuses (PostgreSQL: a NUL character in text, a number out of range)
        refused = InvalidRequest("a value in the request cannot be stored (a NUL character, or a number out of range)")
        return JSONResponse(error_body(refused), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # the exception's text may hold host paths or internals: the client gets an id to quote
        error_id = log_with_id(f"internal error in {request.method} {request.url.path}", exc=exc)
        message = f"internal error; the daemon log has the details under id {error_id}"
        return JSONResponse({"error": "InternalError", "message": message, "id": error_id}, status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette's own answers (an unknown path or method, a body that is not JSON) in Ember's error format
        kind = {400: "InvalidRequest", 404: "NotFound", 405: "MethodNotAllowed"}.get(exc.status_code, "HTTPError")
        return JSONResponse({"error": kind, "message": str(exc.detail)}, status_code=exc.status_code,
                            headers=exc.headers)  # fmt: skip

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": "InvalidRequest", "message": details}, status_code=400)


def create_app(daemon: Daemon, auth: Authenticator) -> FastAPI:
    engine, images = daemon.engine, daemon.images

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        # inside uvicorn's graceful shutdown: it re-raises SIGTERM afterwards, so later
        # cleanup would never run. Running VMs are left for the next daemon to re-adopt, once no
        # listener serves a request any more.
        await daemon.drain()
        await engine.close()
        await daemon.webhooks.close()

    app = FastAPI(
        title="Ember", version="0.1.0", description="Stateful micro-VMs for untrusted code", lifespan=lifespan
    )

    add_error_handlers(app)
    document(app)  # the OpenAPI document completed: ember.api.schema

    @app.get("/v1/info", response_model=Info)
    async def info() -> dict[str, Any]:
        return {
            "accelerator": {**accel_view(images.accel.accel.value), "reason": images.accel.reason},
            "qemu_version": images.qemu_version,
        }

    limits = Limits(daemon)
    add_tenant_routes(app, daemon, auth, limits)
    add_image_routes(app, daemon)
    add_build_routes(app, engine, daemon.builds, limits)
    add_vm_routes(app, daemon, limits)
    add_metrics_route(app, daemon)
    add_webhook_routes(app, daemon)
    add_usage_routes(app, daemon)
    add_aws_routes(app, daemon, auth)  # the AWS Lambda MicroVMs API (ember.aws), after every other route
    return app
