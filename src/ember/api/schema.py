"""The OpenAPI document's shared parts: the error model, each route's error answers, and what every route can answer.

Success bodies are the models of :mod:`ember.api.models` (each route's ``response_model``). Every error is
``ErrorBody``. A route declares the errors its own code raises with ``responses=errors(...)``;
``document(app)`` adds what every route can answer because of the request guard and FastAPI's validation
(ember.api.guard, ember.api.auth): 400 (a parameter or body that does not validate), 401 (no, unknown or
revoked key), 403 (a foreign Host/Origin, a tenant key naming another tenant), 404 (an admin's
``X-Ember-Tenant`` naming no tenant), 413 (a body over the route's cap) and 429 (the key's rate limit),
and it documents the bearer key and the ``X-Ember-Tenant`` header. FastAPI's own 422 ``HTTPValidationError``
is never answered (Ember's validation errors are 400s), so it goes from the document.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field

from ember.api.auth import TENANT_HEADER

DESCRIPTIONS = {
    400: "Bad input (InvalidRequest): the message says what to change",
    401: "No, unknown or revoked API key (Unauthorized)",
    403: "Not allowed (Forbidden): an admin-only call, a read-only built-in image, a foreign Host or Origin",
    404: "No such resource, or another tenant's (the same answer)",
    409: "The request does not fit the current state (Conflict, NameTaken, IdempotencyConflict, ...)",
    413: "The request body is over this route's cap (PayloadTooLarge)",
    415: "The request body is not of the Content-Type this route takes (UnsupportedMediaType)",
    422: "The guest or the build refused or failed the request (GuestError, BuildFailed)",
    429: "A tenant quota (QuotaExceeded: quota, limit, current) or the key's rate (RateLimited: Retry-After)",
    500: "Ember failed (InternalError: quote its id)",
    503: "The VM's agent cannot be reached or broke the protocol (AgentUnavailable, GuestProtocolError)",
    507: "The host is out of a resource: disk, uids (ResourceExhausted)",
}
# Every route can answer these: the request guard runs before any route (see the module's docstring).
GUARD = (401, 403, 404, 429)
VALIDATION = 400  # a route with parameters or a body
BODY_CAP = 413  # a route that takes a body


class ErrorBody(BaseModel):
    """Every error Ember answers: its kind (the ember.errors class) and a message that says what to do."""

    error: str = Field(description="The kind of error: an ember.errors class name, e.g. VmNotFound")
    message: str = Field(description="What went wrong and what to do")
    quota: str | None = Field(default=None, description="QuotaExceeded: the quota, e.g. max_running_vms")
    limit: int | None = Field(default=None, description="QuotaExceeded: its limit")
    current: int | None = Field(default=None, description="QuotaExceeded: its current use")
    retry_after: float | None = Field(default=None, description="RateLimited: seconds until a retry may pass")
    id: str | None = Field(default=None, description="InternalError: the id under which the daemon logged it")


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route whose own code answers ``statuses`` (each an ErrorBody)."""
    return {status: {"model": ErrorBody, "description": DESCRIPTIONS[status]} for status in statuses}


def streamed(media_type: str, description: str) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route whose 200 streams ``media_type`` (NDJSON events, a file's bytes)."""
    return {200: {"description": description, "content": {media_type: {"schema": {"type": "string"}}}}}


def raw_body(media_type: str, description: str) -> dict[str, Any]:
    """``openapi_extra=`` for a route that reads its body as a stream (a tar, a file's bytes, an exec's stdin)."""
    content = {media_type: {"schema": {"type": "string", "format": "binary"}}}
    return {"requestBody": {"required": True, "description": description, "content": content}}


def _error_response(status: int) -> dict[str, Any]:
    return {
        "description": DESCRIPTIONS[status],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
    }


def _validation_error(response: dict[str, Any]) -> bool:
    schema = response.get("content", {}).get("application/json", {}).get("schema", {})
    return bool(schema.get("$ref", "").endswith("/HTTPValidationError"))


def complete(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` (FastAPI's) with what every route can answer, the bearer key and X-Ember-Tenant (in place)."""
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["ErrorBody"] = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    components["securitySchemes"] = {
        "apiKey": {"type": "http", "scheme": "bearer", "description": "An API key ('ember key create')"}
    }
    doc["security"] = [{"apiKey": []}, {}]  # none: root on the Unix socket
    tenant_header = {
        "name": TENANT_HEADER.title(),  # X-Ember-Tenant
        "in": "header",
        "required": False,
        "description": "Admins only: act in this tenant (a tenant key may name only its own)",
        "schema": {"type": "string", "maxLength": 63},
    }
    for operations in doc.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            if "422" in responses and _validation_error(responses["422"]):
                del responses["422"]
            parameters = operation.setdefault("parameters", [])
            statuses = [*GUARD]
            if parameters or "requestBody" in operation:
                statuses.append(VALIDATION)
            if "requestBody" in operation:
                statuses.append(BODY_CAP)
            for status in statuses:
                responses.setdefault(str(status), _error_response(status))
            if not any(p.get("in") == "header" and p.get("name", "").lower() == TENANT_HEADER for p in parameters):
                parameters.append(tenant_header)
    return doc


def document(app: FastAPI) -> None:
    """Serve ``app``'s OpenAPI document completed (see ``complete``)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            app.openapi_schema = complete(doc)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
