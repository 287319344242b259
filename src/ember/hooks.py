"""App hooks: HTTP POSTs to ``/ember/v1/<hook>`` on a port the image declares (as AWS Lambda MicroVMs').

An image built with Ember's own API declares them with LABELs in its Dockerfile::

    LABEL ember.hooks.port=8080                      # the hook port (else ember.ready.http's port)
    LABEL ember.hooks=validate,run,resume,suspend,terminate   # the hooks the app answers (ready too)
    LABEL ember.hooks.validate.timeout=600           # seconds: validate 1-3600, the others 1-60

``ready`` and ``validate`` run at build time (``validate`` after ``ready``; both are polled again
while they answer 503); ``run`` (its body the run payload), ``resume`` (after the restore bumped
``/run/ember/generation``), ``suspend`` (before the state is saved) and ``terminate`` (before the
VM is removed) at runtime. A hook not listed is not called; an image without a hook port has none.

An image created through the AWS API (ember.aws.images) gets its hooks from that API instead (the model's
``hooks``: port, enable flags, timeouts), at AWS's paths (``/aws/lambda-microvms/runtime/v1/<hook>``,
:data:`AWS_PREFIX`): its build record's config carries them (``"hooks"``, :meth:`HookConfig.to_json`) and
they take the place of any hook LABEL.

The request is made by the guest agent (``Msg.HOOK``) to the guest's 127.0.0.1, without blocking
its other streams; the agent ends it at its timeout and returns at most HOOK_ANSWER_MAX bytes of
the answer, which :func:`parse_answer` reads as hostile input. Every runtime call is recorded as
an event of the VM (``reason`` ``hook``, no state change, the message from :meth:`HookCall.describe`).
"""

from __future__ import annotations

import asyncio
import enum
import errno
import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from ember.agent import AgentConnection
from ember.config import Settings
from ember.db.store import Store
from ember.errors import AgentUnavailable, BuildFailed, GuestError, GuestProtocolError
from ember.guest.protocol import HOOK_ANSWER_MAX, HOOK_BODY_MAX, Field, Msg, Tag, decode_fields
from ember.logs import vlog
from ember.models import VmRecord

log = logging.getLogger(__name__)

PORT_LABEL = "ember.hooks.port"
LIST_LABEL = "ember.hooks"
READY_LABEL = "ember.ready.http"  # today's ready check: its port is the hook port too
TIMEOUT_LABEL = re.compile(r"ember\.hooks\.([a-z]+)\.timeout")
EXCERPT_CHARS = 300  # of an answer's body, kept in the call's record
GRACE_S = 5.0  # the host waits this long past a hook's timeout for the agent's own answer
POLL_INTERVAL_S = 0.25  # between two calls of a hook that answered 503
_STATUS = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9])(?:[ \t][^\r\n]*)?\r?\n")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")
EMBER_PREFIX = "/ember/v1/"  # Ember's hook paths: the agent's default (it is sent no path)
AWS_PREFIX = "/aws/lambda-microvms/runtime/v1/"  # images created through the AWS API
PREFIXES = (EMBER_PREFIX, AWS_PREFIX)  # the only ones a stored config may name


class Hook(enum.StrEnum):
    READY = "ready"
    VALIDATE = "validate"
    RUN = "run"
    RESUME = "resume"
    SUSPEND = "suspend"
    TERMINATE = "terminate"


MAX_TIMEOUT_S = {Hook.VALIDATE: 3600}  # every other hook: RUNTIME_MAX_TIMEOUT_S (ready: the build's ready_timeout)
RUNTIME_MAX_TIMEOUT_S = 60


class Outcome(enum.StrEnum):
    OK = "ok"  # answered 2xx
    FAILED = "failed"  # answered another status
    TIMEOUT = "timeout"  # no answer within the hook's timeout
    UNREACHABLE = "unreachable"  # nothing listens on the port, or it closed without an answer
    ERROR = "error"  # the agent is gone or answered outside the protocol


@dataclass(frozen=True)
class HookConfig:
    """The hooks an image declares; ``timeouts`` holds the seconds of each hook that has one of its own."""

    port: int
    hooks: frozenset[Hook] = frozenset()
    timeouts: Mapping[Hook, float] = field(default_factory=dict)
    prefix: str = EMBER_PREFIX  # the hook's path is prefix + its name

    def has(self, hook: Hook) -> bool:
        return hook in self.hooks

    def timeout_s(self, hook: Hook, default_s: float) -> float:
        return self.timeouts.get(hook, default_s)

    def to_json(self) -> dict[str, object]:
        return {
            "port": self.port, "hooks": sorted(h.value for h in self.hooks), "prefix": self.prefix,
            "timeouts": {h.value: t for h, t in sorted(self.timeouts.items())},
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> HookConfig:
        """What :meth:`to_json` wrote (the daemon's own record); ValueError for anything else."""
        port, names, prefix, timeouts = data["port"], data["hooks"], data["prefix"], data["timeouts"]
        if not isinstance(port, int) or not 0 < port < 65536 or prefix not in PREFIXES:
            raise ValueError("a hook config with a bad port or prefix")
        if not isinstance(names, list) or not isinstance(timeouts, dict):
            raise ValueError("a hook config with bad hooks or timeouts")
        times = {Hook(k): float(v) for k, v in timeouts.items()}
        return cls(port=port, hooks=frozenset(Hook(n) for n in names), timeouts=times, prefix=str(prefix))


def _bad(message: str) -> BuildFailed:
    return BuildFailed(message, "hooks")


def _port(label: str, raw: str) -> int:
    if not (raw.isascii() and raw.isdigit()) or not 0 < int(raw) < 65536:
        raise _bad(f"LABEL {label}={raw[:40]}: expected a port number 1-65535")
    return int(raw)


def hook_config(labels: Mapping[str, str]) -> HookConfig | None:
    """The image's hooks from its LABELs, or None (no hook port: no hooks). A bad label fails the build
    with a message that names it."""
    port = 0
    if PORT_LABEL in labels:
        port = _port(PORT_LABEL, labels[PORT_LABEL])
    elif READY_LABEL in labels:
        port = _port(READY_LABEL, labels[READY_LABEL])
    names = [n.strip() for n in labels.get(LIST_LABEL, "").split(",") if n.strip()]
    known = {h.value for h in Hook}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise _bad(f"LABEL {LIST_LABEL}: unknown hook {unknown[0][:40]!r}; hooks are {', '.join(known)}")
    hooks = {Hook(n) for n in names} | ({Hook.READY} if READY_LABEL in labels else set())
    timeouts: dict[Hook, float] = {}
    for key, raw in labels.items():
        match = TIMEOUT_LABEL.fullmatch(key)
        if match is None:
            continue
        if match[1] not in known or match[1] == Hook.READY:
            raise _bad(f"LABEL {key}: no such hook timeout (ready's is the build's ready_timeout)")
        hook = Hook(match[1])
        most = MAX_TIMEOUT_S.get(hook, RUNTIME_MAX_TIMEOUT_S)
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= most:
            raise _bad(f"LABEL {key}={raw[:40]}: expected whole seconds 1-{most}")
        timeouts[hook] = float(raw)
    if not port:
        if hooks or timeouts:
            raise _bad(f"hooks are declared but no port: add LABEL {PORT_LABEL}=PORT")
        return None
    return HookConfig(port=port, hooks=frozenset(hooks), timeouts=timeouts)


@dataclass(frozen=True)
class HookAnswer:
    status: int
    excerpt: str  # the start of the body, printable ASCII only


def parse_answer(raw: bytes) -> HookAnswer:
    """The status and a printable excerpt of the body of an answer's first bytes. Hostile: more bytes
    than the agent may send is a protocol error; anything but an HTTP/1.x status line a ValueError."""
    if len(raw) > HOOK_ANSWER_MAX:
        raise GuestProtocolError(f"a hook answer of {len(raw)} bytes (at most {HOOK_ANSWER_MAX})")
    match = _STATUS.match(raw)
    if match is None:
        raise ValueError("the answer is not HTTP/1.x")
    _, sep, body = raw.partition(b"\r\n\r\n")
    text = body[: EXCERPT_CHARS * 2].decode("utf-8", errors="replace") if sep else ""
    return HookAnswer(status=int(match[1]), excerpt=_UNPRINTABLE.sub(" ", text).strip()[:EXCERPT_CHARS])


@dataclass(frozen=True)
class HookCall:
    """One call of a hook, as recorded."""

    hook: Hook
    outcome: Outcome
    status: int  # the HTTP status, 0 without an answer
    duration_ms: float
    detail: str = ""  # the answer's excerpt, or what went wrong

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK

    def describe(self) -> str:
        status = f", HTTP {self.status}" if self.status else ""
        detail = f": {self.detail}" if self.detail else ""
        return f"hook {self.hook.value} {self.outcome.value}{status} in {self.duration_ms:.0f} ms{detail}"[:1000]


async def request(
    agent: AgentConnection, hook: Hook, port: int, timeout_s: float, body: bytes = b"", *, prefix: str = EMBER_PREFIX
) -> HookAnswer:
    """POST ``body`` to the hook (at ``prefix`` + its name) through the agent. Raises GuestError (the agent's:
    nothing listens, its timeout passed), ValueError (not an HTTP answer), TimeoutError (the agent did not end
    it in time)."""
    if len(body) > HOOK_BODY_MAX:
        raise ValueError(f"a hook body is at most {HOOK_BODY_MAX} bytes")
    if prefix not in PREFIXES:
        raise ValueError(f"no such hook path prefix: {prefix[:40]!r}")
    fields: list[Field] = [
        (Tag.PORT, port), (Tag.HOOK_NAME, hook.value), (Tag.TIMEOUT_MS, max(1, int(timeout_s * 1000))),
    ]  # fmt: skip
    if prefix != EMBER_PREFIX:  # the agent's default is Ember's path; an older agent knows no other
        fields.append((Tag.PATH, prefix + hook.value))
    if body:
        fields.append((Tag.HOOK_BODY, body))
    async with asyncio.timeout(timeout_s + GRACE_S):  # the agent ends it at timeout_s; this if it does not
        reply = await agent.request(Msg.HOOK, fields, timeout=None)
    answer = decode_fields(reply.payload).get(Tag.HOOK_ANSWER)
    if not answer:
        raise GuestProtocolError("a hook's OK without its answer")
    return parse_answer(answer[0])


async def call(
    agent: AgentConnection, hook: Hook, port: int, timeout_s: float, body: bytes = b"", *, prefix: str = EMBER_PREFIX
) -> HookCall:
    """:func:`request`, its outcome recorded; never raises for what the guest does."""
    started = time.perf_counter()

    def done(outcome: Outcome, status: int = 0, detail: str = "") -> HookCall:
        ms = round((time.perf_counter() - started) * 1000, 1)
        return HookCall(hook, outcome, status, ms, detail[:EXCERPT_CHARS])

    try:
        answer = await request(agent, hook, port, timeout_s, body, prefix=prefix)
    except ValueError as exc:
        return done(Outcome.FAILED, detail=str(exc))
    except TimeoutError:
        return done(Outcome.TIMEOUT, detail=f"no answer in {timeout_s:.0f} s")
    except (AgentUnavailable, GuestProtocolError) as exc:
        return done(Outcome.ERROR, detail=str(exc))
    except GuestError as exc:
        if exc.errno == errno.ETIMEDOUT:  # the agent's deadline
            return done(Outcome.TIMEOUT, detail=f"no answer in {timeout_s:.0f} s")
        return done(Outcome.UNREACHABLE, detail=str(exc))
    outcome = Outcome.OK if 200 <= answer.status < 300 else Outcome.FAILED
    return done(outcome, answer.status, answer.excerpt)


async def poll(
    agent: AgentConnection, hook: Hook, port: int, timeout_s: float, *, prefix: str = EMBER_PREFIX
) -> HookCall:
    """Call ``hook`` until it answers anything but 503 or ``timeout_s`` has passed (in all: each call
    gets what is left). Returns the last call, its duration the whole wait's."""
    started = time.perf_counter()
    deadline = started + timeout_s
    while True:
        left = max(0.001, deadline - time.perf_counter())
        last = await call(agent, hook, port, left, prefix=prefix)
        waited = round((time.perf_counter() - started) * 1000, 1)
        if last.status != 503 or time.perf_counter() + POLL_INTERVAL_S >= deadline:
            if last.status == 503:
                last = HookCall(hook, Outcome.TIMEOUT, 503, waited, f"still 503 after {timeout_s:.0f} s")
            return HookCall(last.hook, last.outcome, last.status, waited, last.detail)
        await asyncio.sleep(POLL_INTERVAL_S)


class AppHooks:
    """The engine's side: which hooks a VM's image declares (from its build's record: the AWS API's hooks,
    else its LABELs), calling them through the VM's agent and recording each call as an event of the VM."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self._configs: dict[str, HookConfig | None] = {}  # image name -> its hooks (until the image is removed)

    def config(self, image: str) -> HookConfig | None:
        if image not in self._configs:
            build = self.store.get_build(image)  # None: a built-in base or a fork ('ember snapshot'): no hooks
            config = json.loads(build.config or "{}") if build is not None else {}
            try:
                if config.get("hooks") is not None:  # given by the AWS API (ember.aws.images)
                    self._configs[image] = HookConfig.from_json(config["hooks"])
                else:
                    labels = config.get("labels") or {}
                    self._configs[image] = hook_config({str(k): str(v) for k, v in dict(labels).items()})
            except (BuildFailed, ValueError, KeyError, TypeError) as exc:  # e.g. a label hooks now refuse
                log.warning("image %s: its hooks are ignored: %s", image, exc)
                self._configs[image] = None
        return self._configs[image]

    def forget(self, image: str) -> None:
        """The image ``image`` is removed: a later image of that name (a version number given again through
        Ember's own API) has hooks of its own."""
        self._configs.pop(image, None)

    def timeout_s(self, config: HookConfig, hook: Hook) -> float:
        default = self.settings.validate_timeout_s if hook is Hook.VALIDATE else self.settings.hook_timeout_s
        return config.timeout_s(hook, default)

    async def fire(self, record: VmRecord, agent: AgentConnection, hook: Hook, body: bytes = b"") -> HookCall | None:
        """Call ``hook`` if the VM's image declares it (else None) and record the call as an event."""
        config = self.config(record.image)
        if config is None or not config.has(hook):
            return None
        done = await call(agent, hook, config.port, self.timeout_s(config, hook), body, prefix=config.prefix)
        vlog(record.id).log(logging.INFO if done.ok else logging.WARNING, "%s", done.describe())
        await asyncio.to_thread(self.store.record_hook, record, done.describe())
        return done

    async def warm(self, image: str, agent: AgentConnection) -> HookCall | None:
        """A pool pre-start's warm-up: the image's validate hook, else its ready hook, polled while it
        answers 503, within EMBER_POOL_WARM_TIMEOUT; None for an image with neither."""
        config = self.config(image)
        hook = next((h for h in (Hook.VALIDATE, Hook.READY) if config is not None and config.has(h)), None)
        if config is None or hook is None:
            return None
        timeout = min(self.settings.pool_warm_timeout_s, self.timeout_s(config, hook))
        return await poll(agent, hook, config.port, timeout, prefix=config.prefix)
