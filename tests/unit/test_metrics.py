"""ember.metrics: the failure-reason mapping, the timing of operations, the VM-state collector."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ember import metrics
from ember.errors import (
    AgentUnavailable,
    BuildFailed,
    EmberError,
    GuestError,
    GuestProtocolError,
    HostSetupError,
    ImageNotFound,
    InvalidRequest,
    InvalidStateTransition,
    ResourceExhausted,
    SnapshotError,
    StaleSnapshot,
    TokenRefused,
    VmmError,
    VmNotFound,
)
from ember.metrics import Operation, Reason, Scrape, StateCollector, reason_of
from ember.models import VmRecord, VmState
from ember.vmm.machine import Accel, MachineConfig

MACHINE = MachineConfig(Accel.TCG, 256, 1, "vmlinux", "initramfs", "console=ttyS0", "QEMU emulator version 10.0.0")


class TooMany(EmberError):
    """Stands for the tenancy's 429 errors (QuotaExceeded, RateLimited): mapped by their status."""

    http_status = 429


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (AgentUnavailable("no answer"), Reason.AGENT_UNAVAILABLE),
        (TokenRefused("refused"), Reason.AGENT_UNAVAILABLE),
        (GuestProtocolError("short frame"), Reason.AGENT_UNAVAILABLE),
        (GuestError("ENOENT", 2), Reason.GUEST_ERROR),
        (VmmError("qmp"), Reason.VMM_ERROR),
        (SnapshotError("corrupt"), Reason.SNAPSHOT_ERROR),
        (StaleSnapshot("7.2"), Reason.SNAPSHOT_ERROR),
        (BuildFailed("exit 1", "RUN false"), Reason.BUILD_FAILED),
        (ResourceExhausted("disk full"), Reason.RESOURCE_EXHAUSTED),
        (TooMany("quota"), Reason.QUOTA),
        (VmNotFound("vm-1"), Reason.REJECTED),
        (ImageNotFound("x"), Reason.REJECTED),
        (InvalidStateTransition("suspended"), Reason.REJECTED),
        (InvalidRequest("bad"), Reason.REJECTED),
        (TimeoutError(), Reason.TIMEOUT),
        (asyncio.CancelledError(), Reason.CANCELLED),
        (HostSetupError("no qemu"), Reason.OTHER),
        (ValueError("bug"), Reason.OTHER),
    ],
)
def test_failure_reasons(exc: BaseException, reason: Reason) -> None:
    assert reason_of(exc) is reason


def value(name: str, **labels: str) -> float:
    sample = metrics.REGISTRY.get_sample_value(name, labels)
    assert sample is not None, f"no sample {name}{labels}"
    return sample


async def test_timed_counts_successes_and_failures_by_reason() -> None:
    calls: list[str] = []

    @metrics.timed(Operation.SUSPEND)
    async def suspend(vm_id: str, *, fail: BaseException | None = None) -> str:
        calls.append(vm_id)
        await asyncio.sleep(0.01)
        if fail is not None:
            raise fail
        return vm_id.upper()

    ok, bad = value("ember_suspends_total", outcome="succeeded"), value("ember_suspends_total", outcome="failed")
    timed_count, timed_sum = value("ember_suspend_seconds_count"), value("ember_suspend_seconds_sum")
    vmm_failures = value("ember_failures_total", operation="suspend", reason="vmm_error")
    slow_bucket = value("ember_suspend_seconds_bucket", le="0.005")

    assert await suspend("vm-a") == "VM-A"
    with pytest.raises(VmmError):
        await suspend("vm-b", fail=VmmError("migration"))

    assert calls == ["vm-a", "vm-b"]
    assert value("ember_suspends_total", outcome="succeeded") == ok + 1
    assert value("ember_suspends_total", outcome="failed") == bad + 1
    assert value("ember_failures_total", operation="suspend", reason="vmm_error") == vmm_failures + 1
    # only the success is timed, and it took at least the 10 ms it slept
    assert value("ember_suspend_seconds_count") == timed_count + 1
    assert value("ember_suspend_seconds_sum") >= timed_sum + 0.01
    assert value("ember_suspend_seconds_bucket", le="0.005") == slow_bucket
    assert value("ember_suspend_seconds_bucket", le="600.0") == timed_count + 1


def test_builds_and_pool_are_counted() -> None:
    built, failed = value("ember_builds_total", outcome="succeeded"), value("ember_builds_total", outcome="failed")
    step_failures = value("ember_failures_total", operation="build", reason="build_failed")
    hits, misses = value("ember_pool_hits_total"), value("ember_pool_misses_total")

    metrics.build_finished(12.5, error=None)
    metrics.build_finished(3.0, error=BuildFailed("exit 1", "RUN false"))
    metrics.pool_hit()
    metrics.pool_hit()
    metrics.pool_miss()

    assert value("ember_builds_total", outcome="succeeded") == built + 1
    assert value("ember_builds_total", outcome="failed") == failed + 1
    assert value("ember_failures_total", operation="build", reason="build_failed") == step_failures + 1
    assert value("ember_build_seconds_bucket", le="30.0") >= 1
    assert (value("ember_pool_hits_total"), value("ember_pool_misses_total")) == (hits + 2, misses + 1)


def vm(vm_id: str, tenant: str, state: VmState) -> VmRecord:
    return VmRecord(id=vm_id, image="debian", state=state, machine=MACHINE, uid=1, token="t", tenant=tenant)


def scrape(vms: list[VmRecord], accel: Accel) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """The scrape as Prometheus' own parser reads it: {metric: {sorted labels: value}}."""
    text = generate_latest(Scrape(StateCollector(lambda: vms, accel))).decode()
    parsed: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            parsed.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return parsed


def test_collector_counts_vms_per_state_and_tenant_at_scrape_time() -> None:
    vms = [
        vm("vm-1", "default", VmState.RUNNING),
        vm("vm-2", "default", VmState.RUNNING),
        vm("vm-3", "default", VmState.SUSPENDED),
        vm("vm-4", "acme", VmState.RUNNING),
        vm("vm-5", "acme", VmState.FAILED),
        vm("vm-6", "acme", VmState.TERMINATED),  # removed, kept listable: not a VM the daemon holds
    ]
    parsed = scrape(vms, Accel.TCG)
    states = {dict(labels)["state"]: v for labels, v in parsed["ember_vms"].items()}
    assert states == {s.value: 0.0 for s in VmState if s is not VmState.TERMINATED} | {
        "RUNNING": 3.0,
        "SUSPENDED": 1.0,
        "FAILED": 1.0,
    }
    per_tenant = parsed["ember_tenant_vms"]
    assert per_tenant[(("state", "RUNNING"), ("tenant", "acme"))] == 1.0
    assert per_tenant[(("state", "RUNNING"), ("tenant", "default"))] == 2.0
    assert per_tenant[(("state", "SUSPENDED"), ("tenant", "acme"))] == 0.0
    assert len(per_tenant) == 2 * (len(VmState) - 1)
    assert parsed["ember_accelerator"] == {(("name", "tcg"), ("security_boundary", "false")): 1.0}
    # the counters and histograms come with it, every series present before its first event
    assert (("operation", "launch"), ("reason", "quota")) in parsed["ember_failures_total"]
    assert "ember_launch_seconds_bucket" in parsed and "ember_pool_misses_total" in parsed

    vms.pop(0)  # read again at the next scrape
    again = scrape(vms, Accel.KVM)
    assert again["ember_vms"][(("state", "RUNNING"),)] == 2.0
    assert again["ember_accelerator"] == {(("name", "kvm"), ("security_boundary", "true")): 1.0}


def test_no_vms_no_tenant_series() -> None:
    parsed = scrape([], Accel.TCG)
    assert set(parsed["ember_vms"].values()) == {0.0}
    assert "ember_tenant_vms" not in parsed
