"""The idle and lifetime decisions, as pure functions (no I/O, no clock of their own).

Idle: a RUNNING VM with an idle timeout is idle once, for the whole timeout, nothing held it (an exec, file
call, shell or ingress connection: :mod:`ember.lifecycle.activity`), nothing touched it (an ingress request),
its guest did not hold itself awake (``ember-idle hold``) and its VMM used less host CPU than the threshold
in every scheduler pass. Lifetime: a VM is terminated once it lived past its maximum duration (suspended time
included unless running-only), and a SUSPENDED one once it stayed suspended past its suspended TTL.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from ember.models import IdlePolicy, StateReason, VmRecord, VmState, parse_time

# The states in which an expired VM is terminated; the others are in flight and are looked at next pass.
ENDABLE = frozenset({VmState.RUNNING, VmState.SUSPENDED, VmState.FAILED})


class IdleAction(enum.Enum):
    SUSPEND = "suspend"
    TERMINATE = "terminate"  # a suspended TTL of 0: terminate instead of suspending


@dataclass(frozen=True)
class CpuSample:
    at: float  # monotonic seconds
    cpu_s: float  # the VMM's user + system CPU seconds so far


def cpu_busy(before: CpuSample, after: CpuSample, threshold: float) -> bool:
    """Did the VMM use more than ``threshold`` cores between the samples? A counter that went backwards (another
    process behind the pid) or no time between them counts as busy: doubt never makes a VM idle."""
    wall = after.at - before.at
    used = after.cpu_s - before.cpu_s
    if wall <= 0 or used < 0:
        return True
    return used / wall > threshold


def suspended_seconds(record: VmRecord, now: datetime) -> float:
    """Seconds the VM spent SUSPENDED so far, its current span included."""
    current = (now - parse_time(record.suspended_at)).total_seconds() if record.suspended_at else 0.0
    return record.suspended_s + max(0.0, current)


def lived_seconds(record: VmRecord, now: datetime) -> float:
    """What the maximum duration counts: seconds since launch, less suspended time if running-only."""
    lived = (now - parse_time(record.created_at)).total_seconds()
    if record.idle.max_duration_running_only:
        lived -= suspended_seconds(record, now)
    return lived


def lifetime_end(record: VmRecord, now: datetime) -> StateReason | None:
    """Why the VM must be terminated now (maximum duration first), or None."""
    if record.state not in ENDABLE:
        return None
    policy = record.idle
    if policy.max_duration_s is not None and lived_seconds(record, now) >= policy.max_duration_s:
        return StateReason.MAX_DURATION
    if (
        record.state is VmState.SUSPENDED
        and policy.suspended_ttl_s is not None
        and record.suspended_at
        and (now - parse_time(record.suspended_at)).total_seconds() >= policy.suspended_ttl_s
    ):
        return StateReason.SUSPENDED_TTL
    return None


def idle_seconds(*, now: float, running_since: float, last_active: float, last_busy: float) -> float:
    """Monotonic seconds since anything kept the VM awake (it started running, was used, or was busy)."""
    return now - max(running_since, last_active, last_busy)


def idle_action(policy: IdlePolicy, idle_s: float, *, suspend_asked: bool) -> IdleAction | None:
    """What to do with a RUNNING VM that nothing holds: nothing, or suspend it (terminate it if its suspended
    TTL is 0), when idle for its timeout or its guest asked. VMs without an idle timeout are left alone."""
    if policy.idle_timeout_s is None:
        return None
    if not suspend_asked and idle_s < policy.idle_timeout_s:
        return None
    return IdleAction.TERMINATE if policy.suspended_ttl_s == 0 else IdleAction.SUSPEND
