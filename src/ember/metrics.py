"""Prometheus metrics: what the daemon did (counters, latency histograms) and what it holds now.

Everything lives in :data:`REGISTRY`, Ember's own registry (never prometheus_client's global
one: nothing another library registers leaks into Ember's scrape). ``GET /metrics``
(:mod:`ember.api.metrics`, admins only) serves it together with a :class:`StateCollector`,
which reads the VM table at scrape time.

Metrics (every label value comes from a closed set: never a VM id or an image name; tenant
names are made by the operator, so their number is bounded too):

- ``ember_vms{state}``, ``ember_tenant_vms{tenant, state}``: live VMs in each :class:`VmState` now
  (removed ones, kept listable for a while as TERMINATED, are not counted).
- ``ember_launches_total{outcome}``, ``ember_suspends_total{outcome}``, ``ember_resumes_total{outcome}``,
  ``ember_builds_total{outcome}``: every attempt, ``outcome`` one of :class:`Outcome`.
- ``ember_launch_seconds``, ``ember_suspend_seconds``, ``ember_resume_seconds``, ``ember_build_seconds``:
  latency histograms of the attempts that succeeded (:data:`BUCKETS_S`, 5 ms to 10 min).
- ``ember_failures_total{operation, reason}``: failed attempts, ``reason`` one of :class:`Reason`
  (see :func:`reason_of`).
- ``ember_pool_hits_total``, ``ember_pool_misses_total``: launches served by a pre-started VMM, or not.
- ``ember_accelerator{name, security_boundary}``: 1 for the accelerator guests run under.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from typing import Any, ParamSpec, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ember.errors import (
    AgentUnavailable,
    BuildFailed,
    Conflict,
    EmberError,
    Forbidden,
    GuestError,
    GuestProtocolError,
    InvalidRequest,
    NotFound,
    ResourceExhausted,
    SnapshotError,
    StaleSnapshot,
    Unauthorized,
    VmmError,
)
from ember.models import VmRecord, VmState
from ember.vmm.machine import Accel

P = ParamSpec("P")
R = TypeVar("R")

# 5 ms (a warm launch under KVM) to 10 min (a large image build)
BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Operation(enum.StrEnum):
    LAUNCH = "launch"
    SUSPEND = "suspend"
    RESUME = "resume"
    BUILD = "build"


class Outcome(enum.StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class Reason(enum.StrEnum):
    """Why an operation failed (the ``reason`` label of ``ember_failures_total``)."""

    AGENT_UNAVAILABLE = "agent_unavailable"  # the guest's agent did not answer, or broke the protocol
    GUEST_ERROR = "guest_error"  # the guest's agent refused or failed a request
    VMM_ERROR = "vmm_error"  # QEMU failed: start, QMP, a migration past its deadline
    SNAPSHOT_ERROR = "snapshot_error"  # a snapshot missing, corrupt, or from another QEMU release
    BUILD_FAILED = "build_failed"  # a build step failed (its command, its Dockerfile, its app)
    QUOTA = "quota"  # a tenant's quota or rate limit (HTTP 429)
    RESOURCE_EXHAUSTED = "resource_exhausted"  # the host's disk or VMM uids ran out
    REJECTED = "rejected"  # the request itself: no such VM or image, wrong state, bad input
    TIMEOUT = "timeout"  # a wait with no answer of Ember's own
    CANCELLED = "cancelled"  # the caller went away, or the daemon stopped
    OTHER = "other"  # anything else: the daemon log has it


def reason_of(exc: BaseException) -> Reason:
    """The :class:`Reason` of an exception an operation raised (most specific class first)."""
    if isinstance(exc, asyncio.CancelledError):
        return Reason.CANCELLED
    if isinstance(exc, AgentUnavailable | GuestProtocolError):
        return Reason.AGENT_UNAVAILABLE
    if isinstance(exc, GuestError):
        return Reason.GUEST_ERROR
    if isinstance(exc, VmmError):
        return Reason.VMM_ERROR
    if isinstance(exc, SnapshotError | StaleSnapshot):
        return Reason.SNAPSHOT_ERROR
    if isinstance(exc, BuildFailed):
        return Reason.BUILD_FAILED
    if isinstance(exc, ResourceExhausted):
        return Reason.RESOURCE_EXHAUSTED
    if isinstance(exc, EmberError) and exc.http_status == 429:  # QuotaExceeded, RateLimited
        return Reason.QUOTA
    if isinstance(exc, NotFound | Conflict | InvalidRequest | Unauthorized | Forbidden):
        return Reason.REJECTED
    if isinstance(exc, TimeoutError):
        return Reason.TIMEOUT
    return Reason.OTHER


REGISTRY = CollectorRegistry()

_PLURAL = {Operation.LAUNCH: "launches", Operation.SUSPEND: "suspends", Operation.RESUME: "resumes",
           Operation.BUILD: "builds"}  # fmt: skip
_TOTALS = {
    op: Counter(
        f"ember_{_PLURAL[op]}", f"{_PLURAL[op].capitalize()} attempted, by outcome", ["outcome"], registry=REGISTRY
    )
    for op in Operation
}
_SECONDS = {
    op: Histogram(f"ember_{op}_seconds", f"Seconds a successful {op} took", buckets=BUCKETS_S, registry=REGISTRY)
    for op in Operation
}
_FAILURES = Counter(
    "ember_failures", "Failed operations, by operation and reason", ["operation", "reason"], registry=REGISTRY
)
_POOL_HITS = Counter("ember_pool_hits", "Launches served by a pre-started VMM", registry=REGISTRY)
_POOL_MISSES = Counter("ember_pool_misses", "Launches that started a VMM of their own", registry=REGISTRY)

for _op in Operation:  # every series exists from the start: rate() sees the first event
    for _outcome in Outcome:
        _TOTALS[_op].labels(_outcome.value)
    for _reason in Reason:
        _FAILURES.labels(_op.value, _reason.value)


def succeeded(op: Operation, seconds: float) -> None:
    _TOTALS[op].labels(Outcome.SUCCEEDED.value).inc()
    _SECONDS[op].observe(seconds)


def failed(op: Operation, exc: BaseException) -> None:
    """An attempt at ``op`` failed with ``exc`` (a refusal before the engine too, e.g. a quota's)."""
    _TOTALS[op].labels(Outcome.FAILED.value).inc()
    _FAILURES.labels(op.value, reason_of(exc).value).inc()


def build_finished(seconds: float, *, error: BaseException | None) -> None:
    """A build ended: in ``seconds`` when it succeeded, else with ``error``."""
    if error is None:
        succeeded(Operation.BUILD, seconds)
    else:
        failed(Operation.BUILD, error)


def pool_hit() -> None:
    _POOL_HITS.inc()


def pool_miss() -> None:
    _POOL_MISSES.inc()


def timed(op: Operation) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Coroutine[Any, Any, R]]]:
    """Count and time every call of an async engine method as ``op``."""

    def wrap(method: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
        @functools.wraps(method)
        async def measured(*args: P.args, **kwargs: P.kwargs) -> R:
            start = time.perf_counter()
            try:
                result = await method(*args, **kwargs)
            except BaseException as exc:
                failed(op, exc)
                raise
            succeeded(op, time.perf_counter() - start)
            return result

        return measured

    return wrap


_LIVE = [state for state in VmState if state is not VmState.TERMINATED]


class StateCollector(Collector):
    """What the daemon holds at scrape time: VMs per state (all, and per tenant), the accelerator."""

    def __init__(self, vms: Callable[[], Iterable[VmRecord]], accel: Accel) -> None:
        self._vms = vms
        self._accel = accel

    def collect(self) -> Iterator[Metric]:
        per_tenant = Tally((vm.tenant, vm.state) for vm in self._vms() if vm.state in _LIVE)
        per_state = Tally[VmState]()
        for (_, state), count in per_tenant.items():
            per_state[state] += count
        total = GaugeMetricFamily("ember_vms", "Live VMs in each state", labels=["state"])
        for state in _LIVE:  # every state, zero included
            total.add_metric([state.value], per_state[state])
        yield total
        tenants = GaugeMetricFamily(
            "ember_tenant_vms", "Live VMs in each state, per tenant", labels=["tenant", "state"]
        )
        for tenant in sorted({tenant for tenant, _ in per_tenant}):
            for state in _LIVE:
                tenants.add_metric([tenant, state.value], per_tenant[(tenant, state)])
        yield tenants
        accel = GaugeMetricFamily(
            "ember_accelerator", "The accelerator guests run under (1)", labels=["name", "security_boundary"]
        )
        accel.add_metric([self._accel.value, str(self._accel.is_security_boundary).lower()], 1)
        yield accel


class Scrape(Collector):
    """One scrape: Ember's counters and histograms, then the daemon's current state."""

    def __init__(self, state: StateCollector) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()
        yield from self._state.collect()
