"""Idempotent create calls: a ``client_token`` makes a retried create return the first one's resource.

The token is claimed (per tenant and kind of resource) before the create runs and names the resource once it
exists; the same token with a different request is a 409; a retry while the first create still runs is a 409
that says to retry; a create that fails releases its token, and one cut short by a daemon's death is taken
over after ten minutes. Tokens answer retries for a day.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from ember.db.tenants import TenantStore
from ember.errors import Conflict, IdempotencyConflict, InvalidRequest
from ember.tenancy.principal import Principal

T = TypeVar("T")
MAX_TOKEN = 64
ABANDONED_S = 600.0  # a claim with no resource this old was cut short (its daemon died): taken over
KEPT_S = 86400.0  # how long a client token keeps answering its retries

Settle = Callable[[str], None]


def body_hash(body: dict[str, Any]) -> str:
    canonical = json.dumps({k: v for k, v in body.items() if k != "client_token"}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class Idempotency:
    def __init__(self, store: TenantStore) -> None:
        self.store = store

    async def create(
        self, who: Principal, kind: str, token: str | None, body: dict[str, Any],
        create: Callable[[Settle], Awaitable[T]], existing: Callable[[str], Awaitable[T]],
    ) -> T:  # fmt: skip
        """``create(settle)`` makes the resource and calls ``settle(id)`` as soon as its id exists;
        ``existing(id)`` answers a retry."""
        if token is None:
            return await create(lambda _: None)
        if not 1 <= len(token) <= MAX_TOKEN or not token.isprintable():
            raise InvalidRequest(f"client_token must be 1 to {MAX_TOKEN} printable characters")
        digest = body_hash(body)
        abandoned = (datetime.now(UTC) - timedelta(seconds=ABANDONED_S)).isoformat(timespec="milliseconds")
        claimed, held_hash, resource = self.store.claim_token(who.tenant, kind, token, digest, abandoned)
        if not claimed:
            if held_hash != digest:
                raise IdempotencyConflict(token)
            if not resource:
                raise Conflict(f"a request with client_token {token!r} is still running: retry in a moment")
            return await existing(resource)

        def settle(resource_id: str) -> None:
            self.store.settle_token(who.tenant, kind, token, resource_id)

        try:
            return await create(settle)
        except BaseException:
            self.release(who, kind, token)
            raise

    def release(self, who: Principal, kind: str, token: str | None) -> None:
        """Free ``token`` after a create that failed (a streamed one fails after it answered)."""
        if token is not None:
            self.store.release_token(who.tenant, kind, token)
