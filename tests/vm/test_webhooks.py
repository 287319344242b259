"""Webhooks through the real daemon: a loopback receiver gets a VM's lifecycle signed, retries show in the log.

The test daemon trusts 127.0.0.1 for webhooks (EMBER_WEBHOOK_TRUSTED_HOSTS, tests/conftest.py) and backs
off briefly between attempts.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from ember.webhooks import verify
from tests.conftest import DaemonProcess

pytestmark = pytest.mark.vm


@dataclass
class Receiver:
    """Records every POST; answers 500 to the first ``fail_first`` attempts of each event, then 200."""

    fail_first: int = 0
    got: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    tries: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def events(self) -> list[tuple[dict[str, str], bytes]]:
        with self.lock:
            return list(self.got)


@pytest.fixture
def receiver_factory() -> Iterator[Callable[[int], Receiver]]:
    servers: list[tuple[ThreadingHTTPServer, threading.Thread]] = []

    def make(fail_first: int = 0) -> Receiver:
        rec = Receiver(fail_first)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                event_id = self.headers.get("X-Ember-Event-Id", "")
                with rec.lock:
                    rec.got.append((dict(self.headers.items()), body))
                    rec.tries[event_id] += 1
                    status = 500 if rec.tries[event_id] <= rec.fail_first else 200
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        rec.url = f"http://127.0.0.1:{server.server_address[1]}/ember"
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append((server, thread))
        return rec

    yield make
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def api(daemon: DaemonProcess) -> Iterator[Callable[..., httpx.Response]]:
    """Raw requests to the daemon's socket as root (or with ``key``)."""
    http = httpx.Client(transport=httpx.HTTPTransport(uds=str(daemon.settings.socket_path)), base_url="http://ember",
                        timeout=300)  # fmt: skip

    def call(method: str, path: str, *, key: str = "", **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return http.request(method, path, headers=headers, **kwargs)

    yield call
    http.close()


@pytest.fixture
def webhook(api: Callable[..., httpx.Response]) -> Iterator[Callable[[str], dict[str, Any]]]:
    made: list[str] = []

    def create(url: str) -> dict[str, Any]:
        r = api("POST", "/v1/webhooks", json={"url": url})
        assert r.status_code == 201, r.text
        made.append(r.json()["id"])
        return dict(r.json())

    yield create
    for hook_id in made:
        assert api("DELETE", f"/v1/webhooks/{hook_id}").status_code in (204, 404)


def until(check: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
    return found


def sent_for(rec: Receiver, vm_id: str) -> list[dict[str, Any]]:
    return [e for e in (json.loads(b) for _, b in rec.events()) if e["vm_id"] == vm_id]


def test_a_vm_lifecycle_reaches_the_webhook_signed(
    api: Callable[..., httpx.Response], base_image: str, receiver_factory: Callable[[int], Receiver],
    webhook: Callable[[str], dict[str, Any]],
) -> None:  # fmt: skip
    rec = receiver_factory(0)
    hook = webhook(rec.url)
    assert hook["secret"].startswith("whsec_") and hook["url"] == rec.url
    assert "secret" not in api("GET", f"/v1/webhooks/{hook['id']}").json()
    assert hook["id"] in [h["id"] for h in api("GET", "/v1/webhooks").json()]
    vm_id = api("POST", "/v1/vms", json={"image": base_image}).json()["id"]
    for verb in ("suspend", "resume"):
        assert api("POST", f"/v1/vms/{vm_id}/{verb}").status_code == 200
    assert api("DELETE", f"/v1/vms/{vm_id}").status_code == 204
    recorded = api("GET", f"/v1/vms/{vm_id}/events").json()
    assert recorded[-1]["to_state"] == "TERMINATED"
    until(lambda: len(sent_for(rec, vm_id)) >= len(recorded))
    sent = sorted(sent_for(rec, vm_id), key=lambda e: e["id"])
    assert [{k: v for k, v in e.items() if k != "type"} for e in sent] == recorded  # each event once, as recorded
    assert all(e["type"] == "vm.state_changed" for e in sent)
    states = [e["to_state"] for e in sent]
    lifecycle = iter(states)
    assert all(s in lifecycle for s in ("RUNNING", "SUSPENDED", "RUNNING", "TERMINATED")), states
    for headers, body in rec.events():
        assert headers["X-Ember-Webhook-Id"] == hook["id"]
        assert headers["X-Ember-Event-Id"] == str(json.loads(body)["id"])
        assert verify(hook["secret"], headers["X-Ember-Signature"], body)
        assert not verify("whsec_wrong", headers["X-Ember-Signature"], body)
    log = api("GET", f"/v1/webhooks/{hook['id']}/deliveries", params={"limit": 1000}).json()
    mine = {e["id"] for e in recorded}
    assert {d["event_id"] for d in log if d["state"] == "DELIVERED" and d["status"] == 200} >= mine


def test_a_failing_receiver_sees_retries_and_the_log_shows_them(
    api: Callable[..., httpx.Response], base_image: str, receiver_factory: Callable[[int], Receiver],
    webhook: Callable[[str], dict[str, Any]],
) -> None:  # fmt: skip
    rec = receiver_factory(2)  # 500, 500, then 200 for every event
    hook = webhook(rec.url)
    vm_id = api("POST", "/v1/vms", json={"image": base_image}).json()["id"]
    assert api("DELETE", f"/v1/vms/{vm_id}").status_code == 204
    recorded = {e["id"] for e in api("GET", f"/v1/vms/{vm_id}/events").json()}

    def settled() -> list[dict[str, Any]] | None:
        log: list[dict[str, Any]] = api("GET", f"/v1/webhooks/{hook['id']}/deliveries").json()
        done = {d["event_id"] for d in log if d["state"] == "DELIVERED"}
        return log if recorded <= done else None

    log = until(settled)
    for event_id in recorded:
        attempts = sorted((d["attempt"], d["status"], d["state"]) for d in log if d["event_id"] == event_id)
        assert attempts == [(1, 500, "FAILED"), (2, 500, "FAILED"), (3, 200, "DELIVERED")]
        rows = [d for d in log if d["event_id"] == event_id]
        assert all(d["webhook_id"] == hook["id"] and d["duration_ms"] > 0 for d in rows)
        assert {d["error"] for d in rows if d["status"] == 500} == {"HTTP 500: ok"}
        assert rec.tries[str(event_id)] == 3
    assert all(verify(hook["secret"], h["X-Ember-Signature"], b) for h, b in rec.events())  # every attempt signed


def test_hostile_webhook_urls_are_refused(api: Callable[..., httpx.Response]) -> None:
    for url in ("http://169.254.169.254/latest/meta-data/", "http://[::1]/", "http://0x7f000001/",
                "http://localhost:9/", "http://user:pw@example.com/", "file:///etc/passwd"):  # fmt: skip
        r = api("POST", "/v1/webhooks", json={"url": url})
        assert r.status_code == 400, (url, r.text)
        assert r.json()["error"] == "InvalidRequest" and "webhook url" in r.json()["message"]
    assert all(h["url"] != "http://[::1]/" for h in api("GET", "/v1/webhooks").json())


def test_another_tenants_webhook_answers_as_missing(
    api: Callable[..., httpx.Response], receiver_factory: Callable[[int], Receiver],
    webhook: Callable[[str], dict[str, Any]],
) -> None:  # fmt: skip
    hook = webhook(receiver_factory(0).url)
    assert api("POST", "/v1/tenants", json={"name": "wh-other"}).status_code in (201, 409)
    key = api("POST", "/v1/keys", json={"tenant": "wh-other"}).json()["api_key"]
    fake = "wh-0000000000000000"
    for method, tail in (("GET", ""), ("DELETE", ""), ("GET", "/deliveries")):
        theirs = api(method, f"/v1/webhooks/{hook['id']}{tail}", key=key)
        missing = api(method, f"/v1/webhooks/{fake}{tail}", key=key)
        assert theirs.status_code == missing.status_code == 404
        assert theirs.json() == {**missing.json(), "message": missing.json()["message"].replace(fake, hook["id"])}
        assert theirs.json()["error"] == "WebhookNotFound"
    assert api("GET", "/v1/webhooks", key=key).json() == []
    assert api("GET", f"/v1/webhooks/{hook['id']}").status_code == 200  # still there for its tenant
