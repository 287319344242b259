"""``GET /v1/usage``: what each tenant and VM used in a window (see :mod:`ember.usage` for what bills).

A tenant sees its own usage only; an admin sees every tenant's, or one tenant's with ``?tenant=``.
``since`` and ``until`` are ISO-8601 (a date, or a date and time; no offset means UTC); ``since``
defaults to the start of the current month (UTC), ``until`` to now.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, FastAPI, Query
from pydantic import BaseModel, WithJsonSchema

from ember.api.auth import principal
from ember.api.schema import errors
from ember.errors import Forbidden, TenantNotFound
from ember.tenancy.principal import Principal
from ember.usage import report, stamp, window_of

if TYPE_CHECKING:
    from ember.daemon import Daemon


# the document states RFC 3339 date-times; a plain date (2024-05-01) is taken too
DATE_TIME = WithJsonSchema({"type": "string", "format": "date-time", "minLength": 1, "maxLength": 64})
SINCE, UNTIL = "ISO-8601 (default: month start, UTC)", "ISO-8601 (default and latest: now)"


class TenantUsageView(BaseModel):
    tenant: str
    running_vcpu_seconds: float
    running_gib_seconds: float
    suspended_seconds: float
    snapshot_gib_hours: float
    image_gib_hours: float
    builds: int
    build_seconds: float


class VmUsageView(BaseModel):
    vm_id: str
    tenant: str
    running_vcpu_seconds: float
    running_gib_seconds: float
    suspended_seconds: float


class UsageView(BaseModel):
    since: str
    until: str
    tenants: list[TenantUsageView]
    vms: list[VmUsageView]


def add_usage_routes(app: FastAPI, daemon: Daemon) -> None:
    engine = daemon.engine.store.engine

    @app.get("/v1/usage", responses=errors(400, 403, 404))
    async def usage(
        who: Annotated[Principal, Depends(principal)],
        tenant: Annotated[str | None, Query(max_length=63, description="admins: one tenant (default: all)")] = None,
        since: Annotated[str | None, Query(min_length=1, max_length=64, description=SINCE), DATE_TIME] = None,
        until: Annotated[str | None, Query(min_length=1, max_length=64, description=UNTIL), DATE_TIME] = None,
    ) -> UsageView:
        """Running vCPU- and GiB-seconds, suspended seconds, snapshot and image GiB-hours and builds,
        per tenant and per VM, in ``[since, until)``."""
        window = window_of(since, until, datetime.now(UTC))
        if not who.admin:
            if tenant and tenant != who.tenant:
                raise Forbidden(f"a tenant key sees only its own usage: omit tenant or pass {who.tenant!r}")
            tenant = who.tenant
        elif tenant and await asyncio.to_thread(daemon.tenants.get_tenant, tenant) is None:
            raise TenantNotFound(tenant)
        # every event of the window is read and summed: off the event loop
        found = await asyncio.to_thread(report, engine, window, tenant or None)
        vms = [VmUsageView(**{k: getattr(v, k) for k in VmUsageView.model_fields}) for v in found.vms]
        tenants = [TenantUsageView(**vars(t)) for t in found.tenants]
        return UsageView(since=stamp(window.since), until=stamp(window.until), tenants=tenants, vms=vms)
