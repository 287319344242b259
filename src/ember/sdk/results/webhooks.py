"""Webhooks and their delivery log."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ember.sdk.types import raw_field


@dataclass(frozen=True)
class Webhook:
    id: str
    url: str
    created_at: str = ""
    raw: Mapping[str, Any] = raw_field()


@dataclass(frozen=True)
class CreatedWebhook:
    """A new webhook with its signing secret, which the daemon shows this once."""

    id: str
    url: str
    secret: str
    created_at: str = ""
    raw: Mapping[str, Any] = raw_field()


@dataclass(frozen=True)
class Delivery:
    id: int
    webhook_id: str
    event_id: int
    attempt: int = 0
    at: str = ""
    status: int | None = None
    error: str = ""
    state: str = ""
    duration_ms: float = 0.0
    raw: Mapping[str, Any] = raw_field()
