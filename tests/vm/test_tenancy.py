"""Tenancy through the real daemon, as raw HTTP on its Unix socket (what any client sends).

Another tenant's resource answers exactly like a missing one on every route of the OpenAPI document; a
revoked key stops at once; quotas and rate limits answer 429 with what to do; a client_token makes a run
idempotent; a lifecycle leaves its events in order with their actor.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from ember.sdk.context import context_tar
from tests.conftest import DaemonProcess

pytestmark = pytest.mark.vm


@dataclass
class Tenant:
    name: str
    key_id: str
    http: httpx.Client


def socket_client(daemon: DaemonProcess, key: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    transport = httpx.HTTPTransport(uds=str(daemon.settings.socket_path))
    return httpx.Client(transport=transport, base_url="http://ember", headers=headers, timeout=120)


@pytest.fixture(scope="module")
def root(daemon: DaemonProcess) -> Iterator[httpx.Client]:
    with socket_client(daemon) as c:
        yield c


def new_tenant(daemon: DaemonProcess, root: httpx.Client, **quotas: int) -> Tenant:
    name = f"t-{secrets.token_hex(4)}"
    r = root.post("/v1/tenants", json={"name": name, "quotas": quotas})
    assert r.status_code == 201, r.text
    key = root.post("/v1/keys", json={"tenant": name})
    assert key.status_code == 201, key.text
    return Tenant(name, key.json()["key_id"], socket_client(daemon, key.json()["api_key"]))


@pytest.fixture(scope="module")
def alice(daemon: DaemonProcess, root: httpx.Client) -> Iterator[Tenant]:
    t = new_tenant(daemon, root)
    yield t
    t.http.close()


@pytest.fixture(scope="module")
def mallory(daemon: DaemonProcess, root: httpx.Client) -> Iterator[Tenant]:
    t = new_tenant(daemon, root)
    yield t
    t.http.close()


def run(t: Tenant, image: str, **body: Any) -> dict[str, Any]:
    r = t.http.post("/v1/vms", json={"image": image, **body})
    assert r.status_code == 201, r.text
    return dict(r.json())


# A valid request for every route with a path parameter: a foreign id must not be told apart from a missing one
# by a 400 about the body. A route missing here fails the test: add it.
BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("post", "/v1/vms/{vm_id}/exec"): {"json": {"argv": ["true"]}},
    ("post", "/v1/vms/{vm_id}/snapshot"): {"json": {"name": "fork"}},
    ("put", "/v1/vms/{vm_id}/files"): {"params": {"path": "/tmp/x"}, "content": b"x"},
    ("get", "/v1/vms/{vm_id}/files"): {"params": {"path": "/etc/hostname"}},
    ("get", "/v1/vms/{vm_id}/ls"): {"params": {"path": "/"}},
    ("put", "/v1/vms/{vm_id}/exec/stdin/{stdin_id}"): {"content": b"x"},
    ("patch", "/v1/tenants/{name}"): {"json": {"quotas": {}}},
    ("post", "/v1/vms/{vm_id}/processes"): {"json": {"argv": ["true"]}},
    ("post", "/v1/vms/{vm_id}/processes/{pid}/kill"): {"json": {"signal": "TERM"}},
    ("post", "/v1/vms/{vm_id}/auth-tokens"): {"json": {"expires_in_minutes": 5, "allowed_ports": "8080"}},
    ("post", "/v1/vms/{vm_id}/shell-tokens"): {"json": {"expires_in_minutes": 5}},
}
ADMIN_ONLY = re.compile(r"^/v1/tenants")


def test_another_tenants_resources_answer_exactly_like_missing_ones(
    daemon: DaemonProcess, root: httpx.Client, alice: Tenant, mallory: Tenant, base_image: str, tmp_path: Path
) -> None:
    vm = run(alice, base_image)
    (tmp_path / "Dockerfile").write_text("FROM scratch\nCOPY f /f\n")
    (tmp_path / "f").write_text("x")
    built = alice.http.post(
        "/v1/images/build", params={"name": "app"}, content=b"".join(context_tar(tmp_path)),
        headers={"Content-Type": "application/x-tar"},
    )  # fmt: skip
    assert built.status_code == 200 and '"CREATED"' in built.text.splitlines()[-1], built.text[-2000:]
    hook = alice.http.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/hook"})
    assert hook.status_code == 201, hook.text
    owned = {"vm_id": vm["id"], "name": "app:1", "webhook_id": hook.json()["id"], "key_id": alice.key_id,
             "stdin_id": "0", "pid": "1"}  # fmt: skip
    missing = {"vm_id": "vm-" + "0" * 12, "name": "nope:1", "webhook_id": "wh-" + "0" * 16,
               "key_id": "key-" + "0" * 16, "stdin_id": "0", "pid": "1"}  # fmt: skip
    paths = root.get("/openapi.json").json()["paths"]
    checked = 0
    for template, operations in paths.items():
        params = re.findall(r"{(\w+)}", template)
        if not params or ADMIN_ONLY.match(template):
            continue
        for method in operations:
            if method not in ("get", "put", "post", "patch", "delete"):
                continue
            extra = BODIES.get((method, template), {})
            if method in ("post", "put", "patch") and not extra and "requestBody" in operations[method]:
                pytest.fail(f"{method.upper()} {template} takes a body: add a valid one to BODIES")
            answers = []
            for ids in (owned, missing):
                url = template
                for p in params:
                    url = url.replace("{" + p + "}", ids[p])
                r = mallory.http.request(method.upper(), url, **extra)
                body = r.text
                for p in params:
                    body = body.replace(ids[p], "<id>")
                answers.append((r.status_code, body))
            assert answers[0] == answers[1], f"{method.upper()} {template}: {answers}"
            assert answers[0][0] in (404, 409), f"{method.upper()} {template}: {answers}"
            checked += 1
    assert checked >= 15
    # and the lists show none of alice's
    assert vm["id"] not in mallory.http.get("/v1/vms", params={"all": "true"}).text
    assert "app" not in [i["name"] for i in mallory.http.get("/v1/images").json()]
    assert mallory.http.get("/v1/events").json() == []
    # alice's own resources are all there
    assert alice.http.get(f"/v1/vms/{vm['id']}").status_code == 200
    assert alice.http.get("/v1/images/app").json()["state"] == "CREATED"
    assert alice.http.delete(f"/v1/vms/{vm['id']}").status_code == 204


def test_built_in_bases_are_visible_to_all_and_read_only(alice: Tenant, base_image: str) -> None:
    listed = {i["name"]: i for i in alice.http.get("/v1/images").json()}
    assert listed[base_image]["builtin"] is True
    r = alice.http.delete(f"/v1/images/{base_image}")
    assert r.status_code == 403 and "read-only" in r.json()["message"]
    assert alice.http.get(f"/v1/images/{base_image}").status_code == 200


def test_tenants_and_metrics_are_for_admins_only(alice: Tenant) -> None:
    for method, url in (("GET", "/v1/tenants"), ("POST", "/v1/tenants"), ("GET", "/metrics")):
        r = alice.http.request(method, url, json={"name": "x"} if method == "POST" else None)
        assert r.status_code == 403, (url, r.text)
        assert r.json()["error"] == "Forbidden"


def test_a_revoked_key_stops_at_once(daemon: DaemonProcess, root: httpx.Client) -> None:
    t = new_tenant(daemon, root)
    assert t.http.get("/v1/whoami").json() == {"tenant": t.name, "admin": False, "key_id": t.key_id}
    assert t.http.delete(f"/v1/keys/{t.key_id}").status_code == 204
    r = t.http.get("/v1/whoami")
    assert r.status_code == 401 and r.json()["error"] == "Unauthorized"
    keys = root.get("/v1/keys", params={"tenant": t.name}).json()
    assert keys[0]["revoked_at"] is not None and "api_key" not in keys[0] and "secret_access_key" not in keys[0]
    with socket_client(daemon, "ember_" + "x" * 43) as wrong:
        assert wrong.get("/v1/vms").status_code == 401


def test_quota_exceeded_is_a_429_naming_the_quota_its_limit_and_use(
    daemon: DaemonProcess, root: httpx.Client, base_image: str
) -> None:
    t = new_tenant(daemon, root, max_running_vms=1)
    first = run(t, base_image)
    r = t.http.post("/v1/vms", json={"image": base_image})
    assert r.status_code == 429, r.text
    body = r.json()
    assert body["error"] == "QuotaExceeded"
    assert (body["quota"], body["limit"], body["current"]) == ("max_running_vms", 1, 1)
    assert "max_running_vms" in body["message"] and "ember tenant set --max-running-vms" in body["message"]
    # the operator raises it: the launch goes through
    assert root.patch(f"/v1/tenants/{t.name}", json={"quotas": {"max_running_vms": 2}}).status_code == 200
    second = run(t, base_image)
    shown = root.get(f"/v1/tenants/{t.name}").json()
    assert shown["quotas"]["max_running_vms"] == 2 and shown["usage"]["max_running_vms"] == 2
    for vm in (first, second):
        assert t.http.delete(f"/v1/vms/{vm['id']}").status_code == 204
    t.http.close()


def test_a_key_past_its_rate_gets_429_with_retry_after(daemon: DaemonProcess, root: httpx.Client) -> None:
    t = new_tenant(daemon, root)
    statuses: list[int] = []
    retry_after: list[str] = []

    def hammer() -> None:
        with socket_client(daemon, t.http.headers["Authorization"].split()[1]) as c:
            for _ in range(250):
                r = c.get("/v1/whoami")
                statuses.append(r.status_code)
                if r.status_code == 429:
                    retry_after.append(r.headers["Retry-After"])
                    assert r.json()["error"] == "RateLimited" and r.json()["retry_after"] > 0

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert set(statuses) <= {200, 429} and 429 in statuses, statuses.count(429)
    assert all(int(v) >= 1 for v in retry_after)
    assert root.get("/v1/whoami").status_code == 200  # root is not limited
    t.http.close()


def test_a_client_token_makes_run_idempotent(alice: Tenant, base_image: str) -> None:
    token = secrets.token_hex(8)
    first = run(alice, base_image, client_token=token, tags={"team": "a"})
    again = run(alice, base_image, client_token=token, tags={"team": "a"})
    assert again["id"] == first["id"]
    r = alice.http.post("/v1/vms", json={"image": base_image, "client_token": token, "tags": {"team": "b"}})
    assert r.status_code == 409 and r.json()["error"] == "IdempotencyConflict"
    assert [v["id"] for v in alice.http.get("/v1/vms", params={"tag": "team=a"}).json()] == [first["id"]]
    assert alice.http.delete(f"/v1/vms/{first['id']}").status_code == 204


def test_a_lifecycle_leaves_its_events_in_order_and_a_terminated_record(alice: Tenant, base_image: str) -> None:
    vm = run(alice, base_image, env={"GREETING": "hi"}, tags={"lifecycle": "1"})
    vm_id = vm["id"]
    out = alice.http.post(f"/v1/vms/{vm_id}/exec", json={"argv": ["sh", "-c", "echo $GREETING"]})
    assert '"exit_code": 0' in out.text and "aGkK" in out.text  # base64 of "hi\n": the VM's env reaches exec
    assert alice.http.post(f"/v1/vms/{vm_id}/suspend").status_code == 200
    assert alice.http.post(f"/v1/vms/{vm_id}/resume").status_code == 200
    assert alice.http.delete(f"/v1/vms/{vm_id}").status_code == 204
    events = alice.http.get(f"/v1/vms/{vm_id}/events").json()
    steps = [(e["from_state"], e["to_state"], e["reason"]) for e in events]
    assert steps == [
        (None, "PENDING", "launch"),
        ("PENDING", "RUNNING", "launch"),
        ("RUNNING", "SUSPENDING", "user_suspend"),
        ("SUSPENDING", "SUSPENDED", "user_suspend"),
        ("SUSPENDED", "RESUMING", "user_resume"),
        ("RESUMING", "RUNNING", "user_resume"),
        ("RUNNING", "TERMINATING", "user_terminate"),
        ("TERMINATING", "TERMINATED", "user_terminate"),
    ]
    assert {e["actor"] for e in events} == {alice.key_id}
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
    # removed: out of the default list, in --all, with its final reason
    assert vm_id not in [v["id"] for v in alice.http.get("/v1/vms").json()]
    ended = [v for v in alice.http.get("/v1/vms", params={"all": "true"}).json() if v["id"] == vm_id]
    assert ended[0]["state"] == "TERMINATED" and ended[0]["state_reason"] == "user_terminate"
    assert ended[0]["terminated_at"] is not None
    r = alice.http.post(f"/v1/vms/{vm_id}/exec", json={"argv": ["true"]})
    assert r.status_code == 409 and "removed" in r.json()["message"]


def test_concurrent_launches_cannot_pass_a_quota_together(
    daemon: DaemonProcess, root: httpx.Client, base_image: str
) -> None:
    t = new_tenant(daemon, root, max_running_vms=1)
    answers: list[httpx.Response] = []

    def launch() -> None:
        with socket_client(daemon, t.http.headers["Authorization"].split()[1]) as c:
            answers.append(c.post("/v1/vms", json={"image": base_image}))

    threads = [threading.Thread(target=launch) for _ in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [201, 429, 429, 429, 429, 429], [r.text for r in answers]
    assert len(t.http.get("/v1/vms").json()) == 1
    for r in answers:
        if r.status_code == 201:
            assert t.http.delete(f"/v1/vms/{r.json()['id']}").status_code == 204
    t.http.close()


def test_a_failed_vm_counts_until_removed_and_its_end_is_the_daemons_doing(
    daemon: DaemonProcess, root: httpx.Client, base_image: str
) -> None:
    """A guest can end its own VMM (sysrq, reboot): the FAILED VM keeps its disk and uid, so it counts."""
    t = new_tenant(daemon, root, max_running_vms=1)
    vm = run(t, base_image)
    pid = root.get(f"/v1/vms/{vm['id']}").json()["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while t.http.get(f"/v1/vms/{vm['id']}").json()["state"] != "FAILED":
        assert time.monotonic() < deadline, "the VMM's death was not noticed"
        time.sleep(0.2)
    r = t.http.post("/v1/vms", json={"image": base_image})
    assert r.status_code == 429 and r.json()["quota"] == "max_running_vms", r.text
    last = t.http.get(f"/v1/vms/{vm['id']}/events").json()[-1]
    assert (last["to_state"], last["reason"], last["actor"]) == ("FAILED", "vmm_exited", "system")
    assert t.http.delete(f"/v1/vms/{vm['id']}").status_code == 204
    again = run(t, base_image)
    assert t.http.delete(f"/v1/vms/{again['id']}").status_code == 204
    t.http.close()


def test_keys_per_tenant_are_capped(daemon: DaemonProcess, root: httpx.Client) -> None:
    t = new_tenant(daemon, root)  # holds one key
    made = [t.http.post("/v1/keys", json={}) for _ in range(daemon.settings.keys_per_tenant)]
    assert [r.status_code for r in made].count(201) == daemon.settings.keys_per_tenant - 1
    refused = made[-1]
    assert refused.status_code == 409 and "EMBER_KEYS_PER_TENANT" in refused.json()["message"]
    assert t.http.delete(f"/v1/keys/{made[0].json()['key_id']}").status_code == 204  # revoking frees one
    assert t.http.post("/v1/keys", json={}).status_code == 201
    t.http.close()


def test_a_build_refused_before_it_starts_frees_its_client_token(alice: Tenant, tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM scratch\nCOPY f /f\n")
    (tmp_path / "f").write_text("y")
    tar = b"".join(context_tar(tmp_path))

    def build(name: str, token: str) -> str:
        r = alice.http.post("/v1/images/build", params={"name": name, "client_token": token}, content=tar,
                            headers={"Content-Type": "application/x-tar"})  # fmt: skip
        assert r.status_code == 200, r.text
        return r.text.splitlines()[-1]

    assert '"CREATED"' in build("tokened:1", secrets.token_hex(4))
    token = secrets.token_hex(4)
    for _ in range(2):  # the tag is taken: refused each time, never "still running"
        last = build("tokened:1", token)
        assert "NameTaken" in last and "still running" not in last, last
    assert alice.http.delete("/v1/images/tokened:1").status_code == 204


def test_nul_characters_are_refused_not_stored(alice: Tenant) -> None:
    for method, url, body in (
        ("GET", "/v1/webhooks/a%00b", None), ("DELETE", "/v1/keys/%00", None), ("GET", "/v1/vms?tenant=%00", None),
        ("POST", "/v1/keys", {"name": "a\u0000b"}),
    ):  # fmt: skip
        r = alice.http.request(method, url, json=body)
        assert r.status_code == 400, (url, r.text)
