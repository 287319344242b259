"""The operation registry: each AWS operation is one async handler, registered by its model name.

The router (:mod:`ember.aws.router`) authenticates the request (SigV4), parses and validates its input
against the model into :class:`Call.params` (URI, query string and JSON body members by their model names;
timestamps as ``datetime``), calls the handler, and serialises what it returns as the output shape (members
by model name; ``datetime`` values as the model's timestamps). A handler raises :class:`ember.aws.errors.AwsError`
or Ember's own errors (mapped by :func:`ember.aws.errors.from_ember`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ember.tenancy.principal import Principal

if TYPE_CHECKING:
    from ember.daemon import Daemon


@dataclass(frozen=True)
class Call:
    operation: str  # the model's operation name, e.g. "RunMicrovm"
    params: Mapping[str, Any]  # the input shape's members, validated against the model
    principal: Principal  # the key's tenant (a tenant key; admin keys act in the tenant "default")
    region: str  # the region of the request's SigV4 credential scope (any region is accepted)
    account: str  # the tenant's 12-digit account id (tenants.account_id)


Handler = Callable[["Daemon", Call], Awaitable[Mapping[str, Any]]]
HANDLERS: dict[str, Handler] = {}


def operation(name: str) -> Callable[[Handler], Handler]:
    """Register ``handler`` as the model's operation ``name`` (each name once)."""

    def register(handler: Handler) -> Handler:
        assert name not in HANDLERS, f"{name} registered twice"
        HANDLERS[name] = handler
        return handler

    return register
