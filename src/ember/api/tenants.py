"""Routes for tenants (admins only), API keys and ``whoami``."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, Response
from pydantic import BaseModel, ConfigDict, Field

from ember.api.auth import Authenticator, admin, principal, tenant_filter
from ember.api.limits import Limits
from ember.api.models import UNSET, ApiKey, ClientToken, CreatedKey, Tenant, TenantWithUsage, WhoAmI
from ember.api.schema import errors
from ember.db.tenants import KeyRecord, TenantRecord
from ember.errors import Conflict, KeyNotFound, TenantNotFound
from ember.tenancy.idempotency import Idempotency
from ember.tenancy.keys import NewKey, token_hash
from ember.tenancy.principal import Principal
from ember.tenancy.quotas import Quota

if TYPE_CHECKING:
    from ember.daemon import Daemon

TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
Quotas = dict[Quota, Annotated[int, Field(ge=0, le=2**53)]]  # a limit: a whole number from 0 up


class TenantBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(
        min_length=1, max_length=63, pattern=TENANT_NAME.pattern,
        description="Lowercase letters, digits and '-' (not first), at most 63",
    )  # fmt: skip
    quotas: Quotas = Field(default_factory=dict, description="Overrides of the default limits")
    client_token: ClientToken | None = None


class QuotasBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    quotas: Quotas = Field(description="Limits to change (the others stay)")


LABEL = r"^[^\x00-\x1f\x7f]*$"


class KeyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tenant: str | None = Field(default=None, max_length=63, description="Admins: the key's tenant (default: theirs)")
    name: str = Field(default="", max_length=200, pattern=LABEL, description="a label: no control characters")
    client_token: ClientToken | None = None


def _overrides(quotas: dict[Quota, int]) -> dict[str, int]:
    return {q.value: v for q, v in quotas.items()}


def key_view(key: KeyRecord) -> dict[str, Any]:
    return {
        "key_id": key.key_id, "tenant": key.tenant, "name": key.name, "access_key_id": key.access_key_id,
        "created_at": key.created_at, "revoked_at": key.revoked_at or None, "admin": key.tenant is None,
    }  # fmt: skip


def add_tenant_routes(app: FastAPI, daemon: Daemon, auth: Authenticator, limits: Limits) -> None:
    tenants = daemon.tenants
    once = Idempotency(tenants)

    def tenant_view(record: TenantRecord, *, with_use: bool = False) -> dict[str, Any]:
        view: dict[str, Any] = {
            "name": record.name, "account_id": record.account_id, "created_at": record.created_at,
            "quotas": {q.value: v for q, v in limits.limits(record.name).items()},
        }  # fmt: skip
        if with_use:
            view["usage"] = {q.value: v for q, v in limits.use(record.name).items()}
        return view

    def get_tenant(name: str) -> TenantRecord:
        record = tenants.get_tenant(name) if TENANT_NAME.match(name) else None
        if record is None:
            raise TenantNotFound(name[:63])
        return record

    @app.get("/v1/whoami", response_model=WhoAmI)
    async def whoami(who: Principal = Depends(principal)) -> dict[str, Any]:
        return {"tenant": who.tenant, "admin": who.admin, "key_id": who.key_id or None}

    @app.post("/v1/tenants", status_code=201, response_model=Tenant, responses=errors(409))
    async def create_tenant(body: TenantBody, who: Principal = Depends(admin)) -> dict[str, Any]:
        overrides = _overrides(body.quotas)

        async def create(settle: Any) -> dict[str, Any]:
            record = tenants.create_tenant(body.name)
            settle(record.name)
            if overrides:
                tenants.set_quotas(record.name, overrides)
            return tenant_view(get_tenant(record.name))

        async def existing(name: str) -> dict[str, Any]:
            return tenant_view(get_tenant(name))

        return await once.create(who, "tenant", body.client_token, body.model_dump(mode="json"), create, existing)

    @app.get("/v1/tenants", response_model=list[Tenant])
    async def list_tenants(_: Principal = Depends(admin)) -> list[dict[str, Any]]:
        return [tenant_view(t) for t in tenants.list_tenants()]

    @app.get("/v1/tenants/{name}", response_model=TenantWithUsage)
    async def show_tenant(name: str, _: Principal = Depends(admin)) -> dict[str, Any]:
        return tenant_view(get_tenant(name), with_use=True)

    @app.patch("/v1/tenants/{name}", response_model=TenantWithUsage)
    async def set_quotas(name: str, body: QuotasBody, _: Principal = Depends(admin)) -> dict[str, Any]:
        record = get_tenant(name)
        tenants.set_quotas(name, {**record.quotas, **_overrides(body.quotas)})
        return tenant_view(get_tenant(name), with_use=True)

    # ---- keys ----------------------------------------------------------------

    @app.post("/v1/keys", status_code=201, response_model=CreatedKey, responses=errors(409), **UNSET)
    async def create_key(body: KeyBody, who: Principal = Depends(principal)) -> dict[str, Any]:
        """A new key: its secrets are in this answer only (a retry with its client_token answers without them)."""
        tenant = body.tenant or who.tenant
        if not who.admin and tenant != who.tenant:
            raise TenantNotFound(tenant)  # as if missing: a tenant cannot learn other tenants' names
        get_tenant(tenant)

        async def create(settle: Any) -> dict[str, Any]:
            async with daemon.quotas.lock(tenant):  # the count and the insert together: the cap holds
                return make(settle)

        def make(settle: Any) -> dict[str, Any]:
            live = [k for k in tenants.list_keys(tenant) if not k.revoked_at]
            cap = daemon.settings.keys_per_tenant
            if len(live) >= cap:
                raise Conflict(f"tenant {tenant} has {len(live)} live API keys, the most it may hold "
                               f"(EMBER_KEYS_PER_TENANT={cap}): revoke one with 'ember key revoke KEY_ID'")  # fmt: skip
            new = NewKey.make()
            record = KeyRecord(
                key_id=new.key_id, tenant=tenant, name=body.name, token_hash=token_hash(new.api_key),
                access_key_id=new.access_key_id, secret_sealed=daemon.secrets.seal(new.secret_access_key),
            )  # fmt: skip
            tenants.add_key(record)
            settle(record.key_id)
            return {**key_view(record), "api_key": new.api_key, "secret_access_key": new.secret_access_key}

        async def existing(key_id: str) -> dict[str, Any]:
            # the secrets were shown once: a retry gets the key without them
            return key_view(_own_key(who, key_id))

        return await once.create(who, "key", body.client_token, body.model_dump(mode="json"), create, existing)

    def _own_key(who: Principal, key_id: str) -> KeyRecord:
        key = tenants.get_key(key_id) if len(key_id) <= 64 else None
        if key is None or key.tenant is None or (not who.admin and key.tenant != who.tenant):
            raise KeyNotFound(key_id[:64])
        return key

    @app.get("/v1/keys", response_model=list[ApiKey])
    async def list_keys(tenant: str | None = None, who: Principal = Depends(principal)) -> list[dict[str, Any]]:
        keys = tenants.list_keys(tenant_filter(who, tenant))
        return [key_view(k) for k in keys if k.tenant is not None]

    @app.delete("/v1/keys/{key_id}", status_code=204)
    async def revoke_key(key_id: str, who: Principal = Depends(principal)) -> Response:
        """Revoke a key: it stops working with the next request."""
        key = _own_key(who, key_id)
        tenants.revoke_key(key.key_id)
        auth.forget(key.key_id)
        return Response(status_code=204)
