"""GET /v1/usage on a real daemon: a scripted lifecycle's figures match its times, storage of a
suspended VM and of an image accrues, and a tenant sees its own usage only.

The test daemon samples storage every second (EMBER_USAGE_SAMPLE_S=1, tests/conftest.py)."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from ember.config import Settings
from ember.models import RUNNING_STATES
from ember.usage import GIB, SUSPENDED_STATES, stamp

pytestmark = pytest.mark.vm

Json = dict[str, Any]


@pytest.fixture(scope="module")
def api(settings: Settings, base_image: str) -> Iterator[httpx.Client]:
    """Root on the Unix socket: an admin acting in tenant ``default``."""
    transport = httpx.HTTPTransport(uds=str(settings.socket_path))
    with httpx.Client(transport=transport, base_url="http://ember", timeout=300) as http:
        yield http


def ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json() if response.content else None


def usage(api: httpx.Client, **params: str) -> Json:
    result: Json = ok(api.get("/v1/usage", params=params))
    return result


def of_tenant(report: Json, tenant: str) -> Json:
    rows = [t for t in report["tenants"] if t["tenant"] == tenant]
    return rows[0] if rows else {"snapshot_gib_hours": 0.0, "image_gib_hours": 0.0}


def of_vm(report: Json, vm_id: str) -> Json:
    (row,) = [v for v in report["vms"] if v["vm_id"] == vm_id]
    return dict(row)


def from_events(events: list[Json], until: datetime) -> tuple[float, float]:
    """(running, suspended) seconds up to ``until``, straight from the VM's event log."""
    events = sorted(events, key=lambda e: e["id"])
    running = suspended = 0.0
    for event, nxt in zip(events, [*events[1:], None], strict=True):
        start = datetime.fromisoformat(event["at"])
        end = min(until, datetime.fromisoformat(nxt["at"])) if nxt else until
        seconds = max(0.0, (end - start).total_seconds())
        running += seconds if event["to_state"] in RUNNING_STATES else 0
        suspended += seconds if event["to_state"] in SUSPENDED_STATES else 0
    return running, suspended


def allocated_bytes(directory: Path) -> int:
    return sum(os.lstat(p).st_blocks * 512 for p in directory.iterdir() if p.is_file() and not p.is_symlink())


def timed(call: Any) -> tuple[float, float, Any]:
    start = time.monotonic()
    result = call()
    return start, time.monotonic(), result


def suspended_vms(api: httpx.Client) -> list[str]:
    return [vm["id"] for vm in ok(api.get("/v1/vms", params={"state": "SUSPENDED"}))]


def test_usage_matches_a_scripted_lifecycle(api: httpx.Client, settings: Settings, base_image: str) -> None:
    since = datetime.now(UTC) - timedelta(seconds=1)
    hour = since.replace(minute=0, second=0, microsecond=0)  # storage is counted in whole hours
    assert suspended_vms(api) == [], "another test left a suspended VM: its storage would blur this one's"
    run0, run1, vm = timed(lambda: ok(api.post("/v1/vms", json={"image": base_image}), 201))
    vm_id, vcpus, gib = vm["id"], vm["vcpus"], vm["memory_mib"] / 1024
    try:
        time.sleep(2)
        stored0 = of_tenant(usage(api, since=stamp(hour)), "default")
        s0, s1, _ = timed(lambda: ok(api.post(f"/v1/vms/{vm_id}/suspend")))
        snapshot = allocated_bytes(settings.vms_dir / vm_id / "suspend")
        assert snapshot > 0
        time.sleep(1.5)
        mid_suspension = datetime.now(UTC)
        time.sleep(1.5)
        r0, r1, _ = timed(lambda: ok(api.post(f"/v1/vms/{vm_id}/resume")))
        stored1 = of_tenant(usage(api, since=stamp(hour)), "default")
        time.sleep(2)
    finally:
        d0, d1, _ = timed(lambda: ok(api.delete(f"/v1/vms/{vm_id}"), 204))
    until = datetime.now(UTC)
    report = usage(api, since=stamp(since), until=stamp(until))
    assert report["since"] == stamp(since) and report["until"] == stamp(until)
    row = of_vm(report, vm_id)
    assert row["tenant"] == "default"

    # Measured on the client: running from the run request (PENDING) until the suspend saved the
    # VM (SUSPENDING bills as running), and from the resume request (RESUMING) until the removal;
    # suspended in between. Each bound holds whatever each request's latency was.
    running_lo, running_hi = (s0 - run1) + (d0 - r1), (s1 - run0) + (d1 - r0)
    suspended_lo, suspended_hi = r0 - s1, r1 - s0
    running = row["running_vcpu_seconds"] / vcpus
    assert running_lo - 0.05 <= running <= running_hi + 0.05, (running_lo, running, running_hi)
    assert suspended_lo - 0.05 <= row["suspended_seconds"] <= suspended_hi + 0.05
    assert row["running_gib_seconds"] == pytest.approx(running * gib, rel=1e-9)

    # ... and exactly what the VM's own event log says (to the millisecond the events carry)
    events = ok(api.get(f"/v1/vms/{vm_id}/events"))
    assert [e["to_state"] for e in events] == [
        "PENDING", "RUNNING", "SUSPENDING", "SUSPENDED", "RESUMING", "RUNNING", "TERMINATING", "TERMINATED",
    ]  # fmt: skip
    logged_running, logged_suspended = from_events(events, until)
    assert abs(row["running_vcpu_seconds"] - logged_running * vcpus) <= 0.01 * vcpus
    assert abs(row["suspended_seconds"] - logged_suspended) <= 0.01

    # A window that ends while the VM was suspended: the suspension is cut there.
    clipped = of_vm(usage(api, since=stamp(since), until=stamp(mid_suspension)), vm_id)
    logged_running, logged_suspended = from_events(events, mid_suspension)
    assert abs(clipped["running_vcpu_seconds"] - logged_running * vcpus) <= 0.01 * vcpus
    assert abs(clipped["suspended_seconds"] - logged_suspended) <= 0.01
    assert clipped["suspended_seconds"] < row["suspended_seconds"] - 1
    # one that starts after the removal bills the VM nothing
    assert vm_id not in [v["vm_id"] for v in usage(api, since=stamp(until))["vms"]]

    # Snapshot storage: the saved state's allocated bytes for each second it was suspended, give or
    # take one sample (1 s) at each end.
    billed = (stored1["snapshot_gib_hours"] - stored0["snapshot_gib_hours"]) * GIB * 3600
    assert snapshot * (suspended_lo - 1.5) <= billed <= snapshot * (suspended_hi + 1.5), billed / snapshot


def test_image_storage_accrues_while_the_image_exists(api: httpx.Client, base_image: str) -> None:
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    vm_id = ok(api.post("/v1/vms", json={"image": base_image}), 201)["id"]
    try:
        image = ok(api.post(f"/v1/vms/{vm_id}/snapshot", json={"name": "usage-fork"}), 201)
    finally:
        ok(api.delete(f"/v1/vms/{vm_id}"), 204)
    try:
        # every image of the tenant is billed each second (built-in bases are nobody's)
        size = sum(
            i.get("disk_bytes", 0) + i.get("memory_bytes", 0) for i in ok(api.get("/v1/images")) if not i.get("builtin")
        )
        assert size >= image["disk_bytes"] + image["memory_bytes"] > 0
        before = of_tenant(usage(api, since=stamp(hour)), "default")["image_gib_hours"]
        start = time.monotonic()
        time.sleep(3)
        after = of_tenant(usage(api, since=stamp(hour)), "default")["image_gib_hours"]
        held = time.monotonic() - start
    finally:
        ok(api.delete("/v1/images/usage-fork"), 204)
    billed = (after - before) * GIB * 3600
    assert size * (held - 1.5) <= billed <= size * (held + 1.5), (billed / size, held)
    assert of_tenant(usage(api, since=stamp(hour)), "")["image_gib_hours"] == 0  # built-in bases are nobody's


def test_a_tenant_sees_its_own_usage_only(api: httpx.Client, settings: Settings, base_image: str) -> None:
    ok(api.post("/v1/tenants", json={"name": "usage-t1"}), 201)
    key = ok(api.post("/v1/keys", json={"tenant": "usage-t1"}), 201)["api_key"]
    transport = httpx.HTTPTransport(uds=str(settings.socket_path))
    headers = {"Authorization": f"Bearer {key}"}
    vm_id = ok(api.post("/v1/vms", json={"image": base_image}), 201)["id"]
    ok(api.delete(f"/v1/vms/{vm_id}"), 204)
    assert vm_id in [v["vm_id"] for v in usage(api)["vms"]]  # the admin sees tenant default's VM
    with httpx.Client(transport=transport, base_url="http://ember", headers=headers, timeout=60) as tenant:
        own = ok(tenant.get("/v1/usage"))
        assert own["vms"] == [] and all(t["tenant"] == "usage-t1" for t in own["tenants"])
        assert ok(tenant.get("/v1/usage", params={"tenant": "usage-t1"}))["vms"] == []
        refused = tenant.get("/v1/usage", params={"tenant": "default"})
        assert refused.status_code == 403, refused.text
        assert "sees only its own usage" in refused.json()["message"]
    # an admin narrows to one tenant, which must exist
    assert {t["tenant"] for t in usage(api, tenant="default")["tenants"]} == {"default"}
    missing = api.get("/v1/usage", params={"tenant": "no-such-tenant"})
    assert missing.status_code == 404 and missing.json()["error"] == "TenantNotFound"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"since": "last tuesday"}, "since='last tuesday' is not an ISO-8601 time"),
        ({"until": "2024-02-30"}, "until='2024-02-30' is not an ISO-8601 time"),
        ({"since": "2024-05-02", "until": "2024-05-01"}, "is after until"),
        ({"since": "x" * 65}, "since"),
    ],
)
def test_bad_windows_are_refused(api: httpx.Client, params: dict[str, str], message: str) -> None:
    response = api.get("/v1/usage", params=params)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "InvalidRequest" and message in response.json()["message"]


def test_the_default_window_is_this_month(api: httpx.Client) -> None:
    report = usage(api)
    now = datetime.now(UTC)
    assert datetime.fromisoformat(report["since"]) == now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    assert abs((datetime.fromisoformat(report["until"]) - now).total_seconds()) < 30


def build_failing(api: httpx.Client, name: str) -> Json:
    """A build whose RUN step fails, through the API: its final build record."""
    dockerfile = b"FROM ember:debian-python3\nRUN echo usage && exit 3\n"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(dockerfile)
        tar.addfile(info, io.BytesIO(dockerfile))
    headers = {"Content-Type": "application/x-tar"}
    record: Json = {}
    with api.stream("POST", "/v1/images/build", params={"name": name}, content=buf.getvalue(), headers=headers) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            record = json.loads(line).get("build", record)
    return record


def test_builds_are_counted_with_their_seconds(api: httpx.Client) -> None:
    since = datetime.now(UTC)
    before = of_tenant(usage(api, since=stamp(since)), "default")
    start = time.monotonic()
    result = build_failing(api, "usage-build")
    took = time.monotonic() - start
    assert result["state"] == "CREATE_FAILED"  # a failed build is a build too
    after = of_tenant(usage(api, since=stamp(since)), "default")
    assert after["builds"] == before.get("builds", 0) + 1
    counted = after["build_seconds"] - before.get("build_seconds", 0)
    assert counted == pytest.approx(result["build_seconds"], abs=0.01) and 0 < counted <= took
    assert of_tenant(usage(api, since=stamp(datetime.now(UTC))), "default").get("builds", 0) == 0  # after it
