"""GET /metrics on a real daemon: Prometheus' parser reads it, and a VM's lifecycle moves it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from ember.config import Settings
from ember.sdk import ApiError, Client, Request
from tests.conftest import DaemonProcess, build, remove_quietly

pytestmark = pytest.mark.vm

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def get_metrics(settings: Settings, headers: dict[str, str] | None = None) -> httpx.Response:
    transport = httpx.HTTPTransport(uds=str(settings.socket_path))
    with httpx.Client(transport=transport, base_url="http://ember", timeout=30, headers=headers) as http:
        return http.get("/metrics")


def scrape(settings: Settings) -> Samples:
    """Root's scrape over the Unix socket, as Prometheus' own parser reads it."""
    response = get_metrics(settings)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return get(after, name, **labels) - get(before, name, **labels)


@pytest.fixture
def vms(client: Client, base_image: str) -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    for vm_id in made:
        remove_quietly(client, vm_id)


def test_lifecycle_moves_counters_histograms_and_states(
    client: Client, settings: Settings, vms: list[str], base_image: str
) -> None:
    start = scrape(settings)
    accelerators = {labels: v for (name, labels), v in start.items() if name == "ember_accelerator"}
    assert accelerators in (
        {(("name", "tcg"), ("security_boundary", "false")): 1.0},
        {(("name", "kvm"), ("security_boundary", "true")): 1.0},
    )

    vm_id = client.vms.run(base_image).id
    vms.append(vm_id)
    launched = scrape(settings)
    assert moved(start, launched, "ember_launches_total", outcome="succeeded") == 1
    assert moved(start, launched, "ember_launch_seconds_count") == 1
    assert moved(start, launched, "ember_launch_seconds_sum") > 0
    assert moved(start, launched, "ember_vms", state="RUNNING") == 1
    assert get(launched, "ember_tenant_vms", tenant="default", state="RUNNING") >= 1
    assert moved(start, launched, "ember_pool_hits_total") + moved(start, launched, "ember_pool_misses_total") == 1

    client.send(Request("POST", f"/v1/vms/{vm_id}/suspend"))
    suspended = scrape(settings)
    assert moved(launched, suspended, "ember_suspends_total", outcome="succeeded") == 1
    assert moved(launched, suspended, "ember_suspend_seconds_count") == 1
    assert moved(launched, suspended, "ember_vms", state="RUNNING") == -1
    assert moved(launched, suspended, "ember_vms", state="SUSPENDED") == 1

    client.send(Request("POST", f"/v1/vms/{vm_id}/resume"))
    with pytest.raises(ApiError) as refused:  # resuming a running VM: a failure, by reason
        client.send(Request("POST", f"/v1/vms/{vm_id}/resume"))
    assert refused.value.status == 409
    resumed = scrape(settings)
    assert moved(suspended, resumed, "ember_resumes_total", outcome="succeeded") == 1
    assert moved(suspended, resumed, "ember_resumes_total", outcome="failed") == 1
    assert moved(suspended, resumed, "ember_failures_total", operation="resume", reason="rejected") == 1
    assert moved(suspended, resumed, "ember_resume_seconds_count") == 1
    assert moved(suspended, resumed, "ember_vms", state="RUNNING") == 1
    assert moved(suspended, resumed, "ember_vms", state="SUSPENDED") == -1

    client.send(Request("DELETE", f"/v1/vms/{vm_id}"))
    removed = scrape(settings)
    assert moved(start, removed, "ember_vms", state="RUNNING") == 0
    assert moved(start, removed, "ember_vms", state="SUSPENDED") == 0


def prestarts(daemon: DaemonProcess) -> int:
    return daemon.log.read_text(errors="replace").count("pre-started for the pool of debian")


def test_a_launch_from_the_pool_is_a_hit(
    client: Client, daemon: DaemonProcess, settings: Settings, vms: list[str], base_image: str
) -> None:
    vms.append(client.vms.run(base_image).id)
    # the refill that launch started: once one pre-start finishes after it, an entry waits
    seen = prestarts(daemon)
    deadline = time.monotonic() + 120
    while prestarts(daemon) <= seen:
        assert time.monotonic() < deadline, "the pool did not refill"
        time.sleep(0.2)
    before = scrape(settings)
    vms.append(client.vms.run(base_image).id)
    after = scrape(settings)
    assert moved(before, after, "ember_pool_hits_total") == 1
    assert moved(before, after, "ember_pool_misses_total") == 0
    assert moved(before, after, "ember_launches_total", outcome="succeeded") == 1


def test_builds_by_outcome(client: Client, settings: Settings, tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    before = scrape(settings)
    (ctx / "Dockerfile").write_text("FROM ember:debian-python3\nRUN echo built > /built\n")
    result, logs = build(client, ctx, "metered")
    assert result["state"] == "CREATED", logs[-5:]
    (ctx / "Dockerfile").write_text("FROM ember:debian-python3\nRUN exit 7\n")
    result, logs = build(client, ctx, "metered-broken")
    assert result["state"] == "CREATE_FAILED", logs[-5:]
    after = scrape(settings)
    assert moved(before, after, "ember_builds_total", outcome="succeeded") == 1
    assert moved(before, after, "ember_builds_total", outcome="failed") == 1
    assert moved(before, after, "ember_failures_total", operation="build", reason="build_failed") == 1
    assert moved(before, after, "ember_build_seconds_count") == 1
    assert moved(before, after, "ember_build_seconds_sum") > 0
    for name in ("metered", "metered-broken"):
        client.send(Request("DELETE", f"/v1/images/{name}", {"all": "true"}))


def test_only_admins_scrape(client: Client, settings: Settings) -> None:
    client.send(Request("POST", "/v1/tenants", json={"name": "metrics-reader"}))
    key = client.send(Request("POST", "/v1/keys", json={"tenant": "metrics-reader"}))["api_key"]
    refused = get_metrics(settings, {"Authorization": f"Bearer {key}"})
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"] == "Forbidden" and "ember_" not in refused.text
