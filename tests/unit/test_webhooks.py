"""Webhooks: signatures, the URL checks (hostile URLs), and the delivery worker against loopback receivers."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import insert
from sqlalchemy.engine import Engine

from ember import netpolicy, webhooks
from ember.config import Settings
from ember.db.schema import events
from ember.db.store import connect
from ember.db.webhooks import Delivery, DeliveryState, Webhook, WebhookStore
from ember.errors import Conflict, InvalidRequest
from ember.models import utcnow
from ember.tenancy.secrets import SecretBox
from tests.databases import fresh_database

SECRET = "whsec_test"
VECTOR = "t=1700000000,v1=2f441ba4b3b2d50d28a9ab9d9fd8880376ecd1eb5d0435401553f5d8d0a5dcf8"  # openssl dgst -hmac
TRUSTING = netpolicy.AddressPolicy.trusting(["127.0.0.1"])


# ---- signatures -------------------------------------------------------------


def test_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    assert webhooks.sign(SECRET, b'{"id":1}', timestamp=1700000000) == VECTOR


def test_verify_accepts_the_signature_within_the_tolerance() -> None:
    assert webhooks.verify(SECRET, VECTOR, b'{"id":1}', now=1700000000)
    assert webhooks.verify(SECRET, VECTOR, b'{"id":1}', now=1700000000 + 300)
    assert webhooks.verify(SECRET, VECTOR, b'{"id":1}', now=1700000000 - 300)
    assert webhooks.verify(SECRET, VECTOR, b'{"id":1}', tolerance_s=3600, now=1700003000)
    now = time.time()
    assert webhooks.verify(SECRET, webhooks.sign(SECRET, b"x", timestamp=int(now)), b"x")


@pytest.mark.parametrize(
    ("secret", "header", "body", "now"),
    [
        (SECRET, VECTOR, b'{"id":2}', 1700000000),  # another body
        (SECRET, VECTOR, b'{"id":1} ', 1700000000),  # one byte more
        ("whsec_other", VECTOR, b'{"id":1}', 1700000000),  # another secret
        (SECRET, VECTOR, b'{"id":1}', 1700000301),  # replayed too late
        (SECRET, VECTOR, b'{"id":1}', 1699999699),  # from the future
        (SECRET, VECTOR.replace("t=1700000000", "t=1700000001"), b'{"id":1}', 1700000000),  # timestamp changed
        (SECRET, VECTOR.split(",")[1], b'{"id":1}', 1700000000),  # no timestamp
        (SECRET, "t=1700000000", b'{"id":1}', 1700000000),  # no signature
        (SECRET, "t=1700000000,v1=", b'{"id":1}', 1700000000),
        (SECRET, "t=-5," + VECTOR.split(",")[1], b'{"id":1}', 1700000000),
        (SECRET, "t=１７," + VECTOR.split(",")[1], b'{"id":1}', 1700000000),  # non-ASCII digits
        (SECRET, VECTOR + ",v1=" + "0" * 2000, b'{"id":1}', 1700000000),  # oversized header
        (SECRET, "", b'{"id":1}', 1700000000),
    ],
)
def test_verify_refuses(secret: str, header: str, body: bytes, now: float) -> None:
    assert not webhooks.verify(secret, header, body, now=now)


def test_verify_accepts_any_of_several_signatures() -> None:
    assert webhooks.verify(SECRET, f"t=1700000000,v1={'0' * 64},{VECTOR.split(',')[1]}", b'{"id":1}', now=1700000000)


# ---- URL checks -------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata
        "http://[::1]/",  # IPv6 loopback
        "http://[::ffff:127.0.0.1]:8080/",  # IPv4-mapped loopback
        "http://[fd00:ec2::254]/",  # AWS metadata over IPv6
        "http://10.0.0.1/",
        "http://0.0.0.0:9/",
        "http://127.0.0.2/",  # loopback, not the trusted 127.0.0.1
    ],
)
def test_refused_addresses(url: str) -> None:
    with pytest.raises(InvalidRequest, match="public address"):
        webhooks.check_url(url, TRUSTING)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://0x7f000001/", "invalid host"),  # hex spelling of 127.0.0.1 (inet_aton would take it)
        ("http://2130706433/", "invalid host"),  # decimal spelling of 127.0.0.1
        ("http://127.1/", "invalid host"),  # short spelling
        ("http://0177.0.0.1/", "not a valid URL"),  # octal spelling
        ("http://1.2.3.4.5/", "invalid host"),
        ("http://" + "a." * 127 + "com/", "invalid host"),  # longer than DNS allows
        ("http://" + "a" * 64 + ".com/", "invalid host"),  # a label longer than DNS allows
        ("http://%31%32%37.0.0.1/", "invalid host"),
        ("http://[fe80::1%25eth0]/", "public address|invalid host|not a valid URL"),
        ("http://user:pass@example.com/", "user name or password"),
        ("http://user@example.com/", "user name or password"),
        ("ftp://example.com/", "http:// or https://"),
        ("file:///etc/passwd", "http:// or https://"),
        ("gopher://example.com:11211/", "http:// or https://"),
        ("example.com/hook", "http:// or https://"),
        ("http:///hook", "no host"),
        ("http://example.com:0/", "port"),
        ("http://example.com:99999/", "port|not a valid URL"),
        ("https://example.com/" + "a" * 2048, "longer than 2048"),
    ],
)
def test_malformed_urls(url: str, why: str) -> None:
    with pytest.raises(InvalidRequest, match=why):
        webhooks.check_url(url, TRUSTING)


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/ember?x=1",
        "http://example.com:8080/",
        "https://xn--bcher-kva.de/",
        "http://127.0.0.1:9/",
    ],
)
def test_allowed_urls(url: str) -> None:
    assert str(webhooks.check_url(url, TRUSTING)) == url


def test_loopback_is_refused_unless_trusted() -> None:
    with pytest.raises(InvalidRequest, match="public address"):
        webhooks.check_url("http://127.0.0.1:9/", netpolicy.AddressPolicy())


async def test_a_name_resolving_to_loopback_is_refused_unless_trusted() -> None:
    url = webhooks.check_url("http://localhost:9/", TRUSTING)
    with pytest.raises(InvalidRequest, match="public address"):
        await webhooks.check_destination(url, TRUSTING, timeout=5)
    await webhooks.check_destination(url, netpolicy.AddressPolicy.trusting(["localhost"]), timeout=5)


def fake_dns(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[str]]) -> list[str]:
    lookups: list[str] = []

    async def resolve(host: str, port: int, **kwargs: Any) -> list[Any]:
        lookups.append(host)
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in answers[host]]  # fmt: skip

    monkeypatch.setattr(netpolicy.anyio, "getaddrinfo", resolve)
    return lookups


async def test_every_address_of_a_name_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_dns(monkeypatch, {"public.example": ["93.184.215.14"], "mixed.example": ["93.184.215.14", "10.1.2.3"],
                           "gone.example": []} | {"meta.example": ["fd00:ec2::254"]})  # fmt: skip
    policy = netpolicy.AddressPolicy()
    await webhooks.check_destination(webhooks.check_url("https://public.example/", policy), policy, timeout=5)
    for host in ("mixed.example", "meta.example", "gone.example", "nxdomain.example"):
        with pytest.raises(InvalidRequest, match="public address"):  # one answer for all: no probing
            await webhooks.check_destination(webhooks.check_url(f"https://{host}/", policy), policy, timeout=5)


def test_backoff_doubles_up_to_the_cap() -> None:
    s = Settings(webhook_backoff_s=1.0, webhook_backoff_max_s=300.0)
    assert [webhooks.backoff(s, n) for n in (1, 2, 3, 4, 9, 10, 1000)] == [1, 2, 4, 8, 256, 300, 300]


# ---- the delivery worker ----------------------------------------------------


@dataclass
class Receiver:
    """A loopback HTTP receiver answering each POST with the next status of ``script`` (then 200)."""

    script: list[int] = field(default_factory=list)
    answer: bytes = b"no"
    headers: dict[str, str] = field(default_factory=dict)
    drip_s: float = 0.0  # after the status line, one byte of header every drip_s seconds (a slow receiver)
    got: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    port: int = 0

    def url(self, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}/hook"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            rec.got.append((dict(self.headers.items()), body))
            status = rec.script.pop(0) if rec.script else 200
            self.send_response(status)
            for _ in range(20 if rec.drip_s else 0):
                time.sleep(rec.drip_s)
                self.wfile.write(b"X")
                self.wfile.flush()
            for k, v in rec.headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(rec.answer)))
            self.end_headers()
            self.wfile.write(rec.answer)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    rec.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield rec
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A fresh database, migrated as the daemon's (PostgreSQL in the suite's second pass)."""
    with fresh_database(request.param, tmp_path) as url:
        engine = connect(url)
        yield engine
        engine.dispose()


SETTINGS = Settings(webhook_backoff_s=0.05, webhook_max_attempts=3, webhook_timeout_s=5.0,
                    webhook_trusted_hosts=("127.0.0.1",), webhooks_per_tenant=2)  # fmt: skip


@pytest.fixture
async def dispatcher(db: Engine) -> AsyncIterator[webhooks.WebhookDispatcher]:
    d = webhooks.WebhookDispatcher(SETTINGS, WebhookStore(db), SecretBox(os.urandom(32)))
    d.start()
    yield d
    await d.close()


def add_event(db: Engine, tenant: str = "acme", from_state: str = "PENDING") -> int:
    row = {"tenant": tenant, "vm_id": "vm-1", "at": utcnow(), "from_state": from_state, "to_state": "RUNNING",
           "reason": "launch", "message": "", "actor": "root"}  # fmt: skip
    with db.begin() as c:
        return int(c.execute(insert(events).values(**row)).inserted_primary_key[0])  # type: ignore[index]


async def until(check: Callable[[], Any], timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)
    return found


def log(d: webhooks.WebhookDispatcher, hook: Webhook) -> list[Delivery]:
    return list(reversed(d.store.deliveries(hook.id, limit=100)))


async def test_an_event_is_delivered_signed(
    dispatcher: webhooks.WebhookDispatcher, db: Engine, receiver: Receiver
) -> None:
    hook, secret = await dispatcher.create("acme", receiver.url())
    assert secret.startswith("whsec_") and secret not in hook.secret_sealed
    add_event(db, tenant="other")  # another tenant's: never sent here
    event_id = add_event(db, from_state="")  # a VM's first event
    await asyncio.to_thread(dispatcher.on_event, object())  # the store tells listeners from its thread
    rows = await until(lambda: [d for d in log(dispatcher, hook) if d.state is DeliveryState.DELIVERED])
    assert [(d.event_id, d.attempt, d.status, d.error) for d in rows] == [(event_id, 1, 200, "")]
    (headers, body), = receiver.got  # fmt: skip
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Ember-Event-Id"] == str(event_id) and headers["X-Ember-Webhook-Id"] == hook.id
    assert webhooks.verify(secret, headers["X-Ember-Signature"], body)
    sent = json.loads(body)
    assert sent["type"] == "vm.state_changed" and sent["id"] == event_id and sent["tenant"] == "acme"
    assert sent["from_state"] is None and sent["to_state"] == "RUNNING" and sent["actor"] == "root"


async def test_retries_with_backoff_then_fails(
    dispatcher: webhooks.WebhookDispatcher, db: Engine, receiver: Receiver
) -> None:
    receiver.script = [500, 503, 502]
    receiver.answer = b"\x1b[31mboom\x00" + b"x" * 10000
    hook, _ = await dispatcher.create("acme", receiver.url())
    add_event(db)
    dispatcher.on_event(object())
    rows = await until(
        lambda: [d for d in log(dispatcher, hook) if d.attempt == 3 and d.state is not DeliveryState.PENDING]
    )
    rows = log(dispatcher, hook)
    assert [(d.attempt, d.status, d.state) for d in rows] == [
        (1, 500, DeliveryState.FAILED), (2, 503, DeliveryState.FAILED), (3, 502, DeliveryState.FAILED)]  # fmt: skip
    assert all(d.error.startswith("HTTP 5") and len(d.error) <= 200 and "\x1b" not in d.error for d in rows)
    assert rows[1].at > rows[0].at and all(d.duration_ms > 0 for d in rows)
    await asyncio.sleep(0.3)
    assert len(receiver.got) == 3  # the last allowed attempt: given up


async def test_a_500_then_success(dispatcher: webhooks.WebhookDispatcher, db: Engine, receiver: Receiver) -> None:
    receiver.script = [500]
    hook, _ = await dispatcher.create("acme", receiver.url())
    add_event(db)
    dispatcher.on_event(object())
    await until(lambda: any(d.state is DeliveryState.DELIVERED for d in log(dispatcher, hook)))
    assert [(d.attempt, d.status) for d in log(dispatcher, hook)] == [(1, 500), (2, 200)]
    assert receiver.got[0][0]["X-Ember-Event-Id"] == receiver.got[1][0]["X-Ember-Event-Id"]


async def test_redirects_are_not_followed(
    dispatcher: webhooks.WebhookDispatcher, db: Engine, receiver: Receiver
) -> None:
    receiver.script = [302, 302, 302]
    receiver.headers = {"Location": "http://169.254.169.254/latest/meta-data/"}
    hook, _ = await dispatcher.create("acme", receiver.url())
    add_event(db)
    dispatcher.on_event(object())
    rows = await until(lambda: [d for d in log(dispatcher, hook) if d.attempt == 3 and d.state is DeliveryState.FAILED])
    assert "redirect (not followed)" in rows[0].error and len(receiver.got) == 3


async def test_a_name_that_now_resolves_to_loopback_is_not_connected_to(
    dispatcher: webhooks.WebhookDispatcher, db: Engine, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: public when the webhook was made, loopback at delivery: refused, no connection made."""
    answers = {"hooks.example": ["93.184.215.14"]}
    lookups = fake_dns(monkeypatch, answers)
    hook, _ = await dispatcher.create("acme", receiver.url("hooks.example"))
    answers["hooks.example"] = ["127.0.0.1"]
    add_event(db)
    dispatcher.on_event(object())
    rows = await until(lambda: [d for d in log(dispatcher, hook) if d.attempt == 3 and d.state is DeliveryState.FAILED])
    assert "refused address" in rows[0].error and rows[0].status == 0
    assert receiver.got == [] and lookups.count("hooks.example") == 4


async def test_a_slow_receiver_is_cut_off_at_the_deadline(db: Engine, receiver: Receiver) -> None:
    """Each byte comes before any read timeout, but the attempt as a whole has EMBER_WEBHOOK_TIMEOUT."""
    receiver.drip_s = 0.1
    quick = webhooks.WebhookDispatcher(
        replace(SETTINGS, webhook_timeout_s=0.5, webhook_max_attempts=1), WebhookStore(db), SecretBox(os.urandom(32))
    )
    quick.start()
    try:
        hook, _ = await quick.create("acme", receiver.url())
        add_event(db)
        quick.on_event(object())
        (row,) = await until(lambda: [d for d in log(quick, hook) if d.state is DeliveryState.FAILED])
    finally:
        await quick.close()
    assert row.error == "no answer within 0.5 s" and row.status == 0 and 450 < row.duration_ms < 1500


async def test_pending_deliveries_survive_a_restart(db: Engine, receiver: Receiver) -> None:
    """An event stored while no worker ran (a daemon killed before it queued it), and an attempt cut off
    (its row still PENDING), are sent by the next worker."""
    box = SecretBox(os.urandom(32))
    first = webhooks.WebhookDispatcher(SETTINGS, WebhookStore(db), box)
    first.start()
    hook, secret = await first.create("acme", receiver.url())
    await first.close()
    cut_off = add_event(db)
    first.store.enqueue(hook.id, [cut_off], now=utcnow())  # queued, then the daemon died mid-attempt
    never_queued = add_event(db)
    second = webhooks.WebhookDispatcher(SETTINGS, WebhookStore(db), box)
    second.start()
    try:
        await until(lambda: len([d for d in log(second, hook) if d.state is DeliveryState.DELIVERED]) == 2)
    finally:
        await second.close()
    assert sorted(int(h["X-Ember-Event-Id"]) for h, _ in receiver.got) == [cut_off, never_queued]
    assert all(webhooks.verify(secret, h["X-Ember-Signature"], b) for h, b in receiver.got)


async def test_events_before_the_webhook_are_not_sent(
    dispatcher: webhooks.WebhookDispatcher, db: Engine, receiver: Receiver
) -> None:
    add_event(db)
    hook, _ = await dispatcher.create("acme", receiver.url())
    await asyncio.sleep(0.3)
    assert log(dispatcher, hook) == [] and receiver.got == []


async def test_webhooks_per_tenant_are_bounded(dispatcher: webhooks.WebhookDispatcher, receiver: Receiver) -> None:
    await dispatcher.create("acme", receiver.url())
    await dispatcher.create("acme", receiver.url())
    with pytest.raises(Conflict, match="EMBER_WEBHOOKS_PER_TENANT"):
        await dispatcher.create("acme", receiver.url())
    await dispatcher.create("other", receiver.url())


async def test_the_delivery_log_is_pruned(db: Engine) -> None:
    store = WebhookStore(db)
    hook = Webhook(id="wh-1", tenant="acme", url="http://127.0.0.1:9/", secret_sealed="x", created_at=utcnow())
    assert store.create(hook, limit=10)
    ids = [add_event(db) for _ in range(6)]
    store.enqueue(hook.id, ids, now=utcnow())
    for d in store.due(now=utcnow(), per_webhook=4, busy=frozenset()):
        store.record(d, webhooks.Outcome(at=utcnow(), status=200, error="", duration_ms=1.0, delivered=True))
    store.prune(hook.id, keep=3)
    left = store.deliveries(hook.id, limit=100)
    pending, delivered = DeliveryState.PENDING, DeliveryState.DELIVERED
    assert [(d.event_id, d.state) for d in left] == [(ids[5], pending), (ids[4], pending), (ids[3], delivered)]
    store.prune(hook.id, keep=0)
    assert [d.event_id for d in store.deliveries(hook.id, limit=100)] == [ids[5], ids[4]]  # PENDING ones stay
    assert store.cursor(hook) == ids[-1]


def test_due_attempts_are_taken_in_turns_across_tenants_and_capped_per_tenant() -> None:
    """One tenant's slow receivers cannot fill every delivery slot (hostile review M2)."""

    def due(i: int, hook: str) -> Delivery:
        return Delivery(i, hook, i, 1, "", 0, "", DeliveryState.PENDING, 0.0, "")

    backlog = [due(i, "wh-greedy") for i in range(1, 21)] + [due(100, "wh-other")]
    state = SimpleNamespace(_sending_for={}, _tenant_of={"wh-greedy": "greedy", "wh-other": "other"})
    picked = webhooks.WebhookDispatcher._fair(state, backlog)  # type: ignore[arg-type]
    assert [d.webhook_id for d in picked[:2]] == ["wh-greedy", "wh-other"]  # the other tenant is not last
    assert sum(d.webhook_id == "wh-greedy" for d in picked) == webhooks.PER_TENANT
    state._sending_for = {i: "greedy" for i in range(webhooks.PER_TENANT)}  # its slots are all in flight
    assert [d.webhook_id for d in webhooks.WebhookDispatcher._fair(state, backlog)] == ["wh-other"]  # type: ignore[arg-type]
