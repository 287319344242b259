"""Tenants, their API keys, and the idempotency tokens of create calls."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Engine, RowMapping
from sqlalchemy.exc import IntegrityError

from ember.db.schema import api_keys, idempotency, tenants
from ember.errors import NameTaken
from ember.models import utcnow


@dataclass(frozen=True)
class TenantRecord:
    name: str
    account_id: str
    quotas: dict[str, int] = field(default_factory=dict)  # overrides of the Settings defaults
    created_at: str = field(default_factory=utcnow)


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    tenant: str | None  # None: an admin key
    name: str
    token_hash: str
    access_key_id: str
    secret_sealed: str
    created_at: str = field(default_factory=utcnow)
    revoked_at: str = ""


def _tenant(row: RowMapping) -> TenantRecord:
    return TenantRecord(**{**row, "quotas": json.loads(row["quotas"])})


class TenantStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # tenants
    def create_tenant(self, name: str) -> TenantRecord:
        for _ in range(5):  # account ids are random: retry the rare collision
            record = TenantRecord(name=name, account_id=f"{secrets.randbelow(10**12):012d}")
            try:
                with self.engine.begin() as c:
                    if c.execute(select(tenants.c.name).where(tenants.c.name == name)).first() is not None:
                        raise NameTaken(f"a tenant named '{name}' exists: list tenants with 'ember tenant ls'")
                    c.execute(insert(tenants).values(**{**record.__dict__, "quotas": "{}"}))
                return record
            except IntegrityError:
                if self.get_tenant(name) is not None:
                    raise NameTaken(f"a tenant named '{name}' exists: list tenants with 'ember tenant ls'") from None
        raise RuntimeError("no free account id after 5 tries")

    def get_tenant(self, name: str) -> TenantRecord | None:
        with self.engine.connect() as c:
            row = c.execute(select(tenants).where(tenants.c.name == name)).mappings().first()
        return _tenant(row) if row else None

    def list_tenants(self) -> list[TenantRecord]:
        with self.engine.connect() as c:
            return [_tenant(r) for r in c.execute(select(tenants).order_by(tenants.c.name)).mappings()]

    def set_quotas(self, name: str, quotas: dict[str, int]) -> None:
        with self.engine.begin() as c:
            c.execute(update(tenants).where(tenants.c.name == name).values(quotas=json.dumps(quotas, sort_keys=True)))

    # keys
    def add_key(self, record: KeyRecord) -> None:
        with self.engine.begin() as c:
            c.execute(insert(api_keys).values(**record.__dict__))

    def key_by_hash(self, token_hash: str) -> KeyRecord | None:
        with self.engine.connect() as c:
            row = c.execute(select(api_keys).where(api_keys.c.token_hash == token_hash)).mappings().first()
        return KeyRecord(**row) if row else None

    def key_by_access_key(self, access_key_id: str) -> KeyRecord | None:
        with self.engine.connect() as c:
            row = c.execute(select(api_keys).where(api_keys.c.access_key_id == access_key_id)).mappings().first()
        return KeyRecord(**row) if row else None

    def get_key(self, key_id: str) -> KeyRecord | None:
        with self.engine.connect() as c:
            row = c.execute(select(api_keys).where(api_keys.c.key_id == key_id)).mappings().first()
        return KeyRecord(**row) if row else None

    def list_keys(self, tenant: str | None = None) -> list[KeyRecord]:
        query = select(api_keys).order_by(api_keys.c.created_at, api_keys.c.key_id)
        if tenant is not None:
            query = query.where(api_keys.c.tenant == tenant)
        with self.engine.connect() as c:
            return [KeyRecord(**r) for r in c.execute(query).mappings()]

    def revoke_key(self, key_id: str) -> None:
        with self.engine.begin() as c:
            c.execute(update(api_keys).where(api_keys.c.key_id == key_id, api_keys.c.revoked_at == "")
                      .values(revoked_at=utcnow()))  # fmt: skip

    def put_admin_key(self, key_id: str, token_hash: str) -> None:
        """The TCP listener's token file as an admin key (replaced when the file changed)."""
        with self.engine.begin() as c:
            c.execute(delete(api_keys).where(api_keys.c.key_id == key_id))
            c.execute(insert(api_keys).values(
                key_id=key_id, tenant=None, name="the daemon's api-token file", token_hash=token_hash,
                access_key_id=f"ADMIN{secrets.token_hex(6).upper()}", secret_sealed="", created_at=utcnow(),
                revoked_at="",
            ))  # fmt: skip

    # idempotency
    def claim_token(
        self, tenant: str, kind: str, token: str, body_hash: str, abandoned_before: str = ""
    ) -> tuple[bool, str, str]:
        """Claim ``token`` for a create call: (claimed by us, body hash, resource id of whoever holds it; "" while
        its create runs). A claim still without a resource made before ``abandoned_before`` was abandoned (its
        daemon died mid-create): it is taken over."""
        row = {"tenant": tenant, "kind": kind, "token": token, "body_hash": body_hash, "resource_id": "",
               "created_at": utcnow()}  # fmt: skip
        try:
            with self.engine.begin() as c:
                c.execute(insert(idempotency).values(**row))
            return True, body_hash, ""
        except IntegrityError:
            with self.engine.connect() as c:
                held = c.execute(select(idempotency.c.body_hash, idempotency.c.resource_id, idempotency.c.created_at)
                                 .where(*self._key(tenant, kind, token))).first()  # fmt: skip
            if held is not None and not held[1] and str(held[2]) < abandoned_before:
                with self.engine.begin() as c:
                    c.execute(delete(idempotency).where(*self._key(tenant, kind, token),
                                                        idempotency.c.created_at == held[2]))  # fmt: skip
                held = None
            if held is None:  # released (or abandoned) between our insert and this read: claim again
                return self.claim_token(tenant, kind, token, body_hash, abandoned_before)
            return False, str(held[0]), str(held[1])

    def settle_token(self, tenant: str, kind: str, token: str, resource_id: str) -> None:
        with self.engine.begin() as c:
            c.execute(update(idempotency).where(*self._key(tenant, kind, token)).values(resource_id=resource_id))

    def release_token(self, tenant: str, kind: str, token: str) -> None:
        """A create that failed frees its token, so the client's retry runs again."""
        with self.engine.begin() as c:
            c.execute(delete(idempotency).where(*self._key(tenant, kind, token)))

    def purge_tokens(self, before: str) -> int:
        """Forget client tokens claimed before ``before``: a retry that late makes a new resource."""
        with self.engine.begin() as c:
            return int(c.execute(delete(idempotency).where(idempotency.c.created_at < before)).rowcount)

    @staticmethod
    def _key(tenant: str, kind: str, token: str) -> tuple[Any, ...]:
        return (idempotency.c.tenant == tenant, idempotency.c.kind == kind, idempotency.c.token == token)
