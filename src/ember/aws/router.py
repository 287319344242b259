"""The AWS Lambda MicroVMs API's routes: one per operation of the model, at its exact method and requestUri,
on both of Ember's listeners (left out of Ember's OpenAPI document: the AWS model documents them).

Each request: its path routed as sent (percent-encoded: a label keeps its ``%2F``; the request guard refuses
empty, ``.`` and ``..`` segments first), its SigV4 headers checked (the algorithm, the date, the key it names:
all before its body is read), its body read (the request guard caps it: EMBER_AWS_MAX_BODY_BYTES), its
signature verified (:mod:`ember.aws.sigv4`) with the key's secret, the key's rate limit taken, its input parsed and
validated against the model (:mod:`ember.aws.model`), the operation's handler called
(:data:`ember.aws.operations.HANDLERS`) as the key's tenant, and its result written as the output shape. Every
error is an AWS error (:func:`ember.aws.errors.from_ember`); an unknown path or method under the API's prefixes
answers UnknownOperationException.

Refusals (AccessDenied) are limited to EMBER_AWS_DENIED_PER_S (burst EMBER_AWS_DENIED_BURST), then answered
ThrottlingException before anything is looked up or verified, in two kinds of buckets: one per peer (an IPv4
address, an IPv6 /64, a uid on the socket) for requests naming no live key (malformed, stale, unknown or revoked
access key ids: guessing ids), and one per peer and key for requests naming a live key (bad signatures: guessing
its secret). A client refused for guesses from a shared address so slows down neither other keys' holders nor,
once their key is remembered, anyone else's valid requests.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from botocore.model import OperationModel
from fastapi import FastAPI, Request
from fastapi.responses import Response
from sqlalchemy.exc import DataError

from ember.api.auth import PEER_UID, PRINCIPAL, Authenticator
from ember.aws import images, managed, microvms, tags  # noqa: F401 (register their operations)
from ember.aws.errors import (
    AccessDeniedException,
    AwsError,
    ThrottlingException,
    ValidationException,
    from_ember,
    render,
)
from ember.aws.model import parse_input, render_output, service
from ember.aws.operations import HANDLERS, Call
from ember.aws.sigv4 import Credential, SignedRequest, parse, signed_at, verify
from ember.ingress.admission import address_key
from ember.tenancy.principal import CURRENT, DEFAULT_TENANT, Principal
from ember.tenancy.ratelimit import RateLimiter

if TYPE_CHECKING:
    from ember.daemon import Daemon
    from ember.db.tenants import KeyRecord

ACCOUNTS_CACHED = 10_000  # tenants' account ids remembered (they never change)


class UnknownOperationException(AwsError):
    code = "UnknownOperationException"
    status = 404


def throttled(wait: float, why: str) -> ThrottlingException:
    exc = ThrottlingException(f"Rate exceeded: {why}; retry in {wait:.1f} s", serviceCode="lambda")
    exc.retry_after = wait
    return exc


class _Refused(Exception):
    """An AccessDenied and the refusal bucket it counts in."""

    def __init__(self, bucket: str, exc: AccessDeniedException) -> None:
        super().__init__(bucket)
        self.bucket, self.exc = bucket, exc


def peer(request: Request) -> str:
    """Who a request comes from, for the limit on refusals: its address (TCP; an IPv6 client's /64, as the
    ingress counts clients), or its uid (the Unix socket). Never a header: the listeners trust no proxy."""
    client = request.scope.get("client")
    if client:
        return f"ip:{address_key(tuple(client))}"
    return f"uid:{request.scope.get(PEER_UID)}"


def error_response(exc: BaseException) -> Response:
    if isinstance(exc, DataError):  # a value the database refuses (PostgreSQL: a NUL in text)
        exc = ValidationException("a value in the request cannot be stored (a NUL character, or a number out of range)")
    status, headers, body = render(from_ember(exc))
    return Response(body, status_code=status, headers={k.decode(): v.decode() for k, v in headers})


class AwsApi:
    def __init__(self, daemon: Daemon, auth: Authenticator) -> None:
        self.daemon = daemon
        self.auth = auth
        self._accounts: OrderedDict[str, str] = OrderedDict()
        settings = daemon.settings
        self.denied = RateLimiter(settings.aws_denied_per_s, settings.aws_denied_burst)  # refusals (module doc)

    def account(self, tenant: str) -> str:
        found = self._accounts.get(tenant)
        if found is None:
            record = self.daemon.tenants.get_tenant(tenant)
            if record is None:
                raise AccessDeniedException("the key's tenant no longer exists")
            found = self._accounts[tenant] = record.account_id
            if len(self._accounts) > ACCOUNTS_CACHED:
                self._accounts.popitem(last=False)
        return found

    async def authenticate(self, request: Request) -> tuple[Principal, str, bytes]:
        """The principal a signed request acts as (a tenant key's tenant; an admin key's: ``default``), the
        region it signed for, and its body (read once the headers passed). AccessDenied or Throttling otherwise
        (refusals limited as the module says)."""
        try:
            return await self._authenticate(request)
        except _Refused as refused:
            wait = self.denied.take(refused.bucket)
            raise refused.exc if wait == 0 else throttled(wait, "too many refused requests from here") from None

    async def _authenticate(self, request: Request) -> tuple[Principal, str, bytes]:
        headers = tuple((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in request.scope["headers"])
        signed = SignedRequest(
            method=request.method, raw_path=request.scope.get("raw_path", request.url.path.encode()).decode("latin-1"),
            query_string=request.scope["query_string"].decode("latin-1"), headers=headers, body=b"",
        )  # fmt: skip
        source = peer(request)
        try:
            credential = parse(signed)
            signed_at(signed, credential, now=time.time(), skew_s=self.daemon.settings.aws_clock_skew_s)
        except AccessDeniedException as exc:
            raise _Refused(source, exc) from None
        too_many = "too many refused requests (bad signatures, unknown keys) from here"
        remembered = self.auth.remembered_signing_key(credential.access_key_id) is not None
        if not remembered and (wait := self.denied.wait(source)) > 0:  # before any query: guessing ids
            raise throttled(wait, too_many)
        key = self.auth.signing_key(credential.access_key_id)
        bucket = source if key is None else f"{source} key:{key.key_id}"
        if key is not None and (wait := self.denied.wait(bucket)) > 0:  # before any verification: guessing a secret
            raise throttled(wait, too_many)
        try:
            return await self._verify(request, signed, credential, key)
        except AccessDeniedException as exc:
            raise _Refused(bucket, exc) from None

    async def _verify(
        self, request: Request, signed: SignedRequest, credential: Credential, key: KeyRecord | None
    ) -> tuple[Principal, str, bytes]:
        if key is None:
            raise AccessDeniedException(
                "The security token included in the request is invalid: the access key id is unknown or revoked "
                "(an operator makes keys: each has an access key id and a secret access key)"
            )
        try:
            secret = self.daemon.secrets.open(key.secret_sealed)
        except ValueError:
            raise AccessDeniedException(
                "this key's secret cannot be read (the daemon's secret key file changed): ask for a new key"
            ) from None
        body = await request.body()
        verify(replace(signed, body=body), credential, secret)
        if key.tenant is not None:  # the operator's keys are not rate limited
            wait = self.auth.limiter.take(key.key_id)
            if wait > 0:
                raise throttled(wait, "too many requests for this key")
        return Principal(key.tenant or DEFAULT_TENANT, admin=False, key_id=key.key_id), credential.region, body

    async def serve(self, operation: OperationModel, request: Request) -> Response:
        try:
            who, region, body = await self.authenticate(request)
        except Exception as exc:
            return error_response(exc)
        request.scope[PRINCIPAL] = who
        acting = CURRENT.set(who)  # the events the call causes name the key as their actor
        try:
            params = parse_input(operation, request.path_params, request.scope["query_string"].decode("latin-1"), body)
            handler = HANDLERS.get(operation.name)
            if handler is None:
                raise ValidationException(f"{operation.name} is not served by this Ember")
            call = Call(operation.name, params, who, region, self.account(who.tenant))
            result = await handler(self.daemon, call)
            out = render_output(operation, result)
        except Exception as exc:
            return error_response(exc)
        finally:
            CURRENT.reset(acting)
        status = int(operation.http.get("responseCode", 200))
        return Response(out, status_code=status, media_type="application/json" if out else None)


def _endpoint(api: AwsApi, operation: OperationModel) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        return await api.serve(operation, request)

    return endpoint


def add_aws_routes(app: FastAPI, daemon: Daemon, auth: Authenticator) -> None:
    api = AwsApi(daemon, auth)
    model = service()
    for name in model.operation_names:
        operation = model.operation_model(name)
        app.add_api_route(
            operation.http["requestUri"], _endpoint(api, operation), methods=[operation.http["method"]],
            include_in_schema=False, name=f"aws-{name}",
        )  # fmt: skip

    async def unknown(request: Request) -> Response:
        return error_response(
            UnknownOperationException(
                f"no operation of the Lambda MicroVMs API is {request.method} {request.url.path[:200]}"
            )
        )

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]
    for prefix in ("/2025-09-09", "/2017-03-31"):  # after every operation: any other path or method under them
        app.add_api_route(prefix + "/{rest:path}", unknown, methods=methods, include_in_schema=False)
