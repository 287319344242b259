"""Who is calling: every request gets a principal before the API sees it, or a 401/403/429.

- Root on the Unix socket (its peer credentials, ``SO_PEERCRED``, say uid 0) is an admin without a key.
- Everyone else sends ``Authorization: Bearer <api_key>``, on the socket (0666) and over TCP alike. A key
  belongs to a tenant, or is an admin key (the TCP listener's token file is one).
- Admins act in the tenant ``default`` unless the request says ``X-Ember-Tenant: NAME``.
- Each tenant key has a token bucket (``EMBER_RATE_LIMIT_PER_S``/``_BURST``); past it: 429 with ``Retry-After``.

The principal goes into the ASGI scope (``ember.principal``) and into :data:`ember.tenancy.principal.CURRENT`,
so the events a request causes name it as their actor.
"""

from __future__ import annotations

import re
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import Request
from uvicorn.protocols.http.auto import AutoHTTPProtocol
from uvicorn.protocols.websockets.wsproto_impl import WSProtocol

from ember.db.tenants import KeyRecord, TenantStore
from ember.errors import EmberError, Forbidden, RateLimited, TenantNotFound, Unauthorized
from ember.tenancy.keys import token_hash
from ember.tenancy.principal import DEFAULT_TENANT, Principal
from ember.tenancy.ratelimit import RateLimiter

Scope = MutableMapping[str, Any]
PEER_UID = "ember.peer_uid"
PRINCIPAL = "ember.principal"
TENANT_HEADER = "x-ember-tenant"
KEY_CACHE = 10_000  # known keys (and unknown tokens) remembered; a revocation in this daemon updates it
TOKEN_SHAPE = re.compile(r"^(ember_)?[A-Za-z0-9_-]{32,64}$")  # an API key, or the api-token file's admin key
ACCESS_KEY_SHAPE = re.compile(r"^AKIA[A-Z0-9]{16}$")  # a key's SigV4 access key id (ember.tenancy.keys)
UNKNOWN_ACCESS_KEY_S = 60.0  # an access key id found unknown or revoked costs no query again for this long


def _with_peer(protocol: Any, transport: Any) -> None:
    """Wrap ``protocol``'s app so every scope carries the connecting process's uid (Unix socket only)."""
    uid: int | None = None
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        uid = struct.unpack("3i", creds)[1]
    app: Any = vars(protocol)["app"]

    async def with_peer(scope: Scope, receive: Callable[[], Awaitable[Any]], send: Any) -> None:
        scope[PEER_UID] = uid
        await app(scope, receive, send)

    protocol.app = with_peer


class PeerCredProtocol(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
    """uvicorn's HTTP protocol, putting the connecting process's uid (Unix socket only) into every scope."""

    def connection_made(self, transport: Any) -> None:
        _with_peer(self, transport)
        super().connection_made(transport)


class PeerCredWSProtocol(WSProtocol):
    """The same for a WebSocket (the shell): uvicorn hands an upgraded connection to a protocol of its own."""

    def connection_made(self, transport: Any) -> None:
        _with_peer(self, transport)
        super().connection_made(transport)


class Authenticator:
    def __init__(self, tenants: TenantStore, limiter: RateLimiter, clock: Callable[[], float] = time.monotonic) -> None:
        self.tenants = tenants
        self.limiter = limiter
        self._now = clock
        self._keys: OrderedDict[str, KeyRecord] = OrderedDict()
        self._unknown: OrderedDict[str, None] = OrderedDict()  # hashes of tokens that are no live key
        self._signing: OrderedDict[str, KeyRecord] = OrderedDict()  # live keys by SigV4 access key id (ember.aws)
        self._unsigned: OrderedDict[str, float] = OrderedDict()  # access key ids found no live key -> until when

    def forget(self, key_id: str) -> None:
        """A key was revoked: it stops working with the next request."""
        for digest, key in list(self._keys.items()):
            if key.key_id == key_id:
                del self._keys[digest]
        for access_key_id, key in list(self._signing.items()):
            if key.key_id == key_id:
                del self._signing[access_key_id]

    def remembered_signing_key(self, access_key_id: str) -> KeyRecord | None:
        """The live key with this access key id if it is remembered (no query): a caller known to be real."""
        return self._signing.get(access_key_id)

    def signing_key(self, access_key_id: str) -> KeyRecord | None:
        """The live key with this SigV4 access key id (the AWS API's caller), or None; remembered like bearer keys.
        An id of no key's shape costs no query; one found unknown or revoked, none for UNKNOWN_ACCESS_KEY_S (ids
        are random: one seen unknown is all but never issued later, but a cached refusal must not outlive that)."""
        key = self._signing.get(access_key_id)
        if key is not None:
            return key
        if not ACCESS_KEY_SHAPE.match(access_key_id):
            return None
        until = self._unsigned.get(access_key_id)
        if until is not None:
            if until > self._now():
                return None
            del self._unsigned[access_key_id]
        key = self.tenants.key_by_access_key(access_key_id)
        if key is None or key.revoked_at or not key.secret_sealed:
            self._unsigned[access_key_id] = self._now() + UNKNOWN_ACCESS_KEY_S
            if len(self._unsigned) > KEY_CACHE:
                self._unsigned.popitem(last=False)
            return None
        self._signing[access_key_id] = key
        if len(self._signing) > KEY_CACHE:
            self._signing.popitem(last=False)
        return key

    def _key(self, token: str) -> KeyRecord | None:
        """The live key ``token`` is; a token of no key's shape, or one just found unknown, costs no query."""
        if not TOKEN_SHAPE.match(token):
            return None
        digest = token_hash(token)
        key = self._keys.get(digest)
        if key is None:
            if digest in self._unknown:  # a random token cannot become a key later: no expiry needed
                return None
            key = self.tenants.key_by_hash(digest)
            if key is None or key.revoked_at:
                self._unknown[digest] = None
                if len(self._unknown) > KEY_CACHE:
                    self._unknown.popitem(last=False)
                return None
            self._keys[digest] = key
            if len(self._keys) > KEY_CACHE:
                self._keys.popitem(last=False)
        return key

    def principal(self, headers: list[tuple[str, str]], peer_uid: int | None) -> Principal | EmberError:
        auths = [v for k, v in headers if k == "authorization"]
        acting = [v for k, v in headers if k == TENANT_HEADER]
        if len(auths) > 1 or len(acting) > 1:
            return Unauthorized("send one Authorization header (and at most one X-Ember-Tenant)")
        if not auths:
            if peer_uid != 0:
                return Unauthorized(
                    "send 'Authorization: Bearer <api_key>': keys come from 'ember key create' (run by root); "
                    "the SDK and CLI send EMBER_API_KEY"
                )
            return self._acting(Principal(DEFAULT_TENANT, admin=True), acting)
        scheme, _, token = auths[0].partition(" ")
        key = self._key(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
        if key is None:
            return Unauthorized("the API key is unknown or revoked: make one with 'ember key create --tenant NAME'")
        if key.tenant is None:  # the operator's keys are not rate limited
            return self._acting(Principal(DEFAULT_TENANT, admin=True, key_id=key.key_id), acting)
        wait = self.limiter.take(key.key_id)
        if wait > 0:
            return RateLimited(wait)
        if acting and acting[0] != key.tenant:
            return Forbidden("a tenant key acts only in its own tenant: drop the X-Ember-Tenant header")
        return Principal(key.tenant, admin=False, key_id=key.key_id)

    def _acting(self, admin: Principal, acting: list[str]) -> Principal | EmberError:
        if not acting or acting[0] == admin.tenant:
            return admin
        if self.tenants.get_tenant(acting[0]) is None:
            return TenantNotFound(acting[0][:63])
        return Principal(acting[0], admin=True, key_id=admin.key_id)


async def principal(request: Request) -> Principal:
    """FastAPI dependency: the request's principal (set by the request guard). Async, as every dependency
    here: FastAPI runs a plain function in a worker thread, which costs more than the work."""
    found = request.scope.get(PRINCIPAL)
    assert isinstance(found, Principal), "every request passes the request guard"
    return found


async def admin(request: Request) -> Principal:
    """FastAPI dependency: the principal, who must be an admin."""
    who = await principal(request)
    if not who.admin:
        raise Forbidden("only an admin (root on the Unix socket, or an admin key) may do this")
    return who


def tenant_filter(who: Principal, tenant: str | None) -> str | None:
    """The tenant a list is narrowed to: a tenant's own always; an admin's choice (None: every tenant)."""
    if not who.admin:
        return who.tenant
    return tenant or None
