"""Ember's value objects and the VM lifecycle (pure, no I/O).

Records are frozen: a change is ``dataclasses.replace`` plus a store write.
The allowed state transitions live in one table, :data:`TRANSITIONS`; asking
for any other one raises :class:`InvalidStateTransition` with a message that
says what the caller can do instead.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from ember.errors import InvalidStateTransition
from ember.imagecfg import ImageDefaults
from ember.network.policy import EgressPolicy
from ember.vmm.machine import MachineConfig, RamMode


class VmState(enum.StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUSPENDING = "SUSPENDING"
    SUSPENDED = "SUSPENDED"
    RESUMING = "RESUMING"
    TERMINATING = "TERMINATING"
    TERMINATED = "TERMINATED"  # removed: kept listable for EMBER_TERMINATED_RETENTION, then purged
    FAILED = "FAILED"


# The states that hold a VMM (and count as running for quotas and usage).
RUNNING_STATES = frozenset({VmState.PENDING, VmState.RUNNING, VmState.SUSPENDING, VmState.RESUMING})


TRANSITIONS: dict[VmState, frozenset[VmState]] = {
    VmState.PENDING: frozenset({VmState.RUNNING, VmState.FAILED, VmState.TERMINATING}),
    VmState.RUNNING: frozenset({VmState.SUSPENDING, VmState.TERMINATING, VmState.FAILED}),
    # a failed suspend leaves the VM running (e.g. disk full): retry later
    VmState.SUSPENDING: frozenset({VmState.SUSPENDED, VmState.RUNNING, VmState.FAILED}),
    VmState.SUSPENDED: frozenset({VmState.RESUMING, VmState.TERMINATING}),
    # a failed resume leaves the saved state untouched: still SUSPENDED
    VmState.RESUMING: frozenset({VmState.RUNNING, VmState.SUSPENDED, VmState.FAILED}),
    VmState.FAILED: frozenset({VmState.TERMINATING}),
    VmState.TERMINATING: frozenset({VmState.TERMINATED}),
    VmState.TERMINATED: frozenset(),
}

_HINTS = {
    VmState.SUSPENDED: "resume it first with 'ember resume {id}'",
    VmState.FAILED: "it has failed; inspect it with 'ember inspect {id}' and remove it with 'ember rm {id}'",
    VmState.PENDING: "it is still starting; retry in a moment",
    VmState.SUSPENDING: "it is being suspended; retry when that finishes",
    VmState.RESUMING: "it is being resumed; retry when that finishes",
    VmState.TERMINATING: "it is being removed",
    VmState.TERMINATED: "it was removed; launch a new one with 'ember run'",
    VmState.RUNNING: "it is already running",
}


def check_transition(vm_id: str, current: VmState, target: VmState, action: str) -> None:
    if target not in TRANSITIONS[current]:
        hint = _HINTS[current].format(id=vm_id)
        raise InvalidStateTransition(f"cannot {action} VM {vm_id} while it is {current.value}: {hint}")


def require_running(vm_id: str, current: VmState, action: str) -> None:
    if current is not VmState.RUNNING:
        raise InvalidStateTransition(
            f"cannot {action} VM {vm_id} while it is {current.value}: {_HINTS[current].format(id=vm_id)}"
        )


class StateReason(enum.StrEnum):
    """Why a VM entered its current state: the one closed set used for ``state_reason``, in events, logs
    and metrics. Details (an error's text) go to ``state_message``, never here.

    ``launch``             PENDING, then RUNNING: a run request launched it
    ``launch_failed``      FAILED: it could not start (the message says why)
    ``user_suspend``       SUSPENDING, then SUSPENDED: a suspend request
    ``suspend_failed``     RUNNING again (the VM was left untouched: retry later) or FAILED
    ``user_resume``        RESUMING, then RUNNING: a resume request
    ``resume_failed``      SUSPENDED again (its saved state is untouched) or FAILED
    ``user_terminate``     TERMINATING, then TERMINATED: a remove request
    ``vmm_exited``         FAILED: its VMM (QEMU) exited or crashed without being asked
    ``daemon_restart``     SUSPENDED: a restarted daemon finished a suspend cut short, or found the VMM gone
                           with the VM's state saved
    ``recovered``          RUNNING: a restarted daemon re-adopted the running VMM
    ``agent_unreachable``  RUNNING: a restarted daemon could not reach its agent yet (retried every 30 s)
    ``recovery_failed``    FAILED: a restarted daemon could not take the VM over
    ``idle``               SUSPENDING, then SUSPENDED (or TERMINATING, then TERMINATED with a suspended TTL of 0):
                           idle for its idle timeout, or its guest ran ``ember-idle suspend`` (ember.lifecycle)
    ``suspended_ttl``      TERMINATING, then TERMINATED: it stayed SUSPENDED longer than its suspended TTL
    ``max_duration``       TERMINATING, then TERMINATED: it lived past its maximum duration
    ``auto_resume``        RESUMING, then RUNNING: an exec, file call, shell or ingress request reached it while
                           SUSPENDED, and it was run with auto-resume
    ``run_hook_failed``    TERMINATED: the app's run hook (ember.hooks) failed or timed out; the VM was removed
    ``hook``               events only, no state change: an app hook was called (the message says which, its
                           outcome, HTTP status and duration); never a VM's state_reason
    """

    LAUNCH = "launch"
    LAUNCH_FAILED = "launch_failed"
    USER_SUSPEND = "user_suspend"
    SUSPEND_FAILED = "suspend_failed"
    USER_RESUME = "user_resume"
    RESUME_FAILED = "resume_failed"
    USER_TERMINATE = "user_terminate"
    VMM_EXITED = "vmm_exited"
    DAEMON_RESTART = "daemon_restart"
    RECOVERED = "recovered"
    AGENT_UNREACHABLE = "agent_unreachable"
    RECOVERY_FAILED = "recovery_failed"
    IDLE = "idle"
    SUSPENDED_TTL = "suspended_ttl"
    MAX_DURATION = "max_duration"
    AUTO_RESUME = "auto_resume"
    RUN_HOOK_FAILED = "run_hook_failed"
    HOOK = "hook"


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def parse_time(stamp: str) -> datetime:
    """A timestamp :func:`utcnow` wrote."""
    return datetime.fromisoformat(stamp)


@dataclass(frozen=True)
class IdlePolicy:
    """A VM's idle policy and lifetime (run options; enforced by ember.lifecycle). None: no limit.

    ``idle_timeout_s``: suspend it once idle that long (no exec, file call, shell or ingress traffic, and its
    VMM's CPU under EMBER_IDLE_CPU_THRESHOLD). ``suspended_ttl_s``: terminate it once SUSPENDED that long; 0
    terminates it instead of suspending it. ``max_duration_s``: terminate it that long after its launch,
    counting suspended time unless ``max_duration_running_only``. ``auto_resume``: an exec, file call, shell or
    ingress request to it while SUSPENDED resumes it."""

    idle_timeout_s: int | None = None
    auto_resume: bool = False
    suspended_ttl_s: int | None = None
    max_duration_s: int | None = None
    max_duration_running_only: bool = False


@dataclass(frozen=True)
class FileDigest:
    sha256: str
    size: int
    # sparse: SHA-256 over the sums of the file's 1 MiB chunks (holes read as zeros), each summed
    # with ``algo`` (see ember.snapshot: SHA256, or XXH3 for files only root can write)
    sparse: bool = False
    algo: str = "sha256"


@dataclass(frozen=True)
class ImageRecord:
    name: str
    machine: MachineConfig
    gid: int
    token: str  # the agent token baked into the template's memory
    disk_bytes: int
    memory_bytes: int
    created_at: str = field(default_factory=utcnow)
    parent: str = ""
    tenant: str = ""  # "": a built-in base image, visible to every tenant
    defaults: ImageDefaults | None = None  # a Dockerfile image's ENV, WORKDIR and USER (ember.imagecfg)


@dataclass(frozen=True)
class VmRecord:
    id: str
    image: str
    state: VmState
    machine: MachineConfig
    uid: int
    token: str
    ram: RamMode = RamMode.CLONE
    pid: int = 0
    state_reason: StateReason = StateReason.LAUNCH
    next_token: str = ""  # set while a token rotation is in flight
    created_at: str = field(default_factory=utcnow)
    updated_at: str = field(default_factory=utcnow)
    tenant: str = "default"
    env: dict[str, str] = field(default_factory=dict)  # every exec's environment starts from it
    tags: dict[str, str] = field(default_factory=dict)
    state_message: str = ""  # detail of state_reason (an error's text), for people
    terminated_at: str = ""
    idle: IdlePolicy = field(default_factory=IdlePolicy)
    # when it last became SUSPENDED ("" while it is not), and the seconds of its earlier suspended spans: the
    # suspended TTL and a running-only maximum duration count from them, across daemon restarts
    suspended_at: str = ""
    suspended_s: float = 0.0
    egress: EgressPolicy = field(default_factory=EgressPolicy)  # kept across suspend/resume
    aws: dict[str, Any] = field(default_factory=dict)  # run through the AWS API: what it shows back (ember.aws)

    def moved(self, state: VmState, reason: StateReason, message: str = "", **changes: object) -> VmRecord:
        now = utcnow()
        spans: dict[str, object] = {}
        if state is VmState.SUSPENDED and self.state is not VmState.SUSPENDED:
            spans = {"suspended_at": now}
        elif state is not VmState.SUSPENDED and self.suspended_at:
            spent = (parse_time(now) - parse_time(self.suspended_at)).total_seconds()
            spans = {"suspended_at": "", "suspended_s": self.suspended_s + max(0.0, spent)}
        return replace(
            self,
            state=state,
            state_reason=reason,
            state_message=message,
            updated_at=now,
            **(spans | changes),  # type: ignore[arg-type]
        )


class BuildState(enum.StrEnum):
    BUILDING = "BUILDING"
    CREATED = "CREATED"
    CREATE_FAILED = "CREATE_FAILED"


@dataclass(frozen=True)
class BuildRecord:
    """One build of an image version (``repo:version``); kept after it ends, like its log."""

    name: str
    repo: str
    version: int
    state: BuildState
    error: str = ""
    step: str = ""  # the failing step
    config: str = ""  # ImageConfig JSON
    steps: str = ""  # per-step times and readiness (JSON)
    disk_bytes: int = 0
    memory_bytes: int = 0
    seconds: float = 0.0
    created_at: str = field(default_factory=utcnow)
    finished_at: str = ""
    tenant: str = "default"


@dataclass(frozen=True)
class EventRecord:
    """One VM state change, as recorded (and sent to webhooks)."""

    id: int
    tenant: str
    vm_id: str
    at: str
    from_state: str  # "" for the first event of a VM
    to_state: str
    reason: str  # a StateReason value
    message: str
    actor: str  # a key id, "root" (the Unix socket's root), or "system" (the daemon's own work)
