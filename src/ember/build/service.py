"""Image builds end to end: context + Dockerfile -> layers -> running app -> image.

Up to ``EMBER_MAX_BUILDS`` builds run at once (fewer when the host's available
memory cannot hold that many build VMs); the others wait their turn, and say so
in their log. Every build gets a record (BUILDING, then CREATED or
CREATE_FAILED with the failing step and reason) and a log file kept after it,
capped at ``EMBER_BUILD_LOG_MAX_BYTES``. Whatever fails, the build ends
CREATE_FAILED; an unexpected error is logged with an id and the tenant sees
only the id.

What concurrent builds share is made safe here: every build VM gets a uid of
its own from the daemon's allocator (none shares a uid with another VMM or owns
a finished layer), filtered by the daemon's egress table while it runs
(ember.build.egress), versions of a repo are numbered under a lock, the layer
cache claims each key while a step makes it (ember.build.layers).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import logging
import math
import re
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from ember.agent import AgentConnection
from ember.build import app as app_mod
from ember.build.bases import BaseLayers
from ember.build.builder import Builder, BuildOptions
from ember.build.context import BuildContext
from ember.build.dockerfile import Dockerfile, parse
from ember.build.egress import BuildEgress
from ember.build.layers import step_key
from ember.build.tarread import TarLimits
from ember.build.template import BuilderTemplates
from ember.build.unpack import remove_tree
from ember.config import Settings
from ember.db.store import Store
from ember.errors import BuildFailed, EmberError, InvalidRequest, NameTaken, log_with_id
from ember.hooks import Hook, HookConfig, hook_config
from ember.imagecfg import ImageDefaults
from ember.images import RESERVED_NAMES, ImageStore
from ember.metrics import build_finished
from ember.models import BuildRecord, BuildState, ImageRecord, utcnow
from ember.tenancy import names
from ember.tenancy.principal import DEFAULT_TENANT
from ember.vmm.machine import MachineConfig

log = logging.getLogger(__name__)

REPO = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")
MAX_READY_TIMEOUT_S = 3600.0
# What an interrupted build can leave under data_dir: contexts, base trees, OCI layouts, COPY scratch.
BUILD_LEFTOVERS = ("build-*", ".rootfs-*", ".layout-*", "tmp*")


@dataclass(frozen=True)
class BuildRequest:
    name: str  # repo or repo:tag, as the tenant names it
    tenant: str = DEFAULT_TENANT
    dockerfile: str = "Dockerfile"
    options: BuildOptions = field(default_factory=BuildOptions)
    ready_cmd: tuple[str, ...] = ()
    ready_timeout_s: float = 120.0
    hooks: HookConfig | None = None  # the AWS API's hooks: they replace the image's hook LABELs (ember.hooks)
    env: tuple[tuple[str, str], ...] = ()  # set over the Dockerfile's ENV (the AWS API's environmentVariables)
    version: int = 0  # the version's number (the AWS API never reuses one); 0: the repo's next


def check_ready_timeout(seconds: float) -> None:
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_READY_TIMEOUT_S):
        raise InvalidRequest(f"ready_timeout={seconds}: give a number of seconds above 0 and at most 3600")


def split_name(name: str) -> tuple[str, str]:
    repo, _, tag = name.partition(":")
    if not REPO.match(repo) or (tag and not TAG.match(tag)):
        raise InvalidRequest(
            f"'{name}' is not an image name: use lowercase letters, digits, '.', '_' or '-', optionally ':tag'"
        )
    if repo in RESERVED_NAMES:  # 'ember run debian' must never reach a tenant's build
        raise NameTaken(f"'{repo}' is the name of a built-in base image: pick another name")
    return repo, tag


def mem_available_mib(meminfo: Path = Path("/proc/meminfo")) -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 0


def concurrent_builds(settings: Settings, available_mib: int) -> int:
    """EMBER_MAX_BUILDS, lowered to the build VMs the host's available memory holds (at least one)."""
    per_build = settings.build_memory_mib + settings.vmm_overhead_mib
    fit = available_mib // per_build if available_mib else settings.max_builds
    return max(1, min(settings.max_builds, fit))


class BuildSlots:
    """At most ``limit`` builds at once; the rest wait in arrival order."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0
        self._waiting: deque[asyncio.Future[None]] = deque()

    @contextlib.asynccontextmanager
    async def slot(self, on_queued: Callable[[int], None]) -> AsyncIterator[None]:
        if self.running >= self.limit or self._waiting:
            turn = asyncio.get_running_loop().create_future()
            self._waiting.append(turn)
            on_queued(self.running + len(self._waiting) - 1)
            try:
                await turn
            except BaseException:
                if turn.done() and not turn.cancelled():
                    self._release()  # handed the slot just as it was cancelled: pass it on
                else:
                    self._waiting.remove(turn)
                raise
        else:
            self.running += 1
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)  # the slot goes straight to the next build
                return
        self.running -= 1


class BuildUids:
    """Build VMs' uids: one of its own for each, from the daemon's allocator, in the egress
    filter's set while a networked one runs."""

    def __init__(self, allocate: Callable[[], int], release: Callable[[int], None], egress: BuildEgress) -> None:
        self.allocate = allocate
        self.release = release
        self.egress = egress

    @contextlib.asynccontextmanager
    async def lease(self, network: bool) -> AsyncIterator[int]:
        uid = self.allocate()
        try:
            if network:
                await asyncio.to_thread(self.egress.add, uid)
            try:
                yield uid
            finally:
                if network:
                    await asyncio.to_thread(self.egress.remove, uid)
        finally:
            self.release(uid)


class BuildLog:
    """A build's log: every line goes to the client's stream (bounded there) and to the
    log file until the file reaches ``cap`` bytes; the verdict line is always written."""

    def __init__(self, path: Path, cap: int, emit: Callable[[str], None]) -> None:
        self.cap = cap
        self.emit = emit
        self.written = 0
        self.truncated = False
        self._file = open(path, "wb")  # noqa: SIM115 (closed by __exit__)

    def __enter__(self) -> BuildLog:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._file.close()

    def __call__(self, line: str) -> None:
        self.emit(line)
        if self.truncated:
            return
        data = (line + "\n").encode(errors="replace")
        if self.written + len(data) > self.cap:
            self.truncated = True
            data = f"... log truncated: it reached {self.cap} bytes (EMBER_BUILD_LOG_MAX_BYTES) ...\n".encode()
        self._write(data)

    def verdict(self, line: str) -> None:
        self.emit(line)
        self._write((line + "\n").encode(errors="replace"))

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._file.flush()
        self.written += len(data)


class DockerfileParser:
    """Tenants' Dockerfiles parsed one at a time in a thread of its own: a hostile 1 MiB one costs seconds of CPU
    (and the GIL), so never on the event loop, nor in the default pool every other blocking call shares."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ember-dockerfile")

    async def open(self, context: Path, dockerfile: str, build_args: dict[str, str]) -> tuple[BuildContext, Dockerfile]:
        """The build context and its parsed Dockerfile (DockerfileError, a 400, for a bad one)."""

        def prepare() -> tuple[BuildContext, Dockerfile]:
            limits, scan_s = TarLimits.from_settings(self.settings), self.settings.build_tool_timeout_s
            ctx = BuildContext(context, limits, dockerfile, scan_s=scan_s)
            try:
                return ctx, parse(ctx.dockerfile_text(), build_args)
            except BaseException:
                ctx.close()
                raise

        return await asyncio.get_running_loop().run_in_executor(self._pool, prepare)

    async def check(self, context: Path, dockerfile: str, build_args: dict[str, str]) -> None:
        """Parse the context's Dockerfile before anything is recorded (DockerfileError for a bad one)."""
        ctx, _ = await self.open(context, dockerfile, build_args)
        ctx.close()


class BuildService:
    def __init__(
        self, store: Store, images: ImageStore, *, allocate_uid: Callable[[], int], release_uid: Callable[[int], None]
    ) -> None:
        self.store = store
        self.images = images
        self.settings = images.settings
        self.bases = BaseLayers(self.settings)
        self.logs_dir = self.settings.data_dir / "builds"
        available = mem_available_mib()
        self.slots = BuildSlots(concurrent_builds(self.settings, available))
        log.info("image builds at once: %d (EMBER_MAX_BUILDS=%d, MemAvailable %d MiB, %d MiB per build VM)",
                 self.slots.limit, self.settings.max_builds, available,
                 self.settings.build_memory_mib + self.settings.vmm_overhead_mib)  # fmt: skip
        egress = BuildEgress(f"ember_build_{self.settings.uid_base}")  # one table per daemon (uid range)
        self.uids = BuildUids(allocate_uid, release_uid, egress)
        self.templates = BuilderTemplates(images.host, lambda: self._build_machine(""))
        self._names = asyncio.Lock()
        self.parser = DockerfileParser(self.settings)

    def log_path(self, name: str) -> Path:
        return self.logs_dir / f"{name}.log"

    def interrupted(self) -> None:
        """After a daemon restart: builds it was running can never finish; their files go."""
        for record in self.store.list_builds():
            if record.state is BuildState.BUILDING:
                self.store.put_build(dataclasses.replace(
                    record, state=BuildState.CREATE_FAILED, error="interrupted: the daemon stopped during the build",
                    finished_at=utcnow(),
                ))  # fmt: skip
        data = self.settings.data_dir
        # (build VMs' control directories and cgroups went with the start-up sweep: Host.sweep)
        strays = [p for pattern in BUILD_LEFTOVERS for p in data.glob(pattern)]
        for stray in strays:
            log.warning("removing what an interrupted build left: %s", stray.name)
            with contextlib.suppress(OSError):
                remove_tree(stray)  # trees unpacked from tenants' archives: never follow a link in them
        self.bases.cache.clean_unfinished()
        self.templates.clean()
        self.uids.egress.install()  # afresh: the uids a killed daemon's build VMs had are no build VMs' now

    def _build_machine(self, token: str) -> MachineConfig:
        machine = self.images.machine(token)
        return dataclasses.replace(
            machine, initramfs=str(self.images.guest.build_initramfs), cmdline=f"{machine.cmdline} ember.build=1",
            memory_mib=self.settings.build_memory_mib, nic=False,  # its NIC is QEMU's user-mode network
        )  # fmt: skip

    async def build(
        self, req: BuildRequest, context: Path, emit: Callable[[str], None],
        on_record: Callable[[BuildRecord], None] | None = None,
    ) -> BuildRecord:  # fmt: skip
        """Build ``req``; ``on_record`` is told the BUILDING record as soon as it is stored."""
        repo, tag = split_name(req.name)
        repo = names.new_repo(req.tenant, repo)
        check_ready_timeout(req.ready_timeout_s)
        # bad input fails before any record; the context's descriptor is closed when it goes
        ctx, dockerfile = await self.parser.open(context, req.dockerfile, dict(req.options.build_args))
        async with self._names:
            version = req.version or self.store.next_version(repo)
            name = f"{repo}:{tag or version}"
            if self.store.get_build(name) is not None or self.store.get_image(name) is not None:
                shown = names.public(name)
                raise NameTaken(f"image {shown} exists: remove it ('ember image rm {shown}') or pick another tag")
            record = BuildRecord(name=name, repo=repo, version=version, state=BuildState.BUILDING, tenant=req.tenant)
            self.store.put_build(record)
        if on_record is not None:
            on_record(record)
        started = time.perf_counter()
        try:
            self.logs_dir.mkdir(exist_ok=True)
            say = BuildLog(self.log_path(name), self.settings.build_log_max_bytes, emit)
        except OSError as exc:
            return self._failed(record, exc, started, emit)
        with say:

            def queued(ahead: int) -> None:
                say(f"queued behind {ahead} build(s): {self.slots.limit} run at once (EMBER_MAX_BUILDS)")

            try:
                async with self.slots.slot(queued):
                    say(f"building {names.public(name)} (accelerator: {self.images.accel.accel.value})")
                    record = await self._run(record, req, dockerfile, ctx, say)
            except Exception as exc:
                return self._failed(record, exc, started, say.verdict)
            record = dataclasses.replace(record, seconds=time.perf_counter() - started)
            self.store.put_build(record)
            build_finished(record.seconds, error=None)
            say.verdict(f"CREATED {names.public(name)} in {record.seconds:.1f} s")
            return record

    def _failed(self, record: BuildRecord, exc: Exception, started: float, say: Callable[[str], None]) -> BuildRecord:
        reason, step = _failure(record.name, exc)
        say(f"CREATE_FAILED: {reason}")
        record = dataclasses.replace(
            record, state=BuildState.CREATE_FAILED, error=reason, step=step, finished_at=utcnow(),
            seconds=time.perf_counter() - started,
        )  # fmt: skip
        self.store.put_build(record)
        build_finished(record.seconds, error=exc)
        return record

    def _reusable(self, repo: str, key: str) -> ImageRecord | None:
        """The newest version of ``repo`` built from ``key`` whose snapshot fits this daemon's machine."""
        for build in reversed(self.store.list_builds()):
            if build.repo != repo or build.state is not BuildState.CREATED:
                continue
            if json.loads(build.steps or "{}").get("cache_key") != key:
                continue
            image = self.store.get_image(build.name)
            if image is not None and self.images.machine(image.token) == image.machine:
                return image
        return None

    async def _run(
        self,
        record: BuildRecord,
        req: BuildRequest,
        dockerfile: Dockerfile,
        ctx: BuildContext,
        say: Callable[[str], None],
    ) -> BuildRecord:
        builder = Builder(self.settings, self.images.host, self._build_machine, self.bases, say,
                          lease_uid=self.uids.lease, templates=self.templates)  # fmt: skip
        built = await builder.build(dockerfile, ctx, req.options)
        config = built.layer.config
        if req.env:
            given = dict(req.env)
            config = dataclasses.replace(config, env=(*((k, v) for k, v in config.env if k not in given), *req.env))
        readiness = app_mod.choose(config, req.ready_cmd, req.hooks)
        # a bad hook label fails the build here, naming it (unless the API gave the hooks)
        hooks = req.hooks if req.hooks is not None else hook_config(dict(config.labels))
        recorded = config.to_json() | ({"hooks": req.hooks.to_json()} if req.hooks is not None else {})
        steps = [dataclasses.asdict(s) for s in built.steps]
        timings: dict[str, float] = {}

        async def prepare(agent: AgentConnection) -> None:
            app = None
            if config.app_argv():
                say(f"starting the app: {json.dumps(list(config.app_argv()))[:200]}")
                app = app_mod.AppRun(agent, config, say, log_bytes=self.settings.app_log_bytes)
                app.start()
            say(f"waiting until {readiness.describe()} (timeout {req.ready_timeout_s:.0f} s)")
            timings["ready_s"] = await app_mod.wait_ready(agent, app, readiness, config, req.ready_timeout_s)
            say(f"ready after {timings['ready_s']:.2f} s")
            if hooks is not None and hooks.has(Hook.VALIDATE):
                timings["validate_s"] = await app_mod.validate(agent, app, hooks, self.settings, say)
            await agent.sync()
            if app is not None:
                await app.detach()

        def progress(message: str, metrics: dict[str, float] | None = None) -> None:
            say(message)
            for key, value in (metrics or {}).items():
                if key.endswith("_ms"):
                    timings[key.removesuffix("_ms") + "_s"] = value / 1000

        # the same disk, config, readiness, app log size and hooks the API gave as an earlier version: its
        # snapshot is this build's result (an image from before app logs has none: its key differs; one whose
        # hooks the API changed must run them, e.g. validate)
        log_size = {"app_log_bytes": self.settings.app_log_bytes}
        api_hooks = (req.hooks.to_json(),) if req.hooks is not None else ()  # (LABELs' hooks: in the config)
        key = step_key(built.layer.key, config.to_json(), repr(readiness), log_size, *api_hooks)
        previous = None if req.options.no_cache else self._reusable(record.repo, key)
        if previous is not None:
            shown = names.public(previous.name)
            say(f"nothing changed since {shown}: reusing its snapshot (the app as it started then)")
            image = await self.images.copy(record.name, previous)
        else:
            # flattened unprivileged from the checked chain; images.py then copies one root-owned flat file
            flat = self.settings.data_dir / f"tmp-flat-{secrets.token_hex(6)}.qcow2"  # swept if the daemon dies
            try:
                await self.bases.cache.qemu_img.flatten(built.layer.chain, flat)
                defaults = ImageDefaults(env=config.env, workdir=config.workdir, user=config.user)
                image = await self.images.from_disk(record.name, flat, "", progress, prepare, defaults)
            finally:
                flat.unlink(missing_ok=True)
        details = {"steps": steps, "readiness": readiness.kind.value, "cache_key": key, **timings}
        if previous is not None:
            details["snapshot_of"] = previous.name
        return dataclasses.replace(
            record, state=BuildState.CREATED, config=json.dumps(recorded), steps=json.dumps(details),
            finished_at=utcnow(), disk_bytes=image.disk_bytes, memory_bytes=image.memory_bytes,
        )  # fmt: skip


def _failure(name: str, exc: Exception) -> tuple[str, str]:
    """(reason, failed step) for a build's record: Ember's own errors say what failed; anything
    else is logged with an id and the tenant gets the id, not the internals."""
    if isinstance(exc, EmberError):
        return str(exc)[:4000], exc.step if isinstance(exc, BuildFailed) else ""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return "the host disk is full: free space and build again", ""
    error_id = log_with_id(f"build {name} failed", exc=exc)
    return f"internal error (id {error_id}; the daemon log has the details)", ""
