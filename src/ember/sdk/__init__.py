"""Ember's Python SDK: every verb of the API on :class:`Client` (sync, stdlib HTTP) and
:class:`AsyncClient` (asyncio, httpx), typed results, one exception tree (:mod:`ember.sdk.errors`).

    from ember.sdk import Client
    with Client() as ember:                     # EMBER_URL, else the local daemon's Unix socket
        vm = ember.vms.run("debian", tags={"team": "a"})
        result = vm.exec(["python3", "-c", "print(6*7)"])
        print(result.stdout, result.exit_code)
        vm.suspend()
        vm.resume()
        vm.remove()

The package imports no server module (ember.engine, ember.api, ember.build...), so it is cheap
to import; AsyncClient (and httpx) and each resource's result types load on first use.
"""

from __future__ import annotations

from ember.sdk import types
from ember.sdk.client import Client, Vm
from ember.sdk.core import IdlePolicy, Request
from ember.sdk.errors import (
    ApiError,
    BuildFailed,
    Conflict,
    ConnectError,
    ContextError,
    EmberError,
    Forbidden,
    GuestError,
    IdempotencyConflict,
    InsufficientStorage,
    InvalidRequest,
    InvalidState,
    NameTaken,
    NotFound,
    PayloadTooLarge,
    ProtocolError,
    QuotaExceeded,
    RateLimited,
    ServerError,
    TooManyRequests,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (2.5 ms of the CLI's start)
if TYPE_CHECKING:
    from typing import Any

    from ember.sdk.aio import AsyncClient, AsyncVm
    from ember.sdk.types import (
        ApiKey,
        Build,
        CreatedKey,
        CreatedWebhook,
        Delivery,
        Event,
        ExecExit,
        ExecOutput,
        ExecResult,
        Image,
        Listing,
        Tenant,
        Transition,
        Usage,
        Webhook,
        Whoami,
    )

__all__ = [
    "ApiError", "ApiKey", "AsyncClient", "AsyncVm", "Build", "BuildFailed", "Client", "Conflict", "ConnectError",
    "ContextError", "CreatedKey", "CreatedWebhook", "Delivery", "EmberError", "Event", "ExecExit", "ExecOutput",
    "ExecResult", "Forbidden", "GuestError", "IdempotencyConflict", "IdlePolicy", "Image", "InsufficientStorage",
    "InvalidRequest", "InvalidState", "Listing", "NameTaken", "NotFound", "PayloadTooLarge", "ProtocolError",
    "QuotaExceeded", "RateLimited", "Request", "ServerError", "Tenant", "TooManyRequests", "Transition",
    "Unauthorized", "Unavailable", "UnsupportedMediaType", "Usage", "Vm", "Webhook", "Whoami",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in ("AsyncClient", "AsyncVm"):  # httpx costs tens of milliseconds: only for async callers
        from ember.sdk import aio

        return getattr(aio, name)
    if name in types.HOMES:  # each resource's result types load when first used (ember.sdk.types)
        return getattr(types, name)
    raise AttributeError(f"module 'ember.sdk' has no attribute {name!r}")
