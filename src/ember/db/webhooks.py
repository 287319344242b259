"""Webhooks and their delivery log, on the ``webhooks``, ``webhook_deliveries`` and ``events`` tables.

A delivery row is one attempt to send one event to one webhook. The row of the next attempt is PENDING
until its ``next_at``; the attempt makes it DELIVERED (a 2xx answer) or FAILED, and a FAILED attempt
that has attempts left adds the PENDING row of the next one in the same transaction. So a FAILED row
with ``attempt`` equal to the limit (EMBER_WEBHOOK_MAX_ATTEMPTS) is a delivery given up, and a
daemon killed mid-attempt finds its row still PENDING and sends it again (at-least-once).

Which events a webhook has been given is read from its rows: the highest ``event_id`` among them
(:meth:`WebhookStore.cursor`); a webhook without rows starts after the last event recorded before
it was created. Pruning never removes that row, nor a PENDING one.
"""

from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.engine import Connection, Engine, RowMapping

from ember.db.schema import events, webhook_deliveries, webhooks
from ember.db.store import write_transaction

D = webhook_deliveries


class DeliveryState(enum.StrEnum):
    PENDING = "PENDING"  # to be attempted at next_at
    DELIVERED = "DELIVERED"  # the receiver answered 2xx
    FAILED = "FAILED"  # this attempt failed (the last allowed one: the delivery is given up)


@dataclass(frozen=True)
class Webhook:
    id: str
    tenant: str
    url: str
    secret_sealed: str
    created_at: str


@dataclass(frozen=True)
class Delivery:
    id: int
    webhook_id: str
    event_id: int
    attempt: int
    at: str  # when the attempt was made (PENDING: when it was scheduled)
    status: int  # the receiver's HTTP status; 0: no answer
    error: str
    state: DeliveryState
    duration_ms: float
    next_at: str  # PENDING: not before this time


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to; ``retry_at`` (a time) adds the next attempt's PENDING row."""

    at: str
    status: int
    error: str
    duration_ms: float
    delivered: bool
    retry_at: str = ""


class _OverLimit(Exception):
    pass


def _webhook(row: RowMapping) -> Webhook:
    return Webhook(**row)


def _delivery(row: RowMapping) -> Delivery:
    return Delivery(**{**row, "state": DeliveryState(row["state"])})


class WebhookStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _write(self) -> contextlib.AbstractContextManager[Connection]:
        return write_transaction(self.engine)  # a full disk (SQLite or PostgreSQL) is ResourceExhausted

    # webhooks
    def create(self, webhook: Webhook, *, limit: int) -> bool:
        """Add ``webhook`` unless its tenant would then have more than ``limit``; whether it was added."""
        try:
            with self._write() as c:
                c.execute(insert(webhooks).values(**vars(webhook)))
                if self._count(c, webhook.tenant) > limit:
                    raise _OverLimit
        except _OverLimit:
            return False
        return True

    def count(self, tenant: str) -> int:
        with self.engine.connect() as c:
            return self._count(c, tenant)

    @staticmethod
    def _count(c: Connection, tenant: str) -> int:
        return int(
            c.execute(select(func.count()).select_from(webhooks).where(webhooks.c.tenant == tenant)).scalar_one()
        )

    def get(self, webhook_id: str, *, tenant: str | None) -> Webhook | None:
        """The webhook, if it belongs to ``tenant`` (None: any tenant's)."""
        query = select(webhooks).where(webhooks.c.id == webhook_id)
        if tenant is not None:
            query = query.where(webhooks.c.tenant == tenant)
        with self.engine.connect() as c:
            row = c.execute(query).mappings().first()
        return _webhook(row) if row else None

    def list_webhooks(self, *, tenant: str | None) -> list[Webhook]:
        query = select(webhooks).order_by(webhooks.c.created_at, webhooks.c.id)
        if tenant is not None:
            query = query.where(webhooks.c.tenant == tenant)
        with self.engine.connect() as c:
            return [_webhook(r) for r in c.execute(query).mappings()]

    def delete(self, webhook_id: str, *, tenant: str | None) -> bool:
        """Remove the webhook (if it belongs to ``tenant``) and its delivery log; whether it existed."""
        with self._write() as c:
            query = delete(webhooks).where(webhooks.c.id == webhook_id)
            if tenant is not None:
                query = query.where(webhooks.c.tenant == tenant)
            if not c.execute(query).rowcount:
                return False
            c.execute(delete(D).where(D.c.webhook_id == webhook_id))
        return True

    # events to deliver
    def cursor(self, webhook: Webhook) -> int:
        """The id of the last event ``webhook`` has been given (or that was recorded before it existed)."""
        with self.engine.connect() as c:
            given = c.execute(select(func.max(D.c.event_id)).where(D.c.webhook_id == webhook.id)).scalar()
            if given is not None:
                return int(given)
            before = c.execute(
                select(func.max(events.c.id)).where(
                    events.c.tenant == webhook.tenant, events.c.at <= webhook.created_at
                )
            ).scalar()
        return int(before or 0)

    def events_after(self, tenant: str, after: int, *, limit: int) -> list[int]:
        """Ids of ``tenant``'s events after ``after``, oldest first."""
        query = select(events.c.id).where(events.c.tenant == tenant, events.c.id > after)
        with self.engine.connect() as c:
            return [int(r[0]) for r in c.execute(query.order_by(events.c.id).limit(limit))]

    def event(self, event_id: int) -> dict[str, Any] | None:
        with self.engine.connect() as c:
            row = c.execute(select(events).where(events.c.id == event_id)).mappings().first()
        return dict(row) if row else None

    def enqueue(self, webhook_id: str, event_ids: list[int], *, now: str) -> None:
        """A first attempt, due at once, of each event for the webhook (none if it was removed meanwhile, none
        for an event it already has: a worker stopping mid-pass may queue what its successor queues too)."""
        if not event_ids:
            return
        with self._write() as c:
            if c.execute(select(webhooks.c.id).where(webhooks.c.id == webhook_id)).first() is None:
                return
            queued = select(D.c.event_id).where(D.c.webhook_id == webhook_id, D.c.event_id.in_(event_ids))
            fresh = sorted(set(event_ids) - {int(r[0]) for r in c.execute(queued)})
            rows = [
                {"webhook_id": webhook_id, "event_id": e, "attempt": 1, "at": now, "status": 0, "error": "",
                 "state": DeliveryState.PENDING.value, "duration_ms": 0.0, "next_at": now}
                for e in fresh
            ]  # fmt: skip
            if rows:
                c.execute(insert(D), rows)

    # attempts
    def due(self, *, now: str, per_webhook: int, busy: frozenset[int]) -> list[Delivery]:
        """PENDING attempts due by ``now``, at most ``per_webhook`` of each webhook counting ``busy`` ones
        (ids in flight), oldest first."""
        pending = (D.c.state == DeliveryState.PENDING.value) & (D.c.next_at <= now)
        with self.engine.connect() as c:
            hooks = [r[0] for r in c.execute(select(D.c.webhook_id).where(pending).group_by(D.c.webhook_id))]
            out: list[Delivery] = []
            for hook in hooks:
                rows = c.execute(
                    select(D).where(pending, D.c.webhook_id == hook).order_by(D.c.id).limit(per_webhook)
                ).mappings()
                found = [_delivery(r) for r in rows]
                room = per_webhook - sum(1 for d in found if d.id in busy)
                out += [d for d in found if d.id not in busy][: max(room, 0)]
        return sorted(out, key=lambda d: d.id)

    def next_due(self, *, after: str) -> str | None:
        """When the earliest PENDING attempt due later than ``after`` is."""
        pending = (D.c.state == DeliveryState.PENDING.value) & (D.c.next_at > after)
        with self.engine.connect() as c:
            value = c.execute(select(func.min(D.c.next_at)).where(pending)).scalar()
        return str(value) if value is not None else None

    def record(self, delivery: Delivery, outcome: Outcome) -> None:
        """The attempt's outcome, and the next attempt's PENDING row when ``outcome.retry_at`` is set."""
        state = DeliveryState.DELIVERED if outcome.delivered else DeliveryState.FAILED
        with self._write() as c:
            done = c.execute(
                update(D)
                .where(D.c.id == delivery.id, D.c.state == DeliveryState.PENDING.value)
                .values(at=outcome.at, status=outcome.status, error=outcome.error, state=state.value,
                        duration_ms=outcome.duration_ms, next_at="")
            ).rowcount  # fmt: skip
            if done and outcome.retry_at and not outcome.delivered:
                c.execute(
                    insert(D).values(
                        webhook_id=delivery.webhook_id, event_id=delivery.event_id, attempt=delivery.attempt + 1,
                        at=outcome.at, status=0, error="", state=DeliveryState.PENDING.value, duration_ms=0.0,
                        next_at=outcome.retry_at,
                    )
                )  # fmt: skip

    def drop(self, delivery_id: int) -> None:
        with self._write() as c:
            c.execute(delete(D).where(D.c.id == delivery_id))

    def deliveries(self, webhook_id: str, *, limit: int) -> list[Delivery]:
        """The newest ``limit`` rows of the webhook's delivery log, newest first."""
        query = select(D).where(D.c.webhook_id == webhook_id).order_by(D.c.id.desc()).limit(limit)
        with self.engine.connect() as c:
            return [_delivery(r) for r in c.execute(query).mappings()]

    def prune(self, webhook_id: str, *, keep: int) -> None:
        """Remove finished rows older than the newest ``keep`` (never PENDING ones, nor the cursor's row)."""
        with self._write() as c:
            mine = D.c.webhook_id == webhook_id
            cutoff = c.execute(select(D.c.id).where(mine).order_by(D.c.id.desc()).offset(keep).limit(1)).scalar()
            if cutoff is None:
                return
            last_event = c.execute(select(func.max(D.c.event_id)).where(mine)).scalar_one()
            c.execute(
                delete(D).where(
                    mine, D.c.id <= cutoff, D.c.state != DeliveryState.PENDING.value, D.c.event_id < last_event
                )
            )
