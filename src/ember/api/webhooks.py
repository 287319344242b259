"""``/v1/webhooks``: a tenant's webhooks and their delivery logs (see :mod:`ember.webhooks`).

Every verb is scoped to the caller's tenant (admins: every tenant's, lists filterable with
``?tenant=``): another tenant's webhook id answers exactly like a missing one. The signing secret is
in the creation's answer only (and in the answer to a retry of that creation with the same
``client_token``: the first answer may have been lost, and the secret is needed to check signatures).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from ember.api.auth import principal, tenant_filter
from ember.api.models import ClientToken, CreatedWebhook
from ember.api.models import Delivery as DeliveryView
from ember.api.models import Webhook as WebhookView
from ember.api.schema import errors
from ember.db.webhooks import Delivery, Webhook
from ember.errors import WebhookNotFound
from ember.tenancy.idempotency import Idempotency, Settle
from ember.tenancy.principal import Principal
from ember.webhooks import MAX_URL

if TYPE_CHECKING:
    from ember.daemon import Daemon

MAX_DELIVERIES = 1000  # rows one delivery-log request returns at most
Who = Annotated[Principal, Depends(principal)]  # module level: FastAPI resolves the annotations by name


class WebhookBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        min_length=1, max_length=MAX_URL,
        description="http:// or https://, at public addresses (or a host in EMBER_WEBHOOK_TRUSTED_HOSTS)",
    )  # fmt: skip
    client_token: ClientToken | None = None


def webhook_view(hook: Webhook) -> dict[str, Any]:
    return {"id": hook.id, "tenant": hook.tenant, "url": hook.url, "created_at": hook.created_at}


def delivery_view(d: Delivery) -> dict[str, Any]:
    return {
        "id": d.id, "webhook_id": d.webhook_id, "event_id": d.event_id, "attempt": d.attempt, "at": d.at,
        "status": d.status, "error": d.error, "state": d.state.value, "duration_ms": d.duration_ms,
    }  # fmt: skip


def add_webhook_routes(app: FastAPI, daemon: Daemon) -> None:
    hooks = daemon.webhooks
    store = hooks.store
    once = Idempotency(daemon.tenants)

    async def owned(webhook_id: str, who: Principal) -> Webhook:
        hook = await asyncio.to_thread(store.get, webhook_id, tenant=None if who.admin else who.tenant)
        if hook is None:
            raise WebhookNotFound(webhook_id[:64])
        return hook

    @app.post("/v1/webhooks", status_code=201, response_model=CreatedWebhook, responses=errors(409))
    async def create_webhook(body: WebhookBody, who: Who) -> dict[str, Any]:
        """Register a URL that receives every VM event of the tenant; the answer's ``secret`` signs them."""

        async def create(settle: Settle) -> dict[str, Any]:
            async with daemon.quotas.lock(who.tenant):  # the count and the insert together: the cap holds
                hook, secret = await hooks.create(who.tenant, body.url)
            settle(hook.id)
            return {**webhook_view(hook), "secret": secret}

        async def existing(webhook_id: str) -> dict[str, Any]:
            hook = await owned(webhook_id, who)
            return {**webhook_view(hook), "secret": hooks.secrets.open(hook.secret_sealed)}

        return await once.create(who, "webhook", body.client_token, body.model_dump(mode="json"), create, existing)

    @app.get("/v1/webhooks", response_model=list[WebhookView])
    async def list_webhooks(who: Who, tenant: str | None = None) -> list[dict[str, Any]]:
        found = await asyncio.to_thread(store.list_webhooks, tenant=tenant_filter(who, tenant))
        return [webhook_view(h) for h in found]

    @app.get("/v1/webhooks/{webhook_id}", response_model=WebhookView)
    async def get_webhook(webhook_id: str, who: Who) -> dict[str, Any]:
        return webhook_view(await owned(webhook_id, who))

    @app.delete("/v1/webhooks/{webhook_id}", status_code=204, response_class=Response)
    async def delete_webhook(webhook_id: str, who: Who) -> Response:
        hook = await owned(webhook_id, who)
        if not await asyncio.to_thread(store.delete, hook.id, tenant=hook.tenant):
            raise WebhookNotFound(webhook_id[:64])
        return Response(status_code=204)

    @app.get("/v1/webhooks/{webhook_id}/deliveries", response_model=list[DeliveryView])
    async def list_deliveries(
        webhook_id: str, who: Who, limit: Annotated[int, Query(ge=1, le=MAX_DELIVERIES)] = 100
    ) -> list[dict[str, Any]]:
        """The newest attempts first: one row per attempt (PENDING: scheduled, not yet made)."""
        hook = await owned(webhook_id, who)
        return [delivery_view(d) for d in await asyncio.to_thread(store.deliveries, hook.id, limit=limit)]
