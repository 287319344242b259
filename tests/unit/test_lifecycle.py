"""Idle policy and lifetime (ember.lifecycle): the pure decisions, activity holds, single-flight wake, the run
request's bounds and the guest's idle answer on a fake, hostile agent channel."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from ember.agent import IDLE_STATE_MAX, GuestIdleState
from ember.api.vms import RunBody, idle_policy
from ember.config import Settings
from ember.errors import AgentUnavailable, GuestProtocolError, InvalidRequest, InvalidStateTransition, QuotaExceeded
from ember.guest.protocol import Frame, Msg, Tag, encode_fields, encode_frame
from ember.lifecycle.activity import Activity
from ember.lifecycle.policy import (
    CpuSample,
    IdleAction,
    cpu_busy,
    idle_action,
    idle_seconds,
    lifetime_end,
    lived_seconds,
)
from ember.lifecycle.scheduler import TICKS_PER_S, Scheduler, stat_cpu_seconds, vmm_cpu
from ember.lifecycle.wake import Waker
from ember.models import IdlePolicy, StateReason, VmRecord, VmState
from ember.vmm.machine import Accel, MachineConfig
from tests.unit.test_agent_channel import Agents, FakeAgent, agents, send  # noqa: F401

T0 = datetime(2026, 1, 1, tzinfo=UTC)
MACHINE = MachineConfig(Accel.TCG, 256, 1, "/k", "/i", "", "QEMU 10")


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def stamp(seconds: float) -> str:
    return at(seconds).isoformat(timespec="milliseconds")


def vm(state: VmState = VmState.RUNNING, **idle: object) -> VmRecord:
    return VmRecord(
        id="vm-1", image="debian", state=state, machine=MACHINE, uid=1, token="t",
        created_at=stamp(0), idle=IdlePolicy(**idle),  # type: ignore[arg-type]
    )  # fmt: skip


# ---- policy ------------------------------------------------------------------------------------------


def test_cpu_over_the_threshold_is_busy_and_doubt_is_busy_too() -> None:
    assert not cpu_busy(CpuSample(0, 1.0), CpuSample(10, 1.2), 0.05)  # 2% of a core
    assert cpu_busy(CpuSample(0, 1.0), CpuSample(10, 2.0), 0.05)  # 10%
    assert cpu_busy(CpuSample(0, 5.0), CpuSample(10, 1.0), 0.05)  # went backwards: another process
    assert cpu_busy(CpuSample(10, 1.0), CpuSample(10, 1.0), 0.05)  # no time between


def test_max_duration_counts_suspended_time_unless_running_only() -> None:
    suspended = replace(vm(VmState.SUSPENDED, max_duration_s=100), suspended_at=stamp(50), suspended_s=20)
    assert lifetime_end(suspended, at(99)) is None
    assert lifetime_end(suspended, at(100)) is StateReason.MAX_DURATION
    only = replace(suspended, idle=IdlePolicy(max_duration_s=100, max_duration_running_only=True))
    assert lived_seconds(only, at(1000)) == 50 - 20  # running 0-50 less 20 s suspended earlier; frozen since
    assert lifetime_end(only, at(10_000)) is None
    running = replace(only, state=VmState.RUNNING, suspended_at="", suspended_s=40)
    assert lifetime_end(running, at(139)) is None
    assert lifetime_end(running, at(140)) is StateReason.MAX_DURATION


def test_suspended_ttl_ends_only_suspended_vms_and_in_flight_states_wait() -> None:
    record = replace(vm(VmState.SUSPENDED, suspended_ttl_s=30), suspended_at=stamp(100))
    assert lifetime_end(record, at(129.9)) is None
    assert lifetime_end(record, at(130)) is StateReason.SUSPENDED_TTL
    assert lifetime_end(replace(record, state=VmState.RUNNING), at(500)) is None
    expired = vm(VmState.SUSPENDING, max_duration_s=1)
    assert lifetime_end(expired, at(500)) is None  # in flight: next pass
    assert lifetime_end(replace(expired, state=VmState.FAILED), at(500)) is StateReason.MAX_DURATION
    assert lifetime_end(vm(VmState.SUSPENDED), at(10**9)) is None  # no limits


def test_idle_needs_the_whole_timeout_since_the_last_sign_of_life() -> None:
    assert idle_seconds(now=100, running_since=10, last_active=40, last_busy=70) == 30
    policy = IdlePolicy(idle_timeout_s=30)
    assert idle_action(policy, 29.9, suspend_asked=False) is None
    assert idle_action(policy, 30, suspend_asked=False) is IdleAction.SUSPEND
    assert idle_action(policy, 0, suspend_asked=True) is IdleAction.SUSPEND  # ember-idle suspend
    assert idle_action(replace(policy, suspended_ttl_s=0), 30, suspend_asked=False) is IdleAction.TERMINATE
    assert idle_action(IdlePolicy(), 10**9, suspend_asked=True) is None  # no idle timeout: never


def test_suspended_spans_are_kept_on_the_record() -> None:
    record = vm(VmState.SUSPENDING)
    suspended = record.moved(VmState.SUSPENDED, StateReason.IDLE)
    assert suspended.suspended_at and suspended.suspended_s == 0
    again = suspended.moved(VmState.SUSPENDED, StateReason.RESUME_FAILED)
    assert again.suspended_at == suspended.suspended_at  # the same span
    resuming = replace(again, suspended_at=stamp(0)).moved(VmState.RESUMING, StateReason.AUTO_RESUME)
    assert resuming.suspended_at == "" and resuming.suspended_s > 86400  # since 2026-01-01


def test_cpu_seconds_are_read_after_the_vmms_own_command_name() -> None:
    fields = ["S"] + ["0"] * 10 + [str(3 * TICKS_PER_S), str(2 * TICKS_PER_S)] + ["0"] * 30
    hostile = b"42 (qemu) 9 9 9 9 9 9 9 9 9 9 9 9) " + " ".join(fields).encode()
    assert stat_cpu_seconds(hostile) == 5.0
    mine = vmm_cpu(os.getpid())
    assert mine is not None and mine > 0
    assert vmm_cpu(2**22 + 1) is None  # above pid_max: no such process


# ---- the run request's bounds ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"idle_timeout_s": 59}, "the shortest idle timeout is 60 seconds"),
        ({"max_duration_s": 30 * 86400 + 1}, "the longest maximum duration is 2592000 seconds"),
        ({"max_duration_running_only": True}, "max_duration_running_only needs max_duration_s"),
        ({"suspended_ttl_s": 0}, "it needs idle_timeout_s"),
    ],
)
def test_run_options_out_of_bounds_are_400s_that_say_why(fields: dict[str, object], says: str) -> None:
    with pytest.raises(InvalidRequest, match=says):
        idle_policy(RunBody(image="debian", **fields), Settings())  # type: ignore[arg-type]


def test_the_idle_floor_is_a_setting() -> None:
    body = RunBody(image="debian", idle_timeout_s=2, auto_resume=True, suspended_ttl_s=0)
    want = IdlePolicy(idle_timeout_s=2, auto_resume=True, suspended_ttl_s=0)
    assert idle_policy(body, Settings(min_idle_s=2)) == want


# ---- activity --------------------------------------------------------------------------------------------


async def test_a_hold_keeps_the_vm_busy_and_waits_while_the_scheduler_suspends_it() -> None:
    activity = Activity()
    async with activity.hold("vm-1"):
        assert activity.busy("vm-1") and activity.last_active("vm-1") > 0
        async with activity.closing("vm-1") as free:
            assert not free  # never suspended under a request
    assert not activity.busy("vm-1")
    entered = asyncio.Event()

    async def request() -> None:
        async with activity.hold("vm-1"):
            entered.set()

    async with activity.closing("vm-1") as free:
        assert free
        waiting = asyncio.ensure_future(request())
        await asyncio.sleep(0.05)
        assert not entered.is_set()  # waits for the suspend to end
    await asyncio.wait_for(waiting, 1)
    assert entered.is_set()


# ---- wake ------------------------------------------------------------------------------------------------


class FakeEngine:
    """What Waker uses of the engine: a record, its lock, and a resume that takes a while."""

    def __init__(self, record: VmRecord) -> None:
        self.record = record
        self.resumes: list[StateReason] = []
        self._lock = asyncio.Lock()
        self.admit_resume = None

    def get(self, vm_id: str) -> VmRecord:
        return self.record

    def lock(self, vm_id: str) -> asyncio.Lock:
        return self._lock

    async def resume(self, vm_id: str, *, reason: StateReason) -> None:
        async with self._lock:
            self.resumes.append(reason)
            await asyncio.sleep(0.05)
            self.record = replace(self.record, state=VmState.RUNNING)


async def test_concurrent_wakes_share_one_resume() -> None:
    engine = FakeEngine(vm(VmState.SUSPENDED, auto_resume=True))
    waker = Waker(engine)  # type: ignore[arg-type]
    records = await asyncio.gather(*(waker.wake("vm-1") for _ in range(8)))
    assert engine.resumes == [StateReason.AUTO_RESUME]
    assert all(r.state is VmState.RUNNING for r in records)


async def test_without_auto_resume_a_suspended_vm_is_the_usual_409() -> None:
    engine = FakeEngine(vm(VmState.SUSPENDED))
    with pytest.raises(InvalidStateTransition, match="cannot exec in VM vm-1 while it is SUSPENDED: resume it"):
        await Waker(engine).wake("vm-1", action="exec in")  # type: ignore[arg-type]
    assert engine.resumes == []
    engine.record = vm(VmState.FAILED, auto_resume=True)
    with pytest.raises(InvalidStateTransition, match="while it is FAILED"):
        await Waker(engine).wake("vm-1")  # type: ignore[arg-type]


# ---- the guest's answer -------------------------------------------------------------------------------


def idle_answer(stream: int, hold: int, suspend: int) -> bytes:
    return encode_frame(Msg.IDLE_STATE, stream, encode_fields([(Tag.HOLD, hold), (Tag.SUSPEND_NOW, suspend)]))


async def test_the_guest_answers_two_flags_and_nothing_else(agents: Agents) -> None:  # noqa: F811
    answers = [
        idle_answer(0, 1, 0),
        idle_answer(0, 0, 7),
        encode_frame(Msg.IDLE_STATE, 0, b"\0" * (IDLE_STATE_MAX + 1)),
        encode_frame(Msg.OK, 0),
    ]

    async def handler(fake: FakeAgent, frame: Frame, writer: asyncio.StreamWriter) -> None:
        assert frame.type is Msg.IDLE_QUERY
        raw = bytearray(answers.pop(0))
        raw[4:8] = frame.stream.to_bytes(4, "little")
        await send(writer, bytes(raw))

    conn, _ = await agents(handler)
    assert await conn.idle_state(2.0) == GuestIdleState(hold=True, suspend_now=False)
    assert await conn.idle_state(2.0) == GuestIdleState(hold=False, suspend_now=True)
    with pytest.raises(GuestProtocolError, match="an idle state of 65 bytes"):
        await conn.idle_state(2.0)
    with pytest.raises(GuestProtocolError, match="OK where IDLE_STATE was expected"):
        await conn.idle_state(2.0)


async def test_an_auto_resume_is_held_to_the_quotas_of_a_resume() -> None:
    engine = FakeEngine(vm(VmState.SUSPENDED, auto_resume=True))
    asked: list[str] = []

    @contextlib.asynccontextmanager
    async def refuse(record: VmRecord) -> AsyncIterator[None]:
        asked.append(record.id)
        raise QuotaExceeded("max_running_vms", 1, 1)
        yield

    engine.admit_resume = refuse  # type: ignore[assignment]
    waker = Waker(engine)  # type: ignore[arg-type]
    results = await asyncio.gather(*(waker.wake("vm-1") for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, QuotaExceeded) for r in results)  # every caller: 429
    assert engine.resumes == [] and engine.record.state is VmState.SUSPENDED and asked == ["vm-1"]


# ---- the scheduler: one tenant's slow guests delay no one ------------------------------------------------


class SchedulerEngine:
    """What the Scheduler uses of the engine, with the guests and apps of a hostile tenant, mallory: its agents
    give ``mallory_says`` to the idle question, or never answer (None: each ask runs to its deadline); its app's
    suspend and terminate hooks hang ``hang_s`` (the VM stays RUNNING meanwhile)."""

    def __init__(
        self, settings: Settings, records: list[VmRecord], *, mallory_says: GuestIdleState | None = None,
        hang_s: float = 0.0,
    ) -> None:  # fmt: skip
        self.settings = settings
        self.store = self
        self.activity = Activity()
        self.records = {r.id: r for r in records}
        self.mallory_says = mallory_says
        self.hang_s = hang_s
        self.asked: list[str] = []
        self.suspends: list[str] = []
        self.removes: list[tuple[str, float]] = []  # (VM, seconds in)
        self.started = asyncio.get_running_loop().time()

    def list_vms(self) -> list[VmRecord]:
        return list(self.records.values())

    def has_runtime(self, vm_id: str) -> bool:
        return self.records[vm_id].state is VmState.RUNNING

    async def guest_idle_state(self, vm_id: str, timeout_s: float) -> GuestIdleState:
        self.asked.append(vm_id)
        if self.records[vm_id].tenant != "mallory":
            return GuestIdleState(hold=False, suspend_now=False)
        if self.mallory_says is None:
            await asyncio.sleep(timeout_s)
            raise AgentUnavailable("the guest agent did not answer in time")
        return self.mallory_says

    async def suspend(self, vm_id: str, *, reason: StateReason, message: str = "") -> None:
        self.suspends.append(vm_id)
        await asyncio.sleep(self.hang_s)
        self.records[vm_id] = self.records[vm_id].moved(VmState.SUSPENDED, reason, message)

    async def remove(self, vm_id: str, *, reason: StateReason, message: str = "") -> None:
        self.removes.append((vm_id, asyncio.get_running_loop().time() - self.started))
        if self.records[vm_id].tenant == "mallory":
            await asyncio.sleep(self.hang_s)
        self.records[vm_id] = self.records[vm_id].moved(VmState.TERMINATED, reason, message)


def tenant_vm(vm_id: str, tenant: str, *, lived_s: float = 0.0, **idle: object) -> VmRecord:
    created = (datetime.now(UTC) - timedelta(seconds=lived_s)).isoformat(timespec="milliseconds")
    return replace(vm(**idle), id=vm_id, tenant=tenant, pid=2**22 + 1, created_at=created)


async def run_scheduler(engine: SchedulerEngine, until: Callable[[], bool], within_s: float) -> None:
    task = asyncio.ensure_future(Scheduler(engine).run())  # type: ignore[arg-type]
    try:
        for _ in range(int(within_s / 0.02)):
            if until():
                return
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_guests_that_never_answer_do_not_delay_another_tenants_maximum_duration() -> None:
    # the review's reproduction: 8 agents of mallory that never answer (0.5 s each), acme's VM an hour overdue
    settings = Settings(idle_check_s=0.2, idle_guest_answer_s=0.5, idle_check_concurrency=4)
    mallory = [tenant_vm(f"vm-m{i}", "mallory", idle_timeout_s=60) for i in range(8)]
    acme = tenant_vm("vm-acme", "acme", lived_s=3600 + 60, max_duration_s=60)
    engine = SchedulerEngine(settings, [*mallory, acme])
    await run_scheduler(engine, lambda: len(engine.asked) >= 12, within_s=5)
    [(vm_id, when)] = engine.removes  # a failed check never moves a VM
    assert vm_id == "vm-acme" and when < 1.0  # in the first pass (0.2 s apart); 4 s in, behind the guests, before
    assert engine.records["vm-acme"].state_reason is StateReason.MAX_DURATION
    assert engine.suspends == [] and all(engine.records[v.id].state is VmState.RUNNING for v in mallory)


async def test_a_slow_suspend_blocks_no_pass_and_is_never_started_twice() -> None:
    # mallory's guest asks to be suspended and an overdue VM of hers is terminated, and her app's hooks hang
    # 2 s (the VMs stay RUNNING); acme's VM reaches its maximum duration 0.5 s in, passes go on every 0.1 s
    settings = Settings(idle_check_s=0.1, idle_guest_answer_s=0.5)
    slow = tenant_vm("vm-slow", "mallory", idle_timeout_s=60)
    old = tenant_vm("vm-old", "mallory", lived_s=3600, max_duration_s=60)
    acme = tenant_vm("vm-acme", "acme", lived_s=59.5, max_duration_s=60)
    asks = GuestIdleState(hold=False, suspend_now=True)
    engine = SchedulerEngine(settings, [slow, old, acme], mallory_says=asks, hang_s=2.0)
    await run_scheduler(engine, lambda: len(engine.removes) == 2, within_s=3)
    [(first, _), (then, when)] = engine.removes  # one action in flight per VM, however many passes see it RUNNING
    assert (first, then) == ("vm-old", "vm-acme") and 0.4 < when < 1.5  # not behind mallory's hooks (2 s in, before)
    assert engine.suspends == ["vm-slow"]
    assert engine.records["vm-slow"].state is VmState.RUNNING
