"""Dockerfile -> root filesystem: stages, steps, the layer cache, the build VMs.

Metadata instructions (ENV, CMD, USER, ...) only change the image config.
Filesystem steps (RUN, COPY, ADD, WORKDIR) look up the layer cache first; on a
miss the stage's build VM starts (once per stage, on the first miss) and the
step runs in it. Only the stages the target needs are built.

A build VM is restored from the daemon's builder snapshot for the build's
layout (ember.build.template; made on first need, started as a stage begins
so that it boots while the base is fetched); it cold-boots only when the
stage's disks do not fit the snapshot's devices.

Each build VM runs as a uid of its own (leased from the daemon for as long as
the VM runs). The layer a step made stays that uid's while the VM may still
write it: it is finished (root's, read-only, digest recorded: ember.build.layers)
once the VM has moved on to the next step's layer or stopped, and its key's
claim is held until then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import posixpath
import re
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass, replace
from pathlib import Path

from ember.build.bases import BaseLayers, Log
from ember.build.buildvm import ROOT, BuildVm, Deadlines, step_failed
from ember.build.certhint import CertWatch, hint
from ember.build.context import BuildContext, Owner, TarWriter, dest_path, parse_chmod
from ember.build.dockerfile import (
    Dockerfile,
    ImageConfig,
    Instruction,
    Stage,
    StageEnv,
    arg_pairs,
    command,
    expand,
    expand_words,
    pairs,
    parse_healthcheck,
    parse_shell,
    run_argv,
)
from ember.build.layers import Layer, step_key
from ember.build.tarread import Kind, TarLimits, clean, open_tar
from ember.build.template import BuilderTemplates
from ember.config import Settings
from ember.errors import BuildFailed, EmberError, InvalidRequest, SnapshotError
from ember.guest.protocol import MAX_ID
from ember.runtime import Host
from ember.vmm.machine import MachineConfig

log = logging.getLogger(__name__)

FS_STEPS = frozenset({"RUN", "COPY", "ADD", "WORKDIR"})
# In the build VM's devtmpfs (mounted over the image's /dev): RUN steps see it, no layer keeps it.
CA_PATH = "/dev/ember-ca.crt"
CA_ENV = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "GIT_SSL_CAINFO")
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
MAX_ID_FILE = 1 << 20  # /etc/passwd or /etc/group read for COPY --chown
DIGITS = re.compile(r"[0-9]{1,12}")  # an id as --chown and /etc/passwd write it (ASCII digits)


@dataclass(frozen=True)
class BuildOptions:
    build_args: tuple[tuple[str, str], ...] = ()
    target: str = ""
    no_cache: bool = False
    network: bool = True  # egress for RUN steps (package installs)
    host_ca_certs: bool = False  # hand the host's CA bundle to RUN steps (TLS-inspecting proxies)


@dataclass(frozen=True)
class StepReport:
    stage: int
    line: int
    text: str
    seconds: float
    cached: bool


@dataclass(frozen=True)
class BuiltFs:
    layer: Layer
    steps: tuple[StepReport, ...]


# A build VM's uid for as long as the block runs (its egress filtered when ``network``).
UidLease = Callable[[bool], AbstractAsyncContextManager[int]]


class Builder:
    def __init__(
        self, settings: Settings, host: Host, machine: Callable[[str], MachineConfig], bases: BaseLayers, log: Log,
        *, lease_uid: UidLease, templates: BuilderTemplates,
    ) -> None:  # fmt: skip
        self.settings = settings
        self.lease_uid = lease_uid
        self.templates = templates  # the daemon's builder snapshots
        self.host = host
        self.machine = machine  # token -> build VM machine config
        self.bases = bases
        self.log = log
        self.cache = bases.cache  # one cache shared by every build (layers.LayerCache.claim)
        self.steps: list[StepReport] = []

    async def build(self, dockerfile: Dockerfile, ctx: BuildContext, opts: BuildOptions) -> BuiltFs:
        target = dockerfile.stage(opts.target) if opts.target else dockerfile.stages[-1]
        if target is None:
            raise InvalidRequest(f"no stage named '{opts.target}' in the Dockerfile")
        if self.settings.build_host_ca_certs:  # the operator hands the host's CA bundle to every build
            opts = replace(opts, host_ca_certs=True)
        done: dict[int, Layer] = {}
        for stage in _needed(dockerfile, target):
            done[stage.index] = await StageBuild(self, dockerfile, stage, ctx, opts, done).run()
        return BuiltFs(done[target.index], tuple(self.steps))


def _stage_ref(dockerfile: Dockerfile, ref: str, before: int) -> Stage | None:
    stage = dockerfile.stage(ref)
    return stage if stage is not None and stage.index < before else None


def _needed(dockerfile: Dockerfile, target: Stage) -> list[Stage]:
    needed: set[int] = set()

    def visit(stage: Stage) -> None:
        if stage.index in needed:
            return
        needed.add(stage.index)
        refs = [stage.base] + [ins.flag("from") for ins in stage.instructions if ins.name == "COPY"]
        for ref in refs:
            dep = _stage_ref(dockerfile, ref, stage.index) if ref else None
            if dep is not None:
                visit(dep)

    visit(target)
    return [s for s in dockerfile.stages if s.index in needed]


class StageBuild:
    """One stage: walks its instructions, starting its build VM on the first cache miss."""

    def __init__(
        self, b: Builder, dockerfile: Dockerfile, stage: Stage, ctx: BuildContext, opts: BuildOptions,
        done: dict[int, Layer],
    ) -> None:  # fmt: skip
        self.b, self.df, self.stage, self.ctx, self.opts, self.done = b, dockerfile, stage, ctx, opts, done
        self.build_args = dict(opts.build_args)
        self.vm: BuildVm | None = None
        self._vm_uid = AsyncExitStack()  # the running build VM's uid lease
        self._pending: tuple[Layer, Layer, AsyncExitStack] | None = None  # (made, below, its claim) unfinished
        self.from_disks: list[Path] = []
        self.from_sizes: list[int] = []  # their virtual sizes
        self.from_index: dict[str, int] = {}

    async def run(self) -> Layer:
        if any(ins.name in FS_STEPS for ins in self.stage.instructions):
            self.b.templates.prepare(self.opts.network)  # boots (once) while the base is fetched
        base_stage = _stage_ref(self.df, self.stage.base, self.stage.index)
        if base_stage is not None:
            layer = self.done[base_stage.index]
        else:
            layer = await self.b.bases.layer(self.stage.base, self.ctx, self.b.log)
        self.b.log(f"[stage {self.stage.index}] FROM {self.stage.base}")
        env = StageEnv(layer.config)
        for ins in self.stage.instructions:
            if ins.name == "COPY" and ins.flag("from"):
                await self._from_disk(ins)
        try:
            for ins in self.stage.instructions:
                started = time.perf_counter()
                layer, cached = await self._step(ins, layer, env)
                env.config = layer.config
                seconds = time.perf_counter() - started
                self.b.steps.append(StepReport(self.stage.index, ins.line, ins.original[:200], seconds, cached))
                if ins.name in FS_STEPS:
                    self.b.log(f"[stage {self.stage.index}] {'CACHED ' if cached else ''}{ins.original[:120]}"
                               f"  ({seconds:.2f} s)")  # fmt: skip
        except BaseException:
            await self._stop_vm(finish=False)
            raise
        await self._stop_vm(finish=True)
        return layer

    async def _stop_vm(self, *, finish: bool) -> None:
        """Stop the build VM, give its uid back, and finish (or, if ``finish`` is false, discard)
        the layer it was writing: nothing writes it any more."""
        if self.vm is not None:
            await self.vm.stop()
            self.vm = None
        await self._vm_uid.aclose()
        await self._finish_pending(keep=finish)

    async def _finish_pending(self, *, keep: bool) -> None:
        if self._pending is None:
            return
        made, below, claim = self._pending
        self._pending = None
        async with claim:
            if keep:
                await self.b.cache.put(made.key, made.config, below, made.virtual_size)
            else:
                self.b.cache.discard(made.key)

    async def _from_disk(self, ins: Instruction) -> None:
        ref = ins.flag("from")
        if ref in self.from_index:
            return
        dep = _stage_ref(self.df, ref, self.stage.index)
        layer = self.done[dep.index] if dep is not None else await self.b.bases.layer(ref, self.ctx, self.b.log)
        self.from_index[ref] = len(self.from_disks)
        self.from_disks.append(layer.disk)
        self.from_sizes.append(layer.virtual_size)

    # ---- steps -------------------------------------------------------------

    async def _step(self, ins: Instruction, layer: Layer, env: StageEnv) -> tuple[Layer, bool]:
        variables = env.variables()
        esc = self.df.escape
        cfg = layer.config
        if ins.name == "ARG":
            meta = dict(self.df.meta_args)
            for key, default in arg_pairs(ins):
                value = self.build_args.get(key, default if default is not None else meta.get(key))
                if value is not None:
                    env.args[key] = value
            return replace(layer, key=step_key(layer.key, "ARG", sorted(env.args.items()))), True
        if ins.name not in FS_STEPS:
            new = self._metadata(ins, cfg, variables, esc)
            return replace(layer, key=step_key(layer.key, ins.name, new.to_json()), config=new), True
        if ins.name == "WORKDIR":
            path = expand(" ".join(ins.args), variables, esc)
            workdir = posixpath.normpath(posixpath.join(cfg.workdir, path))
            new_cfg = replace(cfg, workdir=workdir)
            key = step_key(layer.key, "WORKDIR", workdir)
            return await self._fs(key, layer, new_cfg, lambda vm: self._mkdir(vm, workdir))
        if ins.name == "RUN":
            argv = list(run_argv(ins, cfg.shell))
            run_env = env.run_env()
            key = step_key(layer.key, "RUN", argv, run_env, cfg.user, cfg.workdir)
            return await self._fs(key, layer, cfg, lambda vm: self._run(vm, ins, argv, run_env, cfg))
        return await self._copy(ins, layer, variables)

    def _metadata(self, ins: Instruction, cfg: ImageConfig, variables: dict[str, str], esc: str) -> ImageConfig:
        if ins.name == "ENV":
            for key, value in pairs(ins, variables, esc):
                cfg = cfg.with_env(key, value)
                variables[key] = value
            return cfg
        if ins.name == "LABEL":
            for key, value in pairs(ins, variables, esc):
                cfg = cfg.with_label(key, value)
            return cfg
        if ins.name == "USER":
            return replace(cfg, user=expand(" ".join(ins.args), variables, esc))
        if ins.name == "CMD":
            return replace(cfg, cmd=command(ins, cfg.shell))
        if ins.name == "ENTRYPOINT":
            return replace(cfg, entrypoint=command(ins, cfg.shell), cmd=())
        if ins.name == "SHELL":
            return replace(cfg, shell=parse_shell(ins))
        if ins.name == "STOPSIGNAL":
            return replace(cfg, stopsignal=expand(" ".join(ins.args), variables, esc))
        if ins.name == "HEALTHCHECK":
            return replace(cfg, healthcheck=parse_healthcheck(ins, cfg.shell))
        if ins.name == "EXPOSE":
            ports = list(cfg.exposed)
            for word in expand_words(ins.args, variables, esc, False):
                port, _, proto = word.partition("/")
                number = int(port) if port.isascii() and port.isdigit() else 0
                if not 0 < number < 65536 or proto not in ("", "tcp", "udp"):
                    raise ins.error(f"'{word}' is not a port like 8080 or 8080/tcp")
                if f"{port}/{proto or 'tcp'}" not in ports:
                    ports.append(f"{port}/{proto or 'tcp'}")
            return replace(cfg, exposed=tuple(ports))
        raise ins.error("is not supported by Ember")

    async def _fs(
        self, key: str, layer: Layer, config: ImageConfig, action: Callable[[BuildVm], Awaitable[None]]
    ) -> tuple[Layer, bool]:
        if self.opts.no_cache:  # a layer of its own: never replaces one that other layers or builds back onto
            key = step_key(key, "no-cache", secrets.token_hex(8))
        claim = AsyncExitStack()
        await claim.enter_async_context(self.b.cache.claim(key))  # another build making it: wait, then use it
        async with claim:
            hit = await self.b.cache.get(key)
            if hit is not None:
                return replace(hit, config=config), True
            disk = self.b.cache.disk(key)
            disk.unlink(missing_ok=True)
            made = Layer(key, disk, config, (disk, *layer.chain), layer.virtual_size)
            try:
                if self.vm is not None and self.vm.top != layer.disk:
                    await self._stop_vm(finish=True)  # the VM is not on this step's parent (a hit in between)
                if self.vm is None:
                    uid = await self._vm_uid.enter_async_context(self.b.lease_uid(self.opts.network))
                    await self.b.bases.qemu_img.create_overlay(
                        layer.disk, disk, owner_uid=uid, virtual_size=layer.virtual_size
                    )
                    self.vm = await self._start_vm(disk, layer.virtual_size, uid)
                else:
                    await self.vm.new_layer(disk)
                    await self._finish_pending(keep=True)  # the VM writes the new top now, never the old
                await action(self.vm)
                await self.vm.sync()
            except BaseException:
                await self._stop_vm(finish=False)
                self.b.cache.discard(key)
                raise
            self._pending = (made, layer, claim.pop_all())  # finished when the VM moves on or stops
            return made, False

    async def _start_vm(self, top: Path, virtual_size: int, uid: int) -> BuildVm:
        started = time.perf_counter()
        deadlines = Deadlines(boot_s=self.b.settings.boot_timeout_s, tool_s=self.b.settings.build_tool_timeout_s)
        template = await self.b.templates.get(self.opts.network)
        vm = None
        if template is None:
            why = "no builder snapshot"
        elif not template.fits([virtual_size, *self.from_sizes]):
            why = "its disks do not fit the builder snapshot"
        else:
            self.b.log(f"[stage {self.stage.index}] starting the build VM (from the builder snapshot)")
            try:
                vm = await BuildVm.restore(
                    self.b.host, template, top, self.from_disks, self.opts.network, uid, deadlines
                )
            except SnapshotError as exc:  # its state failed its check: never run, made again next time
                log.error("builder snapshot %s dropped: %s", template.snapshot.path.name, exc)
                await self.b.templates.discard(template)
                why = "the builder snapshot was damaged"
        if vm is None:
            token = secrets.token_hex(16)
            self.b.log(f"[stage {self.stage.index}] starting the build VM (cold boot: {why})")
            vm = await BuildVm.start(
                self.b.host, self.b.machine(token), token, top, self.from_disks, self.opts.network, uid, deadlines
            )
        try:
            if self.opts.host_ca_certs:
                await self._hand_in_ca(vm)
        except BaseException:
            await vm.stop()
            raise
        self.b.log(f"[stage {self.stage.index}] build VM ready in {time.perf_counter() - started:.1f} s")
        return vm

    async def _hand_in_ca(self, vm: BuildVm) -> None:
        try:
            bundle = HOST_CA_BUNDLE.read_bytes()
        except OSError as exc:
            raise EmberError(f"--host-ca-certs: cannot read {HOST_CA_BUNDLE}: {exc}") from exc

        async def chunks() -> AsyncIterator[bytes]:
            yield bundle

        await vm.within("handing in the host's CA bundle", vm.agent.write_file(f"{ROOT}{CA_PATH}", chunks(), 0o644))

    async def _mkdir(self, vm: BuildVm, path: str) -> None:
        await vm.tool_ok(["mkdir", "-p", path], root=ROOT)

    def _what(self, ins: Instruction) -> str:
        return f"step at line {ins.line} ({ins.original[:80]})"

    async def _run(self, vm: BuildVm, ins: Instruction, argv: list[str], env: list[str], cfg: ImageConfig) -> None:
        if cfg.workdir != "/":
            await self._mkdir(vm, cfg.workdir)
        if self.opts.host_ca_certs:
            env = [*env, *(f"{name}={CA_PATH}" for name in CA_ENV)]
        watch = CertWatch()

        def echo(text: str) -> None:
            watch.feed(text)
            self._echo(text)

        out = await vm.run(argv, env, cfg.workdir, cfg.user, self.b.settings.build_step_timeout_s, echo)
        if out.result.exit_code != 0 or out.result.signal or out.result.timed_out:
            why = hint(handed_in=self.opts.host_ca_certs, ca_path=CA_PATH, ca_env=CA_ENV) if watch.seen else ""
            raise step_failed(self._what(ins), out, why)

    def _echo(self, text: str) -> None:
        for line in text.splitlines():
            self.b.log(f"  | {line}")

    # ---- COPY / ADD --------------------------------------------------------

    async def _copy(self, ins: Instruction, layer: Layer, variables: dict[str, str]) -> tuple[Layer, bool]:
        words = expand_words(ins.args, variables, self.df.escape, ins.json)
        if len(words) < 2:
            raise ins.error("expected at least one source and a destination")
        *sources, dest_word = words
        cfg = layer.config
        dest = dest_path(dest_word, cfg.workdir)
        chmod = parse_chmod(ins.flag("chmod"), ins)
        chown = expand(ins.flag("chown"), variables, self.df.escape)
        heredocs = {name: (content, expand_ok) for name, content, expand_ok in ins.heredocs}
        src_from = ins.flag("from")
        if ins.name == "ADD":
            for s in sources:
                if "://" in s or s.startswith("git@"):
                    raise ins.error(f"'{s}': ADD from a URL is not supported by Ember; use RUN with curl/wget")
        if src_from:
            rels = [posixpath.normpath("/" + s).lstrip("/") for s in sources]
            digest = step_key("", "from", src_from, self.from_disks[self.from_index[src_from]].name, rels)
        else:
            rels, digest = await asyncio.to_thread(self._context_sources, ins, sources, heredocs)
        key = step_key(layer.key, ins.name, dest, chown, chmod, sorted(ins.flags), rels, digest)
        plan = _CopyPlan(ins, rels, dest, chown, chmod, src_from, heredocs)
        return await self._fs(key, layer, cfg, lambda vm: self._do_copy(vm, plan))

    def _context_sources(
        self, ins: Instruction, sources: list[str], heredocs: dict[str, tuple[str, bool]]
    ) -> tuple[list[str], str]:
        """(the context paths and heredocs a COPY names, the digest of their contents): off the event
        loop, as a tenant's context and .dockerignore decide how long it takes (within the scan deadline)."""
        rels = []
        for s in sources:
            name = s.lstrip("<-").strip("'\"")
            rels += [f"<<{name}"] if s.startswith("<<") and name in heredocs else self.ctx.resolve(s, ins)
        files = [f for r in rels if not r.startswith("<<") for f in self.ctx.walk(r)]
        digest = self.ctx.file_digest(files)
        return rels, step_key(digest, [heredocs.get(r[2:], ("", False))[0] for r in rels if r.startswith("<<")])

    async def _do_copy(self, vm: BuildVm, plan: _CopyPlan) -> None:
        owner = await vm.within(f"--chown={plan.chown}", _owner(vm, plan.chown, plan.ins)) if plan.chown else None
        dest_is_dir = plan.dest.endswith("/") or len(plan.sources) > 1
        if not dest_is_dir:
            probe = await vm.tool(["test", "-d", plan.dest], root=ROOT)
            dest_is_dir = probe.result.exit_code == 0
        dest_dir = plan.dest.rstrip("/") or "/"
        with tempfile.TemporaryDirectory(dir=self.b.settings.data_dir) as tmp:
            stream = Path(tmp) / "copy.tar"
            if plan.src_from:
                fetched = Path(tmp) / "from.tar"
                limits = TarLimits.from_settings(self.b.settings)
                cap = min(limits.max_bytes, self.b.settings.disk_gib << 30)
                await _fetch_from(vm, self.from_index[plan.src_from], plan.sources, fetched, plan.ins, cap)
                await asyncio.to_thread(_write_from_tar, fetched, stream, plan, dest_dir, dest_is_dir, owner, limits)
            else:
                await asyncio.to_thread(self._write_context_tar, stream, plan, dest_dir, dest_is_dir, owner)
            out = await vm.tool(["tar", "-x", "-f", "-", "-C", "/", "--numeric-owner"], root=ROOT,
                                stdin=_file_chunks(stream))  # fmt: skip
        if out.result.exit_code != 0:
            raise BuildFailed(f"unpacking the files in the build VM failed: {out.tail.strip()}", self._what(plan.ins))

    def _write_context_tar(
        self, out_path: Path, plan: _CopyPlan, dest_dir: str, dest_is_dir: bool, owner: Owner | None
    ) -> None:
        with open(out_path, "wb") as out:
            w = TarWriter(out, owner, plan.chmod)
            if owner is not None and dest_is_dir and dest_dir != "/":
                w.add_dir(dest_dir)
            for rel in plan.sources:
                if rel.startswith("<<"):
                    content, _ = plan.heredocs[rel[2:]]
                    target = posixpath.join(dest_dir, rel[2:]) if dest_is_dir else dest_dir
                    w.add_bytes(content.encode(), target)
                    continue
                if plan.ins.name == "ADD" and self.ctx.is_archive(rel):
                    with self.ctx.open_regular(rel) as archive:
                        w.add_archive(archive, dest_dir, self.ctx.tree.limits)
                elif self.ctx.is_dir(rel):
                    for sub, fd, name, st in self.ctx.entries(self.ctx.walk(rel)[1:]):
                        w.add_entry(fd, name, st, posixpath.join(dest_dir, posixpath.relpath(sub, rel or ".")))
                else:
                    target = posixpath.join(dest_dir, posixpath.basename(rel)) if dest_is_dir else dest_dir
                    for _, fd, name, st in self.ctx.entries([rel]):
                        w.add_entry(fd, name, st, target)
            w.close()


@dataclass(frozen=True)
class _CopyPlan:
    ins: Instruction
    sources: list[str]
    dest: str
    chown: str
    chmod: int | None
    src_from: str
    heredocs: dict[str, tuple[str, bool]]


async def _file_chunks(path: Path) -> AsyncIterator[bytes]:
    with open(path, "rb") as f:
        while chunk := await asyncio.to_thread(f.read, 1 << 20):
            yield chunk


async def _owner(vm: BuildVm, spec: str, ins: Instruction) -> Owner:
    user, _, group = spec.partition(":")

    async def lookup(name: str, file: str, field: int) -> int:
        if DIGITS.fullmatch(name):
            if int(name) > MAX_ID:
                raise ins.error(f"--chown={spec}: ids above {MAX_ID} are not valid")
            return int(name)
        _, data = await vm.agent.read_file(f"{ROOT}/etc/{file}")
        text = bytearray()
        async with contextlib.aclosing(data):  # type: ignore[type-var]
            async for chunk in data:
                text += chunk
                if len(text) > MAX_ID_FILE:
                    raise ins.error(f"--chown={spec}: the image's /etc/{file} is larger than {MAX_ID_FILE} bytes")
        for line in text.decode(errors="replace").splitlines():
            parts = line.split(":")
            if len(parts) > field and parts[0] == name:
                if not DIGITS.fullmatch(parts[field]) or int(parts[field]) > MAX_ID:
                    raise ins.error(f"--chown={spec}: /etc/{file} gives '{name}' an id that is not a number")
                return int(parts[field])
        raise ins.error(f"--chown={spec}: no {'user' if file == 'passwd' else 'group'} '{name}' in the image")

    uid = await lookup(user, "passwd", 2)
    if group:
        gid = await lookup(group, "group", 2)
    elif DIGITS.fullmatch(user):
        gid = uid
    else:
        gid = await lookup(user, "passwd", 3)
    return Owner(uid, gid)


async def _fetch_from(vm: BuildVm, index: int, sources: list[str], out: Path, ins: Instruction, cap: int) -> None:
    """The files COPY --from names, as a tar the build VM writes (hostile: bounded, and read by tarread)."""
    with open(out, "wb") as f:

        def sink(chunk: bytes) -> None:
            if f.tell() + len(chunk) > cap:
                raise ins.error(f"COPY --from: the files are larger than the {cap} bytes the image disk can hold")
            f.write(chunk)

        result = await vm.tool(["tar", "-c", "-f", "-", "-C", f"/ember/from{index}", *sources], sink=sink)
    if result.result.exit_code != 0:
        raise ins.error(f"COPY --from: {result.tail.strip()[-500:]}")


def _write_from_tar(
    fetched: Path,
    out_path: Path,
    plan: _CopyPlan,
    dest_dir: str,
    dest_is_dir: bool,
    owner: Owner | None,
    limits: TarLimits,
) -> None:
    def target(name: str) -> str | None:
        root = next((s for s in plan.sources if name == s or name.startswith(s + "/")), None)
        if root is None:
            return None
        if name == root:
            return posixpath.join(dest_dir, posixpath.basename(root)) if dest_is_dir else dest_dir
        return posixpath.join(dest_dir, posixpath.relpath(name, root))

    with open(fetched, "rb") as raw, open_tar(raw, limits) as src, open(out_path, "wb") as out:
        w = TarWriter(out, owner, plan.chmod)
        for member in src:
            name = clean(member.name)
            to = target(name)
            if to is None or (name in plan.sources and member.kind is Kind.DIR):
                continue
            if member.kind is Kind.HARDLINK:
                link = target(clean(member.linkname))
                if link is None:
                    continue
                member.linkname = link.lstrip("/")
            w.add_member(member, src, to)
        w.close()
