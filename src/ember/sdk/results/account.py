"""Tenants, keys, who the caller is and what the daemon runs on."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ember.sdk.results.vms import Accelerator
from ember.sdk.types import raw_field


@dataclass(frozen=True)
class Tenant:
    name: str
    account_id: str = ""
    created_at: str = ""
    quotas: Mapping[str, int] = field(default_factory=dict)
    usage: Mapping[str, int] = field(default_factory=dict)  # current use of each quota (``tenants.get`` only)
    raw: Mapping[str, Any] = raw_field()


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    tenant: str | None = None  # None: an admin key
    name: str = ""
    access_key_id: str = ""
    created_at: str = ""
    revoked_at: str = ""
    raw: Mapping[str, Any] = raw_field()


@dataclass(frozen=True)
class CreatedKey:
    """A new key with its secrets, which the daemon shows this once: a retry with the same client_token
    answers the key without them (``api_key`` and ``secret_access_key`` are "")."""

    key_id: str
    api_key: str = ""
    tenant: str | None = None
    name: str = ""
    access_key_id: str = ""
    secret_access_key: str = ""
    created_at: str = ""
    raw: Mapping[str, Any] = raw_field()


@dataclass(frozen=True)
class Whoami:
    tenant: str
    admin: bool = False
    key_id: str = ""
    raw: Mapping[str, Any] = raw_field()


@dataclass(frozen=True)
class Info:
    accelerator: Accelerator
    qemu_version: str = ""
    raw: Mapping[str, Any] = raw_field()
