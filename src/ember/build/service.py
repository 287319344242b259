"""Image builds end to end: context + Dockerfile -> layers -> running app -> image.

One build runs at a time per daemon (they share the builder uid and, on a
2-core host, the CPUs). Every build gets a record (BUILDING, then CREATED or
CREATE_FAILED with the failing step and reason) and a log file kept after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ember.agent import AgentConnection
from ember.build import app as app_mod
from ember.build.bases import BaseLayers
from ember.build.builder import Builder, BuildOptions
from ember.build.context import BuildContext
from ember.build.dockerfile import Dockerfile, parse
from ember.build.egress import build_egress
from ember.build.layers import step_key
from ember.build.tarread import TarLimits
from ember.errors import BuildFailed, EmberError, InvalidRequest, NameTaken
from ember.images import ImageStore
from ember.models import BuildRecord, BuildState, ImageRecord, utcnow
from ember.store import Store
from ember.vmm.machine import MachineConfig

REPO = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class BuildRequest:
    name: str  # repo or repo:tag
    dockerfile: str = "Dockerfile"
    options: BuildOptions = field(default_factory=BuildOptions)
    ready_cmd: tuple[str, ...] = ()
    ready_timeout_s: float = 120.0


def split_name(name: str) -> tuple[str, str]:
    repo, _, tag = name.partition(":")
    if not REPO.match(repo) or (tag and not TAG.match(tag)):
        raise InvalidRequest(
            f"'{name}' is not an image name: use lowercase letters, digits, '.', '_' or '-', optionally ':tag'"
        )
    return repo, tag


class BuildService:
    def __init__(self, store: Store, images: ImageStore) -> None:
        self.store = store
        self.images = images
        self.settings = images.settings
        self.bases = BaseLayers(self.settings)
        self._lock = asyncio.Lock()
        self.logs_dir = self.settings.data_dir / "builds"

    def log_path(self, name: str) -> Path:
        return self.logs_dir / f"{name}.log"

    def interrupted(self) -> None:
        """After a daemon restart: builds it was running can never finish."""
        for record in self.store.list_builds():
            if record.state is BuildState.BUILDING:
                self.store.put_build(dataclasses.replace(
                    record, state=BuildState.CREATE_FAILED, error="interrupted: the daemon stopped during the build",
                    finished_at=utcnow(),
                ))  # fmt: skip

    def _build_machine(self, token: str) -> MachineConfig:
        machine = self.images.machine(token)
        return dataclasses.replace(
            machine, initramfs=str(self.images.guest.build_initramfs), cmdline=f"{machine.cmdline} ember.build=1",
            memory_mib=self.settings.build_memory_mib,
        )  # fmt: skip

    async def build(self, req: BuildRequest, context: Path, emit: Callable[[str], None]) -> BuildRecord:
        repo, tag = split_name(req.name)
        ctx = BuildContext(context, TarLimits.from_settings(self.settings), req.dockerfile)  # its fd goes with it
        dockerfile = parse(ctx.dockerfile_text(), dict(req.options.build_args))  # bad input fails before any record
        async with self._lock:
            version = self.store.next_version(repo)
            name = f"{repo}:{tag or version}"
            if self.store.get_build(name) is not None or self.store.get_image(name) is not None:
                raise NameTaken(f"image {name} exists: remove it ('ember image rm {name}') or pick another tag")
            record = BuildRecord(name=name, repo=repo, version=version, state=BuildState.BUILDING)
            self.store.put_build(record)
            self.logs_dir.mkdir(exist_ok=True)
            started = time.perf_counter()
            with open(self.log_path(name), "w") as log_file:

                def say(line: str) -> None:
                    log_file.write(line + "\n")
                    log_file.flush()
                    emit(line)

                say(f"building {name} (accelerator: {self.images.accel.accel.value})")
                try:
                    record = await self._run(record, req, dockerfile, ctx, say)
                except (EmberError, OSError) as exc:
                    step = exc.step if isinstance(exc, BuildFailed) else ""
                    say(f"CREATE_FAILED: {exc}")
                    record = dataclasses.replace(
                        record, state=BuildState.CREATE_FAILED, error=str(exc)[:4000], step=step, finished_at=utcnow(),
                        seconds=time.perf_counter() - started,
                    )  # fmt: skip
                    self.store.put_build(record)
                    return record
                record = dataclasses.replace(record, seconds=time.perf_counter() - started)
                self.store.put_build(record)
                say(f"CREATED {name} in {record.seconds:.1f} s")
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
        builder = Builder(self.settings, self.images.host, self._build_machine, self.bases, say)
        egress = build_egress(self.settings.builder_uid) if req.options.network else contextlib.nullcontext()
        with egress:
            built = await builder.build(dockerfile, ctx, req.options)
        config = built.layer.config
        readiness = app_mod.choose(config, req.ready_cmd)
        steps = [dataclasses.asdict(s) for s in built.steps]
        timings: dict[str, float] = {}

        async def prepare(agent: AgentConnection) -> None:
            app = None
            if config.app_argv():
                say(f"starting the app: {json.dumps(list(config.app_argv()))[:200]}")
                app = app_mod.AppRun(agent, config, say)
                app.start()
            say(f"waiting until {readiness.describe()} (timeout {req.ready_timeout_s:.0f} s)")
            timings["ready_s"] = await app_mod.wait_ready(agent, app, readiness, config, req.ready_timeout_s)
            say(f"ready after {timings['ready_s']:.2f} s")
            await agent.sync()
            if app is not None:
                await app.detach()

        def progress(message: str, metrics: dict[str, float] | None = None) -> None:
            say(message)
            for key, value in (metrics or {}).items():
                if key.endswith("_ms"):
                    timings[key.removesuffix("_ms") + "_s"] = value / 1000

        # the same disk, config and readiness as an earlier version: its snapshot is this build's result
        key = step_key(built.layer.key, config.to_json(), repr(readiness))
        previous = None if req.options.no_cache else self._reusable(record.repo, key)
        if previous is not None:
            say(f"nothing changed since {previous.name}: reusing its snapshot (the app as it started then)")
            image = await self.images.copy(record.name, previous)
        else:
            image = await self.images.from_disk(record.name, built.layer.disk, "", progress, prepare)
        details = {"steps": steps, "readiness": readiness.kind.value, "cache_key": key, **timings}
        if previous is not None:
            details["snapshot_of"] = previous.name
        return dataclasses.replace(
            record, state=BuildState.CREATED, config=json.dumps(config.to_json()), steps=json.dumps(details),
            finished_at=utcnow(), disk_bytes=image.disk_bytes, memory_bytes=image.memory_bytes,
        )  # fmt: skip
