"""Tenant webhooks: every VM event of the tenant, POSTed signed to a URL, retried with backoff, logged.

What a receiver gets: a POST of the event's JSON (``ember.models.EventRecord``'s fields plus
``"type": "vm.state_changed"``) with the headers

    Content-Type: application/json
    X-Ember-Event-Id: <the event's id>       (the same on every retry: deduplicate on it)
    X-Ember-Webhook-Id: <the webhook's id>
    X-Ember-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + raw body)>

``secret`` is the webhook's, returned once when it was created. A receiver checks the signature
over the raw body (before parsing it) and refuses old timestamps (replays), as :func:`verify`
does; the SDK and receivers in other languages can copy its few lines. Any 2xx answer means
delivered; anything else (no answer within EMBER_WEBHOOK_TIMEOUT, a 3xx: redirects are not
followed, a 4xx or 5xx) is retried after EMBER_WEBHOOK_BACKOFF seconds, doubling each time up to
EMBER_WEBHOOK_BACKOFF_MAX, until EMBER_WEBHOOK_MAX_ATTEMPTS attempts; then it is FAILED. Delivery is
at-least-once: the queue is rows in the database (``ember.db.webhooks``), so a restarted daemon
sends what was pending, and an attempt cut off by the daemon's end is sent again.

The URL is the tenant's choice and the daemon runs as root, so Ember must not become a way into
the host's network: http or https only, no user:password, at most 2048 characters, IP addresses in
standard form, and every address the host resolves to is checked against ``ember.netpolicy``'s
deny list (loopback, private, link-local and cloud metadata, ...) when the webhook is created and
again at every connection, which goes to the very address checked (``netpolicy.PinnedTransport``).
Hosts in EMBER_WEBHOOK_TRUSTED_HOSTS are the operator's and exempt. At most 4 KiB of an answer is
read, and at most 200 characters of it go into the delivery log.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import secrets
import ssl
import time
from datetime import UTC, datetime
from typing import Any, Protocol

import httpx

from ember import netpolicy
from ember.config import Settings
from ember.db.webhooks import Delivery, Outcome, Webhook, WebhookStore
from ember.errors import Conflict, InvalidRequest
from ember.models import utcnow

log = logging.getLogger(__name__)

EVENT_TYPE = "vm.state_changed"
SIGNATURE_HEADER = "X-Ember-Signature"
EVENT_ID_HEADER = "X-Ember-Event-Id"
WEBHOOK_ID_HEADER = "X-Ember-Webhook-Id"
MAX_URL = 2048
MAX_SIGNATURE_HEADER = 1024
ANSWER_READ = 4096  # bytes of a receiver's answer read at most
ERROR_CHARS = 200  # characters of it kept in the delivery log
IN_FLIGHT = 16  # attempts at once, all webhooks together
PER_WEBHOOK = 2  # attempts at once to one webhook (a slow receiver does not hold up the others)
PER_TENANT = 4  # attempts at once for one tenant's webhooks: slow receivers of one tenant never fill every slot
EVENT_BATCH = 500  # events queued per webhook per pass
POLL_S = 60.0  # the worker looks at the queue at least this often
HOST_NAME = re.compile(r"(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?\.?")


class Sealer(Protocol):
    """Seals secrets at rest (``ember.tenancy.secrets.SecretBox``)."""

    def seal(self, plain: str) -> str: ...

    def open(self, sealed: str) -> str: ...


# ---- signatures -------------------------------------------------------------


def sign(secret: str, body: bytes, *, timestamp: int) -> str:
    """The ``X-Ember-Signature`` value of ``body`` sent at ``timestamp`` (unix seconds)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, header: str, body: bytes, *, tolerance_s: float = 300, now: float | None = None) -> bool:
    """Whether ``header`` (an ``X-Ember-Signature`` value) signs the raw ``body`` with ``secret``, made
    within ``tolerance_s`` seconds of ``now`` (default: the clock). For receivers: refuse the request
    when this is False."""
    if len(header) > MAX_SIGNATURE_HEADER:
        return False
    timestamp, macs = None, []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isascii() and value.isdigit():
            timestamp = int(value)
        elif key == "v1":
            macs.append(value)
    if timestamp is None or abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = sign(secret, body, timestamp=timestamp).rpartition("v1=")[2]
    return any(hmac.compare_digest(expected.encode(), mac.encode()) for mac in macs)


def event_body(event: dict[str, Any]) -> bytes:
    """What a webhook receives for an event (a row of the ``events`` table): the event as the API shows it
    (``ember.api.vms.event_view``: a VM's first event has no ``from_state``), and its type."""
    view = {**event, "from_state": event["from_state"] or None, "type": EVENT_TYPE}
    return json.dumps(view, separators=(",", ":"), sort_keys=True).encode()


# ---- the URL ----------------------------------------------------------------


def _bad(why: str) -> InvalidRequest:
    return InvalidRequest(f"the webhook url {why}")


def check_url(url: str, policy: netpolicy.AddressPolicy) -> httpx.URL:
    """``url`` parsed, if it may be a webhook's (all but DNS: see :func:`check_destination`)."""
    if len(url) > MAX_URL:
        raise _bad(f"is longer than {MAX_URL} characters")
    try:
        parsed = httpx.URL(url)
        port = parsed.port
    except (httpx.InvalidURL, ValueError):
        raise _bad("is not a valid URL: give an absolute http:// or https:// URL") from None
    if parsed.scheme not in ("http", "https"):
        raise _bad("must be http:// or https://")
    if parsed.userinfo:
        raise _bad("must not hold a user name or password: authenticate the requests by their signature")
    host = parsed.raw_host.decode("ascii", "replace").lower()
    if not host:
        raise _bad("has no host")
    if port is not None and not 0 < port < 65536:
        raise _bad("has a port outside 1-65535")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if len(host) > 253 or not HOST_NAME.fullmatch(host):
            raise _bad("has an invalid host: give a DNS name, or an IP address in standard form") from None
        return parsed
    if not policy.is_trusted(host) and netpolicy.denied(address, netpolicy.host_addresses()):
        raise _refused()
    return parsed


def _refused() -> InvalidRequest:
    return _bad(
        "does not resolve to a public address (Ember never connects to loopback, private, link-local or "
        "cloud metadata addresses on a tenant's behalf): use a host with public addresses"
    )


async def check_destination(url: httpx.URL, policy: netpolicy.AddressPolicy, *, timeout: float) -> None:
    """Every address ``url``'s host resolves to may be connected to (the same message whether the name
    does not resolve or resolves to a refused address: no probing of the host's network)."""
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
        addresses = await netpolicy.resolve_checked(url.host, port, policy, timeout)
    except (netpolicy.AddressDenied, OSError, TimeoutError, ValueError):  # ValueError: a name IDNA refuses
        raise _refused() from None
    if not addresses:
        raise _refused()


# ---- delivery ---------------------------------------------------------------


def backoff(settings: Settings, attempt: int) -> float:
    """Seconds between attempt ``attempt`` (1 = the first) failing and the next one."""
    return float(min(settings.webhook_backoff_s * 2 ** min(attempt - 1, 62), settings.webhook_backoff_max_s))


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def _printable(raw: bytes) -> str:
    text = "".join(ch if ch.isprintable() else " " for ch in raw.decode("utf-8", "replace"))
    return " ".join(text.split())[:ERROR_CHARS]


async def _answer(resp: httpx.Response) -> bytes:
    """At most :data:`ANSWER_READ` bytes of the answer, as sent (never decompressed)."""
    got = bytearray()
    async for chunk in resp.aiter_raw():
        got += chunk
        if len(got) >= ANSWER_READ:
            break
    return bytes(got[:ANSWER_READ])


class WebhookDispatcher:
    """The tenant's webhooks: created through :meth:`create`, fed by :meth:`on_event`, sent by a worker
    task between :meth:`start` and :meth:`close`."""

    def __init__(self, settings: Settings, store: WebhookStore, secrets: Sealer) -> None:
        self.settings = settings
        self.store = store
        self.secrets = secrets
        self.policy = netpolicy.AddressPolicy.trusting(settings.webhook_trusted_hosts)
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._sending: dict[int, asyncio.Task[None]] = {}
        self._queueing: asyncio.Future[None] | None = None  # the pass's queueing thread, if one runs
        self._sending_for: dict[int, str] = {}  # delivery id -> its webhook's tenant
        self._tenant_of: dict[str, str] = {}  # webhook id -> tenant, as of the last pass
        self._cursors: dict[str, int] = {}
        self._client: httpx.AsyncClient | None = None

    async def create(self, tenant: str, url: str) -> tuple[Webhook, str]:
        """A new webhook of ``tenant`` and its secret (the only time the secret is told)."""
        parsed = check_url(url, self.policy)
        limit = self.settings.webhooks_per_tenant
        if await asyncio.to_thread(self.store.count, tenant) >= limit:
            raise self._full(limit)
        await check_destination(parsed, self.policy, timeout=self.settings.webhook_timeout_s)
        secret = "whsec_" + secrets.token_urlsafe(32)
        hook = Webhook(
            id="wh-" + secrets.token_hex(8), tenant=tenant, url=str(parsed),
            secret_sealed=self.secrets.seal(secret), created_at=utcnow(),
        )  # fmt: skip
        if not await asyncio.to_thread(self.store.create, hook, limit=limit):
            raise self._full(limit)
        self.wake()
        return hook, secret

    @staticmethod
    def _full(limit: int) -> Conflict:
        return Conflict(f"the tenant has {limit} webhooks, the most allowed (EMBER_WEBHOOKS_PER_TENANT): remove one")

    def start(self) -> None:
        """Start the worker (in the running event loop); what was pending before a restart goes first."""
        self._loop = asyncio.get_running_loop()
        verify = ssl.create_default_context()
        self._client = httpx.AsyncClient(
            transport=netpolicy.PinnedTransport(verify, self.policy, max_connections=IN_FLIGHT),
            follow_redirects=False, trust_env=False, timeout=httpx.Timeout(self.settings.webhook_timeout_s),
            headers={"User-Agent": "Ember-Webhooks/1", "Accept-Encoding": "identity"},
        )  # fmt: skip
        self._task = asyncio.create_task(self._run(), name="webhooks")

    async def close(self) -> None:
        """Stop the worker; attempts cut off stay PENDING and are sent again by the next daemon."""
        self._loop = None
        tasks = [t for t in (self._task, *self._sending.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._queueing is not None:
            await asyncio.gather(self._queueing, return_exceptions=True)
            self._queueing = None
        self._task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def on_event(self, event: object) -> None:
        """A VM event was stored: wake the worker (which reads new events from the ``events`` table, so an
        event stored just before the daemon died is sent too). Safe to call from any thread."""
        del event  # the table is the source of truth
        try:
            self.wake()
        except Exception:  # never fail the state change that told us
            log.exception("cannot wake the webhook worker; it looks again within %.0f s", POLL_S)

    def wake(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            here = asyncio.get_running_loop() is loop
        except RuntimeError:
            here = False
        if here:
            self._wake.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._wake.set)

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            wait = POLL_S
            try:
                wait = await self._pass()
            except Exception:
                log.exception("webhook delivery pass failed; retrying in %.0f s", POLL_S)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    async def _pass(self) -> float:
        """Queue new events, start the attempts that are due; seconds until the next one is."""
        # shielded: a thread cannot be cancelled, so close() waits for it rather than leave it queueing behind
        self._queueing = asyncio.ensure_future(asyncio.to_thread(self._queue_events))
        await asyncio.shield(self._queueing)
        now = _iso(time.time())
        room = IN_FLIGHT - len(self._sending)
        if room > 0:
            busy = frozenset(self._sending)
            due = await asyncio.to_thread(self.store.due, now=now, per_webhook=PER_WEBHOOK, busy=busy)
            for delivery in self._fair(due)[:room]:
                task = asyncio.create_task(self._attempt(delivery), name=f"webhook-delivery-{delivery.id}")
                self._sending[delivery.id] = task
                self._sending_for[delivery.id] = self._tenant_of.get(delivery.webhook_id, "")
                task.add_done_callback(functools.partial(self._done, delivery.id))
        # attempts due by now but not started wait for a slot: a finished attempt wakes the worker
        nxt = await asyncio.to_thread(self.store.next_due, after=now)
        if nxt is None:
            return POLL_S
        return min(max(datetime.fromisoformat(nxt).timestamp() - time.time(), 0.01), POLL_S)

    def _fair(self, due: list[Delivery]) -> list[Delivery]:
        """``due`` taken in turns across tenants (oldest first within one), at most PER_TENANT in flight each."""
        busy = collections.Counter(self._sending_for.values())
        queues: dict[str, collections.deque[Delivery]] = {}
        for delivery in due:
            queues.setdefault(self._tenant_of.get(delivery.webhook_id, ""), collections.deque()).append(delivery)
        picked: list[Delivery] = []
        while queues:
            for tenant in list(queues):
                if busy[tenant] >= PER_TENANT or not queues[tenant]:
                    del queues[tenant]
                    continue
                picked.append(queues[tenant].popleft())
                busy[tenant] += 1
        return picked

    def _done(self, delivery_id: int, _: asyncio.Task[None]) -> None:
        self._sending.pop(delivery_id, None)
        self._sending_for.pop(delivery_id, None)
        self._wake.set()

    def _queue_events(self) -> None:
        hooks = self.store.list_webhooks(tenant=None)
        self._tenant_of = {h.id: h.tenant for h in hooks}
        self._cursors = {h.id: self._cursors[h.id] for h in hooks if h.id in self._cursors}
        for hook in hooks:
            after = self._cursors[hook.id] if hook.id in self._cursors else self.store.cursor(hook)
            new = self.store.events_after(hook.tenant, after, limit=EVENT_BATCH)
            self.store.enqueue(hook.id, new, now=utcnow())
            self._cursors[hook.id] = new[-1] if new else after
            if len(new) == EVENT_BATCH:
                self._wake.set()  # more to queue: another pass at once

    async def _attempt(self, delivery: Delivery) -> None:
        try:
            await self._send(delivery)
        except Exception:  # the attempt stays PENDING; the next pass tries again
            log.exception("webhook delivery %d failed unexpectedly", delivery.id)
            await asyncio.sleep(POLL_S)

    async def _send(self, delivery: Delivery) -> None:
        hook = await asyncio.to_thread(self.store.get, delivery.webhook_id, tenant=None)
        event = await asyncio.to_thread(self.store.event, delivery.event_id)
        if hook is None:
            await asyncio.to_thread(self.store.drop, delivery.id)
            return
        started = time.monotonic()
        if event is None:
            status, error, final = 0, "the event is no longer recorded", True
        else:
            status, error, final = await self._post(hook, event)
        attempts_left = delivery.attempt < self.settings.webhook_max_attempts
        delivered = 200 <= status < 300
        retry_at = ""
        if not delivered and not final and attempts_left:
            retry_at = _iso(time.time() + backoff(self.settings, delivery.attempt))
        outcome = Outcome(
            at=utcnow(), status=status, error=error, duration_ms=round((time.monotonic() - started) * 1000, 3),
            delivered=delivered, retry_at=retry_at,
        )  # fmt: skip
        await asyncio.to_thread(self.store.record, delivery, outcome)
        await asyncio.to_thread(self.store.prune, hook.id, keep=self.settings.webhook_log_rows)

    async def _post(self, hook: Webhook, event: dict[str, Any]) -> tuple[int, str, bool]:
        """One POST: (the status or 0, the error for the log, whether retrying is pointless)."""
        try:
            url = check_url(hook.url, self.policy)
        except InvalidRequest as exc:
            return 0, str(exc)[:ERROR_CHARS], True
        body = event_body(event)
        try:
            secret = self.secrets.open(hook.secret_sealed)
        except ValueError:  # sealed under another key (the key file was replaced): it can never be signed
            return 0, "the webhook's secret cannot be read (the daemon's secret key changed): make it again", True
        headers = {
            "Content-Type": "application/json",
            EVENT_ID_HEADER: str(event["id"]),
            WEBHOOK_ID_HEADER: hook.id,
            SIGNATURE_HEADER: sign(secret, body, timestamp=int(time.time())),
        }
        assert self._client is not None
        timeout = self.settings.webhook_timeout_s
        try:
            async with asyncio.timeout(timeout), self._client.stream("POST", url, content=body, headers=headers) as r:
                answer = await _answer(r)
                status = r.status_code
        except TimeoutError:
            return 0, f"no answer within {timeout:g} s", False
        except netpolicy.AddressDenied:
            return 0, "the host resolves to a refused address (loopback, private, link-local or metadata)", False
        except httpx.HTTPError as exc:
            return 0, _printable(f"cannot connect: {type(exc).__name__}: {exc}".encode()), False
        if 200 <= status < 300:
            return status, "", False
        what = "a redirect (not followed)" if 300 <= status < 400 else f"HTTP {status}"
        return status, _printable(f"{what}: ".encode() + answer) if answer else what, False
