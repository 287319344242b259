"""Usage a provider can bill from: VM time from the event log, storage from periodic samples, builds.

**VM time.** Every VM state change is an event (``events``: ``at``, ``to_state``). A VM is billed
from the moment an event puts it into a state until the next event of that VM moves it out:

- *running* (billed ``vcpus`` vCPU-seconds and ``memory_mib / 1024`` GiB-seconds per second) in
  ``PENDING``, ``RUNNING``, ``SUSPENDING`` and ``RESUMING`` (:data:`ember.models.RUNNING_STATES`):
  every state in which a VMM holds (or is taking) the VM's vCPUs and guest memory on the host, so
  launching, saving and restoring are billed like running, as AWS Lambda bills its MicroVMs'
  running time. The same set counts against the running quotas.
- *suspended* (billed seconds) in ``SUSPENDED``: no VMM, only the saved state on disk (which is
  also billed as snapshot storage, below).
- nothing in ``TERMINATING``, ``TERMINATED`` and ``FAILED`` (no VMM runs the guest for the tenant).

Intervals are clipped to the window ``[since, until)``; the state a VM was in at ``since`` is its
last event before ``since``, and the interval of its latest event is open: it runs to ``until``.
Events are ordered by their time, then by their id (the order they were written), whatever order
they are given in. vCPUs and memory come from the VM's record (its machine config), which stays
after TERMINATED. GiB = 1024³ bytes.

**Storage.** :class:`StorageSampler` runs in the daemon (a chore) every ``usage_sample_s`` seconds and adds,
per tenant and UTC hour (``storage_usage``), the bytes it measured multiplied by the seconds since
its previous sample (at most twice the interval: a stalled or stopped daemon does not bill the gap
on the word of one measurement):

- image bytes: every image the tenant owns, its disk and memory bytes as the store records them
  (built-in bases belong to no tenant and are not billed);
- snapshot bytes: the allocated blocks (``st_blocks * 512``: holes are free) of the regular files
  in each SUSPENDED VM's saved state (``vms/<id>/suspend``), found fd-relative from the root-only
  VM directory, never following a symlink, and only files root owns (a suspended VM's files are
  handed to root; nothing else is the daemon's).

GiB-hours = byte-seconds / 1024³ / 3600. A window's storage is the sum over the hours that overlap
it: the hour is storage's granularity (a month's window is whole hours).

**Builds.** Each build counts once, in the window its ``created_at`` falls into, with its
``seconds`` (a build still running counts its time so far, up to ``until``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from ember.config import Settings
from ember.db import usage as db
from ember.errors import InvalidRequest
from ember.models import RUNNING_STATES, BuildState, VmState
from ember.vmm.machine import MachineConfig

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from ember.db.store import Store

log = logging.getLogger(__name__)

GIB = 1024**3
HOUR_S = 3600
SUSPENDED_STATES = frozenset({VmState.SUSPENDED})


@dataclass(frozen=True)
class Window:
    """The half-open interval ``[since, until)`` usage is reported for (aware UTC datetimes)."""

    since: datetime
    until: datetime

    def clip(self, start: datetime, end: datetime) -> float:
        """Seconds of ``[start, end)`` inside the window."""
        return max(0.0, (min(end, self.until) - max(start, self.since)).total_seconds())


@dataclass(frozen=True)
class StateEvent:
    """One VM state change, as much of an ``events`` row as usage needs."""

    vm_id: str
    at: datetime
    to_state: str
    id: int = 0


@dataclass(frozen=True)
class VmSize:
    """What one second of running costs a VM: its tenant, vCPUs and guest memory."""

    tenant: str
    vcpus: int
    memory_mib: int

    @property
    def memory_gib(self) -> float:
        return self.memory_mib * 1024**2 / GIB


@dataclass(frozen=True)
class VmUsage:
    vm_id: str
    tenant: str
    running_seconds: float
    running_vcpu_seconds: float
    running_gib_seconds: float
    suspended_seconds: float


@dataclass(frozen=True)
class StorageTotals:
    """One tenant's storage in a window, in byte-seconds (a sum of ``storage_usage`` rows)."""

    image_byte_seconds: float = 0.0
    snapshot_byte_seconds: float = 0.0


@dataclass(frozen=True)
class BuildTotals:
    builds: int = 0
    build_seconds: float = 0.0


@dataclass(frozen=True)
class TenantUsage:
    tenant: str
    running_vcpu_seconds: float
    running_gib_seconds: float
    suspended_seconds: float
    snapshot_gib_hours: float
    image_gib_hours: float
    builds: int
    build_seconds: float


@dataclass(frozen=True)
class BuildRun:
    """One build, as much of a ``builds`` row as usage needs."""

    tenant: str
    created_at: datetime
    finished_at: datetime | None  # None: still building
    seconds: float  # as the build service measured it; 0 for a build a daemon restart cut short


def gib_hours(byte_seconds: float) -> float:
    return byte_seconds / GIB / HOUR_S


def vm_usage(events: Iterable[StateEvent], sizes: Mapping[str, VmSize], window: Window) -> list[VmUsage]:
    """Each VM's running and suspended time in ``window``, from its state changes (any order).

    ``events`` must hold, for each VM, its last event before ``window.since`` (the state it was in
    then) and all its events inside the window; earlier ones change nothing. A VM not in ``sizes``
    is left out (its record was purged). VMs with no billed time are left out."""
    by_vm: dict[str, list[StateEvent]] = defaultdict(list)
    for event in events:
        by_vm[event.vm_id].append(event)
    usage = []
    for vm_id, timeline in sorted(by_vm.items()):
        size = sizes.get(vm_id)
        if size is None:
            continue
        timeline.sort(key=lambda e: (e.at, e.id))
        running = suspended = 0.0
        for event, nxt in zip(timeline, [*timeline[1:], None], strict=True):
            seconds = window.clip(event.at, window.until if nxt is None else nxt.at)
            if event.to_state in RUNNING_STATES:
                running += seconds
            elif event.to_state in SUSPENDED_STATES:
                suspended += seconds
        if running or suspended:
            usage.append(
                VmUsage(vm_id, size.tenant, running, running * size.vcpus, running * size.memory_gib, suspended)
            )
    return usage


def tenant_usage(
    vms: Iterable[VmUsage], storage: Mapping[str, StorageTotals], builds: Mapping[str, BuildTotals]
) -> list[TenantUsage]:
    """Per-tenant totals, sorted by tenant: every tenant with any VM, storage or build figure."""
    vcpu: dict[str, float] = defaultdict(float)
    gib: dict[str, float] = defaultdict(float)
    susp: dict[str, float] = defaultdict(float)
    for vm in vms:
        vcpu[vm.tenant] += vm.running_vcpu_seconds
        gib[vm.tenant] += vm.running_gib_seconds
        susp[vm.tenant] += vm.suspended_seconds
    totals = []
    for tenant in sorted({*vcpu, *storage, *builds}):
        st, bt = storage.get(tenant, StorageTotals()), builds.get(tenant, BuildTotals())
        snap, image = gib_hours(st.snapshot_byte_seconds), gib_hours(st.image_byte_seconds)
        totals.append(
            TenantUsage(tenant, vcpu[tenant], gib[tenant], susp[tenant], snap, image, bt.builds, bt.build_seconds)
        )
    return totals


def build_totals(runs: Iterable[BuildRun], window: Window) -> dict[str, BuildTotals]:
    """Builds per tenant that started in ``window``, and their seconds: as measured, else (a build cut
    short, or still running) the time from its start to its end (or to ``until``)."""
    count: dict[str, int] = defaultdict(int)
    seconds: dict[str, float] = defaultdict(float)
    for run in runs:
        if not window.since <= run.created_at < window.until:
            continue
        count[run.tenant] += 1
        if run.finished_at is not None and run.seconds > 0:
            seconds[run.tenant] += run.seconds
        else:
            seconds[run.tenant] += max(0.0, ((run.finished_at or window.until) - run.created_at).total_seconds())
    return {tenant: BuildTotals(n, seconds[tenant]) for tenant, n in count.items()}


# ---- times ----------------------------------------------------------------


def parse_time(raw: str, what: str) -> datetime:
    """An ISO-8601 time from a client (a date, or a date and time; no offset means UTC), as aware UTC."""
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        raise InvalidRequest(
            f"{what}={raw[:64]!r} is not an ISO-8601 time: give e.g. 2024-05-01 or 2024-05-01T12:00:00Z"
        ) from None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # within a day of the calendar's ends (0001-01-01T00:00+05:00): clamp there
        return (datetime.min if parsed.year == 1 else datetime.max).replace(tzinfo=UTC)


def month_start(t: datetime) -> datetime:
    return t.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def window_of(since: str | None, until: str | None, now: datetime) -> Window:
    """The window a request asks for: ``until`` defaults to (and never passes) ``now``, ``since`` to
    the start of the current month (UTC). An ``until`` in the future means now: usage not yet
    incurred is not reported."""
    end = min(parse_time(until, "until"), now) if until else now
    start = parse_time(since, "since") if since else month_start(now)
    if start > end:
        raise InvalidRequest(
            f"since ({start.isoformat()}) is after until ({end.isoformat()}): give a since at or before until"
        )
    return Window(start, end)


def stamp(t: datetime) -> str:
    """``t`` in the database's timestamp format (ember.models.utcnow): comparable as strings."""
    return t.astimezone(UTC).isoformat(timespec="milliseconds")


def hour_bucket(t: datetime) -> str:
    """``YYYY-MM-DDTHH`` (UTC); the year always has four digits (strftime's %Y drops them before 1000), so
    buckets compare as strings."""
    return t.astimezone(UTC).isoformat(timespec="hours")[:13]


def hours_of(window: Window) -> tuple[str, str] | None:
    """The first and last hour buckets that overlap ``window`` (None for an empty window)."""
    if window.until <= window.since:
        return None
    return hour_bucket(window.since), hour_bucket(window.until - timedelta(microseconds=1))


def split_by_hour(start: datetime, end: datetime) -> list[tuple[str, float]]:
    """``[start, end)`` as (hour bucket, seconds in it), in order."""
    parts = []
    while start < end:
        boundary = start.astimezone(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
        cut = min(boundary, end)
        parts.append((hour_bucket(start), (cut - start).total_seconds()))
        start = cut
    return parts


def billable_seconds(elapsed: float, interval: float) -> float:
    """Seconds one storage sample stands for: the time since the previous one, at most two intervals."""
    return min(max(elapsed, 0.0), 2 * interval)


@dataclass(frozen=True)
class Report:
    window: Window
    tenants: list[TenantUsage]
    vms: list[VmUsage]


def report(engine: Engine, window: Window, tenant: str | None) -> Report:
    """Usage in ``window`` per tenant and per VM, of ``tenant`` or of all (None). Blocking."""
    since, until = stamp(window.since), stamp(window.until)
    timeline = [
        StateEvent(vm, datetime.fromisoformat(at), to, id_)
        for id_, vm, at, to in db.vm_events(engine, since, until, tenant)
    ]
    sizes = {}
    for vm_id, (owner, machine) in db.vm_machines(engine, {e.vm_id for e in timeline}).items():
        m = MachineConfig.from_json(machine)
        sizes[vm_id] = VmSize(owner, m.vcpus, m.memory_mib)
    per_vm = vm_usage(timeline, sizes, window)
    runs = [
        BuildRun(owner, datetime.fromisoformat(created),
                 datetime.fromisoformat(finished) if finished and state != BuildState.BUILDING else None, seconds)
        for owner, created, finished, seconds, state in db.build_rows(engine, since, until, tenant)
    ]  # fmt: skip
    hours = hours_of(window)
    sums = db.storage_sums(engine, *hours, tenant) if hours else {}
    storage = {t: StorageTotals(image, snap) for t, (image, snap) in sums.items()}
    return Report(window, tenant_usage(per_vm, storage, build_totals(runs, window)), per_vm)


# ---- storage --------------------------------------------------------------


def snapshot_bytes(vms_fd: int, vm_id: str) -> int:
    """Allocated bytes of the root-owned regular files in VM ``vm_id``'s saved state, found from
    ``vms_fd`` (the VM directory's root: root-only) without following a symlink anywhere. 0 when
    it has none (resumed or removed meanwhile)."""
    if "/" in vm_id or vm_id in ("", ".", ".."):
        return 0
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        vm_fd = os.open(vm_id, flags, dir_fd=vms_fd)
    except OSError:  # gone, or not a directory (a symlink is refused: ELOOP)
        return 0
    try:
        snap_fd = os.open("suspend", flags, dir_fd=vm_fd)
    except OSError:
        return 0
    finally:
        os.close(vm_fd)
    total = 0
    try:
        for name in os.listdir(snap_fd):
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(name, dir_fd=snap_fd, follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and st.st_uid == 0:
                    total += st.st_blocks * 512
    finally:
        os.close(snap_fd)
    return total


@dataclass(frozen=True)
class StorageSample:
    """Bytes per tenant at one moment."""

    image_bytes: Mapping[str, int]
    snapshot_bytes: Mapping[str, int]


def measure(settings: Settings, store: Store) -> StorageSample:
    """Image bytes per tenant from the store; snapshot bytes of each SUSPENDED VM from its files.
    Blocking."""
    images = db.image_bytes(store.engine)
    snapshots: dict[str, int] = defaultdict(int)
    suspended = db.suspended_vms(store.engine)
    if suspended:
        vms_fd = os.open(settings.vms_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            for vm_id, tenant in suspended:
                snapshots[tenant] += snapshot_bytes(vms_fd, vm_id)
        finally:
            os.close(vms_fd)
    return StorageSample(images, dict(snapshots))


class StorageSampler:
    """Adds every tenant's image and snapshot bytes x seconds into ``storage_usage`` every
    ``usage_sample_s``: :meth:`run` is a daemon chore (``Engine.spawn_chore``), cancelled when it stops."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store

    async def run(self) -> None:
        interval = self.settings.usage_sample_s
        previous = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            seconds, previous = billable_seconds(now - previous, interval), now
            try:
                await asyncio.to_thread(self.sample, seconds, datetime.now(UTC))
            except Exception:  # a busy or full database: the next sample bills its own time only
                log.exception("storage usage sample failed; the next one is in %s s", interval)

    def sample(self, seconds: float, now: datetime) -> None:
        """Measure now and bill ``seconds`` of it, ending at ``now``, into the hours they fall in. Blocking."""
        measured = measure(self.settings, self.store)
        rows = storage_rows(measured, now - timedelta(seconds=seconds), now)
        if rows:
            db.add_storage(self.store.engine, rows)


def storage_rows(sample: StorageSample, start: datetime, end: datetime) -> list[tuple[str, str, float, float]]:
    """``(tenant, hour, image_byte_seconds, snapshot_byte_seconds)`` for ``sample`` held over
    ``[start, end)``; tenants with nothing stored get no row."""
    rows = []
    for tenant in sorted({*sample.image_bytes, *sample.snapshot_bytes}):
        image, snap = sample.image_bytes.get(tenant, 0), sample.snapshot_bytes.get(tenant, 0)
        if image or snap:
            rows += [(tenant, hour, image * s, snap * s) for hour, s in split_by_hour(start, end)]
    return rows
