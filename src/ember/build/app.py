"""Start an image's app under the agent and wait until it is ready (pure policy + agent calls).

What "ready" means, first match wins: ``--ready-cmd`` exits 0; the image's
HEALTHCHECK exits 0; ``LABEL ember.ready.http=PORT`` (or ``ready`` among the
image's hooks, ``ember.hooks``, on its hook port) answers
``POST /ember/v1/ready`` with 2xx; every EXPOSEd TCP port accepts a
connection; with none of these, the app counts as ready once started. Probes
run inside the guest (the agent connects to the guest's loopback), so images
without a shell or Python work.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ember.agent import AgentConnection, ExecRequest, ExecResult
from ember.build.dockerfile import ImageConfig
from ember.config import Settings
from ember.errors import AgentUnavailable, BuildFailed, GuestError
from ember.hooks import EMBER_PREFIX, Hook, HookConfig, Outcome, hook_config, poll
from ember.hooks import call as call_hook

PROBE_INTERVAL_S = 0.25
READY_CALL_TIMEOUT_S = 10.0  # one call of the ready hook (it is called again until the readiness timeout)
TAIL = 3000
# Past the readiness timeout, a probe that still has not answered (the app may have stopped the
# agent) is given this long before the host gives up on it.
PROBE_GRACE_S = 5.0


class ReadyKind(enum.StrEnum):
    CMD = "ready-cmd"
    HEALTHCHECK = "healthcheck"
    HTTP = "http-hook"
    TCP = "tcp-ports"
    STARTED = "started"


@dataclass(frozen=True)
class Readiness:
    kind: ReadyKind
    argv: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    # the ready hook's path prefix (ember.hooks); out of repr, which keys the snapshot cache, so images built
    # before it keep their keys (an AWS image's repo only ever has AWS's prefix)
    prefix: str = field(default=EMBER_PREFIX, repr=False)

    def describe(self) -> str:
        if self.kind in (ReadyKind.CMD, ReadyKind.HEALTHCHECK):
            return f"{self.kind.value} {' '.join(self.argv)[:100]!r} exits 0"
        if self.kind is ReadyKind.HTTP:
            return f"POST {self.prefix}ready on port {self.ports[0]} answers 2xx"
        if self.kind is ReadyKind.TCP:
            return f"port(s) {', '.join(map(str, self.ports))} accept connections"
        return "the app has started"


def choose(config: ImageConfig, ready_cmd: tuple[str, ...], hooks: HookConfig | None = None) -> Readiness:
    """``hooks``: the image's hooks when an API gave them (the AWS API's: they replace its hook LABELs, and
    an enabled ready hook comes before its HEALTHCHECK, as on AWS)."""
    if ready_cmd:
        return Readiness(ReadyKind.CMD, ready_cmd)
    if hooks is not None and hooks.has(Hook.READY):
        return Readiness(ReadyKind.HTTP, ports=(hooks.port,), prefix=hooks.prefix)
    if config.healthcheck is not None and config.healthcheck.argv:
        return Readiness(ReadyKind.HEALTHCHECK, config.healthcheck.argv)
    hooks = hook_config(dict(config.labels)) if hooks is None else None
    if hooks is not None and hooks.has(Hook.READY):
        return Readiness(ReadyKind.HTTP, ports=(hooks.port,), prefix=hooks.prefix)
    tcp = tuple(int(p.split("/")[0]) for p in config.exposed if p.endswith("/tcp"))
    if tcp:
        return Readiness(ReadyKind.TCP, ports=tcp)
    return Readiness(ReadyKind.STARTED)


class AppRun:
    """The app's process, started through the agent; its output is kept (tail) and echoed, and the
    agent keeps it in the VM's app log of ``log_bytes`` (ember.applog), which every clone inherits."""

    def __init__(
        self, agent: AgentConnection, config: ImageConfig, echo: Callable[[str], None], *, log_bytes: int
    ) -> None:
        self.agent = agent
        self.config = config
        self.echo = echo
        self.log_bytes = log_bytes
        self.tail = ""
        self.result: ExecResult | None = None
        self.pid = 0
        self._task: asyncio.Task[None] | None = None

    def _env(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.config.env]

    def start(self) -> None:
        req = ExecRequest(
            argv=list(self.config.app_argv()), env=self._env(), cwd=self.config.workdir, user=self.config.user,
            log_bytes=self.log_bytes,
        )  # fmt: skip
        self._task = asyncio.create_task(self._pump(req))

    async def _pump(self, req: ExecRequest) -> None:
        with contextlib.suppress(AgentUnavailable):
            async for item in self.agent.exec(req):
                if isinstance(item, ExecResult):
                    self.result = item
                else:
                    text = item[1].decode(errors="replace")
                    self.tail = (self.tail + text)[-TAIL:]
                    for line in text.splitlines():
                        self.echo(f"  app| {line}")

    def failed_to_start(self) -> BaseException | None:
        if self._task is not None and self._task.done():
            return self._task.exception()
        return None

    async def detach(self) -> None:
        """Stop following the app (it keeps running in the guest once the agent connection closes)."""
        if self._task is not None:
            await self.agent.close()
            with contextlib.suppress(BaseException):
                await self._task


async def wait_ready(
    agent: AgentConnection, app: AppRun | None, readiness: Readiness, config: ImageConfig, timeout_s: float
) -> float:
    """Poll until ready; returns seconds waited. Fails at the timeout with the app's last output,
    also when a probe itself never answers (the host's deadline, not only the agent's)."""
    started = time.monotonic()
    checked = ["no check finished"]
    try:
        async with asyncio.timeout(timeout_s + PROBE_GRACE_S):
            return await _poll(agent, app, readiness, config, started, timeout_s, checked)
    except TimeoutError:
        raise _not_ready(app, readiness, timeout_s, f"{checked[0]}; then a check did not answer") from None


def _not_ready(app: AppRun | None, readiness: Readiness, timeout_s: float, last: str) -> BuildFailed:
    output = app.tail.strip()[-2000:] if app is not None else ""
    return BuildFailed(
        f"not ready after {timeout_s:.0f} s (waiting until {readiness.describe()}; last check: {last}); "
        f"the app's last output:\n{output}",
        "ready",
    )


async def _poll(
    agent: AgentConnection, app: AppRun | None, readiness: Readiness, config: ImageConfig, started: float,
    timeout_s: float, checked: list[str],
) -> float:  # fmt: skip
    deadline = started + timeout_s
    while True:
        if app is not None:
            error = app.failed_to_start()
            if error is not None:
                raise BuildFailed(f"the app could not be started: {error}", "start")
            if app.result is not None:
                r = app.result
                raise BuildFailed(
                    f"the app exited (code {r.exit_code}, signal {r.signal}) before it was ready; "
                    f"its last output:\n{app.tail.strip()[-2000:]}",
                    "start",
                )
        ok, checked[0] = await _probe(agent, readiness, config)
        if ok:
            return time.monotonic() - started
        if time.monotonic() > deadline:
            raise _not_ready(app, readiness, timeout_s, checked[0])
        await asyncio.sleep(PROBE_INTERVAL_S)


async def _probe(agent: AgentConnection, readiness: Readiness, config: ImageConfig) -> tuple[bool, str]:
    if readiness.kind is ReadyKind.STARTED:
        return True, "started"
    try:
        if readiness.kind in (ReadyKind.CMD, ReadyKind.HEALTHCHECK):
            hc = config.healthcheck
            timeout = hc.timeout_s if hc is not None and readiness.kind is ReadyKind.HEALTHCHECK else 30.0
            req = ExecRequest(
                argv=list(readiness.argv), env=[f"{k}={v}" for k, v in config.env], cwd=config.workdir,
                user=config.user, timeout_s=timeout,
            )  # fmt: skip
            tail = ""
            async for item in agent.exec(req):
                if isinstance(item, ExecResult):
                    return item.exit_code == 0 and not item.signal, f"exit {item.exit_code}: {tail.strip()[-200:]}"
                tail = (tail + item[1].decode(errors="replace"))[-400:]
            return False, "no exit status"
        if readiness.kind is ReadyKind.HTTP:
            done = await call_hook(agent, Hook.READY, readiness.ports[0], READY_CALL_TIMEOUT_S, prefix=readiness.prefix)
            if done.outcome is Outcome.ERROR:
                raise AgentUnavailable(done.detail)
            return done.ok, done.describe()
        for port in readiness.ports:
            await agent.probe(port)
        return True, "connected"
    except GuestError as exc:
        if isinstance(exc, AgentUnavailable):
            raise
        return False, str(exc)


async def validate(
    agent: AgentConnection, app: AppRun | None, hooks: HookConfig, settings: Settings, say: Callable[[str], None]
) -> float:
    """After ready: POST the validate hook, again while it answers 503, until its timeout; returns the
    seconds it took. Anything but a 2xx fails the build with the answer and the app's last output."""
    timeout = hooks.timeout_s(Hook.VALIDATE, settings.validate_timeout_s)
    say(f"calling the validate hook on port {hooks.port} (timeout {timeout:.0f} s)")
    done = await poll(agent, Hook.VALIDATE, hooks.port, timeout, prefix=hooks.prefix)
    if done.outcome is Outcome.ERROR:
        raise AgentUnavailable(done.detail)
    if not done.ok:
        output = app.tail.strip()[-2000:] if app is not None else ""
        why = f"the app's validate hook did not pass: {done.describe()}; its last output:\n{output}"
        raise BuildFailed(why, "validate")
    say(f"validated after {done.duration_ms / 1000:.2f} s")
    return done.duration_ms / 1000
