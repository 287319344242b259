"""The ``ember`` command line, on :mod:`ember.sdk` (argparse and the stdlib: it starts in tens of ms).

Every API command takes ``--json`` (the daemon's JSON instead of a table). Exit codes: the
command's own for ``exec``; 1 for an error of the daemon (``ember: <message>`` on stderr); 2 for
a usage error. Anything a tenant or a guest chose (names, tags, log lines) is shown escaped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ember.config import Settings
from ember.sdk import types as t
from ember.sdk.client import Client
from ember.sdk.core import IdlePolicy
from ember.sdk.errors import EmberError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (2.5 ms of the CLI's start)
if TYPE_CHECKING:
    from typing import Any, NoReturn

CHUNK = 1024 * 1024
QUOTAS = (
    "max_running_vms", "max_running_vcpus", "max_running_memory_mib", "max_suspended_vms", "max_images",
    "max_storage_bytes", "max_concurrent_builds",
)  # fmt: skip
Args = argparse.Namespace


def shown(text: str, *, lines: bool = False) -> str:
    """Text a tenant or a guest chose, made safe for a terminal: control and format characters (ESC,
    CR, backspace, bidi overrides...) appear escaped, never act. ``lines`` keeps newlines and tabs."""
    kept = "\n\t" if lines else ""
    return "".join(
        c if c in kept or unicodedata.category(c) not in ("Cc", "Cf") else c.encode("unicode_escape").decode()
        for c in text
    )


def fail(message: str, code: int = 1) -> NoReturn:
    print(f"ember: {shown(message, lines=True)}", file=sys.stderr, flush=True)
    sys.exit(code)


def out(line: str = "") -> None:
    print(line)


def err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def dump(value: Any) -> None:
    """Machine output: a typed result's (or a list's) JSON as the daemon sent it."""
    if isinstance(value, list):
        value = [getattr(v, "raw", v) for v in value]
    print(json.dumps(getattr(value, "raw", value), indent=2))


def pairs(items: Sequence[str] | None, flag: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"{flag} wants KEY=VALUE, not {item!r}", 2)
        result[key] = value
    return result


def payload_arg(value: str | None) -> str | None:
    """``--payload``: the text itself, or ``@FILE`` for a file's (UTF-8) content."""
    if value is None or not value.startswith("@"):
        return value
    try:
        with open(value[1:], "rb") as f:
            return f.read(1 << 20).decode()
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"--payload {value}: cannot read it as UTF-8 text ({exc})", 2)


def table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        out("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


# ---- VMs -----------------------------------------------------------------------------------


def ensure_base(c: Client, *, quiet: bool = False) -> None:
    c.images.prepare("debian", on_progress=None if quiet else lambda msg: err(f"[debian] {shown(msg)}"))


def cmd_run(c: Client, a: Args) -> None:
    if a.image == "debian":
        ensure_base(c, quiet=a.json)
    vm = c.vms.run(
        a.image, version=a.version, memory_mib=a.memory, vcpus=a.vcpus, env=pairs(a.env, "--env"),
        tags=pairs(a.tag, "--tag"), client_token=a.client_token, run_payload=payload_arg(a.payload),
        idle=IdlePolicy(timeout_s=a.idle_timeout, auto_resume=a.auto_resume, suspended_ttl_s=a.suspended_ttl,
                        max_duration_s=a.max_duration, max_duration_running_only=a.max_duration_running_only),
        egress=a.egress, allow=a.allow,
    )  # fmt: skip
    dump(vm) if a.json else out(vm.id)


def cmd_ps(c: Client, a: Args) -> None:
    state, image, tags = a.state, a.image, {}
    for item in a.filter or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--filter wants tag=KEY=VALUE, state=STATE, image=IMAGE or KEY=VALUE (a tag), not {item!r}", 2)
        if key == "state":
            state = value
        elif key == "image":
            image = value
        elif key == "tag":
            tags.update(pairs([value], "--filter tag="))
        else:
            tags[key] = value
    vms = c.vms.list(state=state, image=image, tags=tags, all=a.all, tenant=a.tenant)
    if a.json:
        return dump(vms)
    rows = [
        [shown(v.id), v.state, shown(v.image), v.accelerator.name, v.created_at,
         shown(",".join(f"{k}={val}" for k, val in sorted(v.tags.items())))]
        for v in vms
    ]  # fmt: skip
    table(rows, ["ID", "STATE", "IMAGE", "ACCEL", "CREATED", "TAGS"])


def cmd_inspect(c: Client, a: Args) -> None:
    dump(c.vms.get(a.vm_id))


def cmd_rm(c: Client, a: Args) -> None:
    for vm_id in a.vm_ids:
        c.vms.remove(vm_id)
        out(json.dumps({"id": vm_id, "removed": True}) if a.json else vm_id)


def cmd_suspend(c: Client, a: Args) -> None:
    t = c.vms.suspend(a.vm_id)
    if a.json:
        return dump(t)
    out(f"{a.vm_id} suspended in {t.elapsed_ms:.0f} ms ({t.snapshot_bytes / 2**20:.1f} MiB saved)")


def cmd_resume(c: Client, a: Args) -> None:
    t = c.vms.resume(a.vm_id)
    dump(t) if a.json else out(f"{a.vm_id} resumed in {t.elapsed_ms:.0f} ms")


def cmd_snapshot(c: Client, a: Args) -> None:
    image = c.vms.snapshot(a.vm_id, a.name, client_token=a.client_token)
    dump(image) if a.json else out(shown(image.name))


def cmd_events(c: Client, a: Args) -> None:
    events = c.vms.events(a.vm_id)
    if a.json:
        return dump(events)
    rows = [[str(e.id), e.at, e.from_state or "-", e.to_state, e.reason, shown(e.actor), shown(e.message)]
            for e in events]  # fmt: skip
    table(rows, ["ID", "AT", "FROM", "TO", "REASON", "ACTOR", "MESSAGE"])


def _stdin_chunks() -> Iterator[bytes]:
    while chunk := os.read(sys.stdin.fileno(), CHUNK):  # what is there now: a pipe or a terminal line
        yield chunk


def cmd_exec(c: Client, a: Args) -> None:
    argv = a.argv[1:] if a.argv[:1] == ["--"] else a.argv
    if not argv:
        fail("usage: ember exec [OPTIONS] VM_ID [--] COMMAND [ARG...]", 2)
    if a.detach:
        if a.stdin or a.timeout:
            fail("--detach takes neither -i nor --timeout (stop it with 'ember kill')", 2)
        proc = c.vms.start_process(a.vm_id, argv, env=pairs(a.env, "--env"), cwd=a.workdir, user=a.user)
        return dump(proc) if a.json else out(str(proc.pid))
    events = c.vms.exec_events(
        a.vm_id, argv, env=pairs(a.env, "--env"), cwd=a.workdir, user=a.user, timeout_s=a.timeout,
        stdin=_stdin_chunks() if a.stdin else None,
    )  # fmt: skip
    for event in events:
        if isinstance(event, t.ExecOutput):
            if a.json:
                out(json.dumps({"stream": event.stream, "data": event.data.decode(errors="replace")}))
                continue
            stream = sys.stdout.buffer if event.stream == "stdout" else sys.stderr.buffer
            stream.write(event.data)
            stream.flush()
        elif isinstance(event, t.ExecExit):
            if a.json:
                out(json.dumps({"exit_code": event.exit_code, "signal": event.signal, "timed_out": event.timed_out}))
            if event.timed_out:
                fail(f"command timed out after {a.timeout:g} s and was killed", 124)
            sys.exit(128 + event.signal if event.signal else event.exit_code)
    fail("lost the exec stream before the command finished", 255)


def cmd_shell(c: Client, a: Args) -> None:
    from ember.cliterm import run_shell  # termios, tty, select: only for a shell

    argv = a.argv[1:] if a.argv[:1] == ["--"] else a.argv
    sys.exit(run_shell(c, a.vm_id, argv, user=a.user, cwd=a.workdir))


def cmd_ps_guest(c: Client, a: Args) -> None:
    procs = c.vms.processes(a.vm_id)
    if a.json:
        return dump(procs)
    rows = [[str(p.pid), "running" if p.running else _ended(p.exit_code, p.signal), p.started_at, shown(p.command)]
            for p in procs]  # fmt: skip
    table(rows, ["PID", "STATUS", "STARTED", "COMMAND"])


def _ended(code: int | None, signal: int | None) -> str:
    return f"killed by signal {signal}" if signal else f"exited {code}"


def cmd_kill(c: Client, a: Args) -> None:
    c.vms.kill(a.vm_id, a.pid, int(a.signal) if a.signal.isascii() and a.signal.isdigit() else a.signal)


def _split_remote(spec: str) -> tuple[str, str] | None:
    """VM_ID:PATH (a relative PATH is under the image's WORKDIR)."""
    vm_id, sep, path = spec.partition(":")
    if sep and vm_id.startswith("vm-") and path:
        return vm_id, path
    return None


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def cmd_cp(c: Client, a: Args) -> None:
    remote_src, remote_dst = _split_remote(a.src), _split_remote(a.dst)
    if remote_dst and not remote_src:
        local = Path(a.src)
        if not local.is_file():
            fail(f"{a.src} is not a regular file")
        vm_id, path = remote_dst
        if path.endswith("/"):
            path += local.name
        n = c.files.write(vm_id, path, _file_chunks(local), mode=local.stat().st_mode & 0o7777, user=a.user)
        where = f"{vm_id}:{path}"
    elif remote_src and not remote_dst:
        vm_id, path = remote_src
        target = Path(a.dst)
        if target.is_dir():
            target = target / Path(path).name
        n = c.files.read_to(vm_id, path, target)
        where = str(target)
    else:
        fail("exactly one side must be VM_ID:PATH", 2)
    out(json.dumps({"bytes": n, "to": where})) if a.json else err(f"copied {n} bytes to {shown(where)}")


def cmd_ls(c: Client, a: Args) -> None:
    remote = _split_remote(a.spec)
    if remote is None:
        fail("usage: ember ls VM_ID:DIR", 2)
    listing = c.files.ls(*remote)
    if a.json:
        return dump(listing)
    import stat

    for e in listing.entries:
        out(f"{stat.filemode(e.mode)} {e.size:>12} {shown(e.name)}")
    if listing.truncated:
        err(f"ember: only the first {len(listing.entries)} entries are listed (EMBER_LS_MAX_ENTRIES)")


def cmd_logs(c: Client, a: Args) -> None:
    import codecs

    text = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for event in c.vms.logs(a.vm_id, follow=a.follow, tail=a.tail):
        if isinstance(event, t.LogSkipped):
            if a.json:
                out(json.dumps({"offset": event.offset, "skipped": event.skipped}))
            else:
                err(f"ember: ... {event.skipped} bytes of the log skipped (overwritten before they were read) ...")
        elif a.json:
            out(json.dumps({"offset": event.offset, "data": event.data.decode(errors="replace")}))
        else:
            sys.stdout.write(shown(text.decode(event.data), lines=True))
            sys.stdout.flush()


# ---- images --------------------------------------------------------------------------------


def cmd_image_ls(c: Client, a: Args) -> None:
    ensure_base(c, quiet=a.json)
    images = c.images.list()
    if a.json:
        return dump(images)
    out(f"{'NAME':<24} {'STATE':<14} {'DISK':>10} {'MEMORY':>10} CREATED")
    for i in images:
        out(f"{shown(i.name):<24} {i.state:<14} {i.disk_bytes / 2**20:>8.1f}Mi {i.memory_bytes / 2**20:>8.0f}Mi "
            f"{i.created_at}")  # fmt: skip


def cmd_image_build(c: Client, a: Args) -> None:
    def log(line: str) -> None:
        if a.json:
            out(json.dumps({"log": line}))
        else:
            err(shown(line))

    build = c.images.build(
        a.context, name=a.name, dockerfile=a.file, build_args=pairs(a.build_arg, "--build-arg"), target=a.target,
        ready_cmd=a.ready_cmd, ready_timeout=a.ready_timeout, no_cache=a.no_cache, network=not a.no_network,
        host_ca_certs=a.host_ca_certs, client_token=a.client_token, on_log=log,
    )  # fmt: skip
    if a.json:
        out(json.dumps({"build": build.raw}))
    if not build.ok:
        fail(f"{build.name} {build.state}: {build.error}")
    if not a.json:
        out(shown(build.name))


def cmd_image_inspect(c: Client, a: Args) -> None:
    dump(c.images.get(a.name))


def cmd_image_logs(c: Client, a: Args) -> None:
    text = c.images.logs(a.name, tail=a.tail)
    out(json.dumps({"log": text})) if a.json else sys.stdout.write(shown(text, lines=True))


def cmd_image_rm(c: Client, a: Args) -> None:
    c.images.remove(a.name, all_versions=a.all)
    if a.json:
        out(json.dumps({"name": a.name, "removed": True}))


# ---- tenants, keys, webhooks, usage ------------------------------------------------------


def _quotas(a: Args) -> dict[str, int]:
    return {q: getattr(a, q) for q in QUOTAS if getattr(a, q) is not None}


def _tenant_table(tenants: list[Any]) -> None:
    rows = [[shown(t.name), t.account_id, t.created_at,
             " ".join(f"{k}={v}" for k, v in sorted(t.quotas.items()))] for t in tenants]  # fmt: skip
    table(rows, ["NAME", "ACCOUNT", "CREATED", "QUOTAS"])


def cmd_tenant_create(c: Client, a: Args) -> None:
    t = c.tenants.create(a.name, quotas=_quotas(a) or None)
    dump(t) if a.json else out(shown(t.name))


def cmd_tenant_ls(c: Client, a: Args) -> None:
    tenants = c.tenants.list()
    dump(tenants) if a.json else _tenant_table(tenants)


def cmd_tenant_set(c: Client, a: Args) -> None:
    quotas = _quotas(a)
    if not quotas:
        fail(f"name at least one quota: {' '.join('--' + q.replace('_', '-') for q in QUOTAS)}", 2)
    t = c.tenants.set_quotas(a.name, quotas)
    dump(t) if a.json else _tenant_table([t])


def cmd_key_create(c: Client, a: Args) -> None:
    key = c.keys.create(tenant=a.tenant, name=a.name, client_token=a.client_token)
    dump(key)  # the secrets are shown this once: always the whole JSON


def cmd_key_ls(c: Client, a: Args) -> None:
    keys = c.keys.list(tenant=a.tenant)
    if a.json:
        return dump(keys)
    rows = [[k.key_id, shown(k.tenant or "(admin)"), shown(k.name), k.access_key_id, k.created_at,
             k.revoked_at or "-"] for k in keys]  # fmt: skip
    table(rows, ["KEY_ID", "TENANT", "NAME", "ACCESS_KEY_ID", "CREATED", "REVOKED"])


def cmd_key_revoke(c: Client, a: Args) -> None:
    c.keys.revoke(a.key_id)
    out(json.dumps({"key_id": a.key_id, "revoked": True}) if a.json else a.key_id)


def cmd_token_create(c: Client, a: Args) -> None:
    if a.shell and a.port is not None:
        fail("a shell token opens no port: give --shell or --port, not both", 2)
    token = c.vms.shell_token(a.vm_id, minutes=a.minutes) if a.shell else c.vms.auth_token(
        a.vm_id, ports=a.port or "8080", minutes=a.minutes)  # fmt: skip
    dump(token) if a.json else out(token.token)


def cmd_webhook_create(c: Client, a: Args) -> None:
    dump(c.webhooks.create(a.url, client_token=a.client_token))  # the secret is shown this once


def cmd_webhook_ls(c: Client, a: Args) -> None:
    hooks = c.webhooks.list()
    dump(hooks) if a.json else table([[h.id, shown(h.url), h.created_at] for h in hooks], ["ID", "URL", "CREATED"])


def cmd_webhook_rm(c: Client, a: Args) -> None:
    c.webhooks.delete(a.webhook_id)
    out(json.dumps({"id": a.webhook_id, "removed": True}) if a.json else a.webhook_id)


def cmd_webhook_deliveries(c: Client, a: Args) -> None:
    rows = c.webhooks.deliveries(a.webhook_id, limit=a.limit)
    if a.json:
        return dump(rows)
    table(
        [[str(d.id), str(d.event_id), str(d.attempt), d.at, d.state, str(d.status or "-"), f"{d.duration_ms:.0f}",
          shown(d.error)] for d in rows],
        ["ID", "EVENT", "ATTEMPT", "AT", "STATE", "STATUS", "MS", "ERROR"],
    )  # fmt: skip


def cmd_usage(c: Client, a: Args) -> None:
    u = c.usage(tenant=a.tenant, since=a.since, until=a.until)
    if a.json:
        return dump(u)
    out(f"usage from {u.since} to {u.until}")
    table(
        [[shown(t.tenant), f"{t.running_vcpu_seconds:.0f}", f"{t.running_gib_seconds:.0f}",
          f"{t.suspended_seconds:.0f}", f"{t.snapshot_gib_hours:.3f}", f"{t.image_gib_hours:.3f}", str(t.builds),
          f"{t.build_seconds:.0f}"] for t in u.tenants],
        ["TENANT", "VCPU_S", "GIB_S", "SUSPENDED_S", "SNAPSHOT_GIB_H", "IMAGE_GIB_H", "BUILDS", "BUILD_S"],
    )  # fmt: skip


def cmd_whoami(c: Client, a: Args) -> None:
    w = c.whoami()
    dump(w) if a.json else out(f"tenant {shown(w.tenant)}{' (admin)' if w.admin else ''} key {w.key_id or 'root'}")


# ---- the daemon, the demo ------------------------------------------------------------------


def cmd_serve(a: Args) -> None:
    import asyncio
    import logging

    from ember.daemon import serve as run_daemon
    from ember.errors import EmberError as DaemonError

    logging.basicConfig(
        level=logging.DEBUG if a.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(run_daemon(Settings.from_env()))
    except DaemonError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        pass


def cmd_demo(_: Args) -> None:
    from ember.demo import run_demo

    sys.exit(run_demo())


# ---- the parser ----------------------------------------------------------------------------


class _Unused:
    """Stands in for the parser of a command this run does not use."""

    def add_argument(self, *_: Any, **__: Any) -> None:
        pass

    def add_subparsers(self, **_: Any) -> _Unused:
        return self


class _Formatter(argparse.HelpFormatter):
    """argparse's help formatter at the terminal's width, found once: argparse's own way imports
    shutil (2 ms) and asks the terminal for every argument of every parser."""

    columns = 0

    def __init__(self, prog: str) -> None:
        if not _Formatter.columns:
            _Formatter.columns = _terminal_columns()
        super().__init__(prog, width=_Formatter.columns - 2)


def _terminal_columns() -> int:
    """As shutil.get_terminal_size().columns: COLUMNS, else stdout's terminal, else 80."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(1).columns
        except (ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


def parser(words: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The CLI's parser. With ``words`` (the command line's leading words), only the command they
    name gets a parser, with its options and arguments; every other command is only listed in the
    help (a parser costs argparse about 0.2 ms, and ``ember ps`` should start in tens of ms).
    Words that name no command get the whole parser (its error lists every command)."""
    top = argparse.ArgumentParser(prog="ember", description="Ember: stateful micro-VMs for untrusted code.",
                                  formatter_class=_Formatter)  # fmt: skip
    common = argparse.ArgumentParser(add_help=False, formatter_class=_Formatter)
    common.add_argument("--json", action="store_true", help="print the daemon's JSON instead of a table")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    named = [False, False]  # words[0] named a command; words[1] a command of that group
    grouped = False  # words[0] named a group of commands (image, tenant, key, webhook)

    def command(group: Any, name: str, fn: Callable[..., None] | None, text: str, *, api: bool = True) -> Any:
        nonlocal grouped
        if isinstance(group, _Unused):
            return group
        depth = 0 if group is sub else 1
        grouped |= depth == 1
        if words is not None and (len(words) <= depth or words[depth] != name):
            group._choices_actions.append(group._ChoicesPseudoAction(name, (), text))  # only listed (argparse's
            return _Unused()  # own entry for a parser's help, without the parser)
        named[depth] = True
        p = group.add_parser(name, help=text, description=text, parents=[common] if api else [],
                             formatter_class=_Formatter)  # fmt: skip
        p.set_defaults(fn=fn, api=api)
        return p

    p = command(sub, "serve", cmd_serve, "Run the daemon (as root) on EMBER_SOCKET and, if set, EMBER_LISTEN.",
                api=False)  # fmt: skip
    p.add_argument("-v", "--verbose", action="store_true")
    command(sub, "demo", cmd_demo, "Ember's main job on its embedded defaults (see ember/demo.py).", api=False)

    p = command(sub, "run", cmd_run, "Launch a VM from IMAGE's snapshot; prints its id.")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--version", type=int, help="the image version (default: the newest)")
    p.add_argument("--memory", type=int, metavar="MIB", help="guest memory (at least the image's)")
    p.add_argument("--vcpus", type=int, metavar="N", help="guest vCPUs (at least the image's)")
    p.add_argument("-e", "--env", action="append", metavar="K=V", help="environment variable (repeatable)")
    p.add_argument("--tag", action="append", metavar="K=V", help="metadata tag (repeatable)")
    p.add_argument("--client-token", metavar="T", help="idempotency token: a retry returns the same VM")
    p.add_argument("--idle-timeout", type=int, metavar="S", help="suspend it once idle this many seconds (>= 60)")
    p.add_argument("--auto-resume", action="store_true", help="exec, files, shell and ingress resume it when suspended")
    p.add_argument("--suspended-ttl", type=int, metavar="S", help="terminate it S s after it suspends (0: on idle)")
    p.add_argument("--max-duration", type=int, metavar="S", help="terminate it S seconds after launch")
    p.add_argument("--max-duration-running-only", action="store_true", help="--max-duration counts running time only")
    p.add_argument("--payload", metavar="@FILE|TEXT", help="the app's run hook body (at most 16 KiB)")
    p.add_argument("--egress", choices=("none", "internet", "allow"), help="network: none (default), public "
                   "addresses, or only --allow")  # fmt: skip
    p.add_argument("--allow", action="append", metavar="CIDR_OR_DOMAIN", help="with --egress allow (repeatable)")

    p = command(sub, "exec", cmd_exec, "Run a command in a VM, streaming its output; exits with its exit code.")
    p.add_argument("-e", "--env", action="append", metavar="K=V", help="environment variable (repeatable)")
    p.add_argument("-w", "--workdir", default="", help="working directory in the guest")
    p.add_argument("-u", "--user", default="", help="user name or uid[:gid] in the guest")
    p.add_argument("-i", "--stdin", action="store_true", help="send this process's stdin to the command")
    p.add_argument("-t", "--timeout", type=float, default=0, help="kill the command after this many seconds")
    p.add_argument("-d", "--detach", action="store_true",
                   help="start it in the background (output discarded); prints its pid (ps-guest, kill)")  # fmt: skip
    p.add_argument("vm_id", metavar="VM_ID")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="COMMAND", help="the command and its arguments")

    p = command(sub, "shell", cmd_shell, "Open a terminal in a VM (its user's login shell, or COMMAND).")
    p.add_argument("-w", "--workdir", default="", help="working directory in the guest")
    p.add_argument("-u", "--user", default="", help="user name or uid[:gid] in the guest")
    p.add_argument("vm_id", metavar="VM_ID")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="COMMAND", help="the command and its arguments")
    p = command(sub, "ps-guest", cmd_ps_guest, "List a VM's background processes (started with exec --detach).")
    p.add_argument("vm_id", metavar="VM_ID")
    p = command(sub, "kill", cmd_kill, "Signal a background process of a VM (started with exec --detach).")
    p.add_argument("vm_id", metavar="VM_ID")
    p.add_argument("pid", type=int, metavar="PID")
    p.add_argument("-s", "--signal", default="TERM", help="a name (TERM, KILL, INT, HUP...) or number (default TERM)")

    p = command(sub, "cp", cmd_cp, "Copy a file: 'ember cp ./f ID:/path' or 'ember cp ID:/path ./f'.")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("-u", "--user", default=None,
                   help="owner of a file copied into the VM (default: the image's USER, else root)")  # fmt: skip
    p = command(sub, "logs", cmd_logs, "Print the output of a VM's app (its image's ENTRYPOINT/CMD).")
    p.add_argument("vm_id", metavar="VM_ID")
    p.add_argument("-f", "--follow", action="store_true", help="go on printing new output")
    p.add_argument("--tail", type=int, default=None, metavar="BYTES", help="only the last BYTES of the log")
    p = command(sub, "ls", cmd_ls, "List a directory in a VM.")
    p.add_argument("spec", metavar="ID:/DIR")
    for name, fn, text in (
        ("suspend", cmd_suspend, "Save a VM's memory, devices and disk; free its host resources."),
        ("resume", cmd_resume, "Bring a suspended VM back, every process and file as it was."),
        ("inspect", cmd_inspect, "Show a VM's state, image, accelerator, memory and timestamps (JSON)."),
        ("events", cmd_events, "Show a VM's state changes: when, from, to, why and by whom."),
    ):
        command(sub, name, fn, text).add_argument("vm_id", metavar="VM_ID")
    p = command(sub, "snapshot", cmd_snapshot, "Turn a running VM into a new image (it keeps running).")
    p.add_argument("vm_id", metavar="VM_ID")
    p.add_argument("--name", required=True, help="name of the new image")
    p.add_argument("--client-token", metavar="T", help="idempotency token")
    p = command(sub, "ps", cmd_ps, "List VMs.")
    p.add_argument("--filter", action="append", metavar="F",
                   help="tag=KEY=VALUE, KEY=VALUE (a tag), state=STATE or image=IMAGE (repeatable)")  # fmt: skip
    p.add_argument("--state", help="only VMs in this state (RUNNING, SUSPENDED, TERMINATED...)")
    p.add_argument("--image", help="only VMs of this image")
    p.add_argument("--all", action="store_true", help="include TERMINATED VMs")
    p.add_argument("--tenant", help="only this tenant's VMs (admins)")
    p = command(sub, "rm", cmd_rm, "Remove VMs and everything they use on the host.")
    p.add_argument("vm_ids", nargs="+", metavar="VM_ID")

    images = command(sub, "image", None, "Manage images.").add_subparsers(dest="sub", metavar="COMMAND", required=True)
    command(images, "ls", cmd_image_ls, "List images and builds (builds the built-in 'debian' the first time).")
    p = command(images, "build", cmd_image_build, "Build an image from CONTEXT/Dockerfile, snapshotted running.")
    p.add_argument("context", type=Path, metavar="CONTEXT")
    p.add_argument("--name", "-t", required=True, help="image name, optionally name:version (default: next version)")
    p.add_argument("--file", "-f", default="Dockerfile", help="Dockerfile path inside the context")
    p.add_argument("--build-arg", action="append", metavar="NAME=VALUE", help="a value for an ARG (repeatable)")
    p.add_argument("--target", default="", help="build this stage instead of the last")
    p.add_argument("--ready-cmd", default="", help="shell command that exits 0 once the app is ready")
    p.add_argument("--ready-timeout", type=float, default=120.0, help="seconds to wait for the app (default 120)")
    p.add_argument("--no-cache", action="store_true", help="run every step again")
    p.add_argument("--no-network", action="store_true", help="RUN steps get no network at all")
    p.add_argument("--host-ca-certs", action="store_true",
                   help="hand the host's CA bundle to RUN steps (TLS-inspecting proxies)")  # fmt: skip
    p.add_argument("--client-token", metavar="T", help="idempotency token")
    p = command(images, "inspect", cmd_image_inspect, "Show an image: state, sizes, config, build steps (JSON).")
    p.add_argument("name")
    p = command(images, "logs", cmd_image_logs, "Print an image's build log (its last --tail bytes).")
    p.add_argument("name")
    p.add_argument("--tail", type=int, default=1 << 20, help="bytes from the end of the log (default 1 MiB)")
    p = command(images, "rm", cmd_image_rm, "Remove an image version, e.g. myapp:2 (refused while VMs use it).")
    p.add_argument("name")
    p.add_argument("--all", action="store_true", help="remove every version of the repo NAME")

    tenants = command(sub, "tenant", None, "Manage tenants (admins).").add_subparsers(
        dest="sub", metavar="COMMAND", required=True
    )
    for name, fn, text in (
        ("create", cmd_tenant_create, "Create a tenant, optionally with quotas of its own."),
        ("set", cmd_tenant_set, "Set a tenant's quotas."),
    ):
        p = command(tenants, name, fn, text)
        p.add_argument("name", metavar="NAME")
        for quota in QUOTAS:
            p.add_argument("--" + quota.replace("_", "-"), dest=quota, type=int, metavar="N")
    command(tenants, "ls", cmd_tenant_ls, "List tenants and their quotas.")

    keys = command(sub, "key", None, "Manage API keys.").add_subparsers(dest="sub", metavar="COMMAND", required=True)
    p = command(keys, "create", cmd_key_create, "Create a key; prints its secrets, this once (JSON).")
    p.add_argument("--tenant", help="the tenant it acts for (admins; default: your own)")
    p.add_argument("--name", help="a label")
    p.add_argument("--client-token", metavar="T", help="idempotency token")
    p = command(keys, "ls", cmd_key_ls, "List keys (never their secrets).")
    p.add_argument("--tenant", help="only this tenant's keys (admins)")
    p = command(keys, "revoke", cmd_key_revoke, "Revoke a key: it stops working at once.")
    p.add_argument("key_id", metavar="KEY_ID")

    tokens = command(sub, "token", None, "Make VM auth tokens for the ingress, and shell tokens.").add_subparsers(
        dest="sub", metavar="COMMAND", required=True
    )
    p = command(tokens, "create", cmd_token_create, "Make a token for a VM's endpoint (X-Ember-Proxy-Auth).")
    p.add_argument("vm_id", metavar="ID")
    p.add_argument("--port", help='the guest ports it opens: 8080, 8000-8100 or "all" (default 8080)')
    p.add_argument("--shell", action="store_true", help="a shell token instead: it opens the VM's shell alone")
    p.add_argument("--minutes", type=int, default=10, help="its lifetime, 1-60 minutes (default 10)")

    hooks = command(sub, "webhook", None, "Manage webhooks (every VM event, signed).").add_subparsers(
        dest="sub", metavar="COMMAND", required=True
    )
    p = command(hooks, "create", cmd_webhook_create, "Register a webhook; prints its signing secret, this once.")
    p.add_argument("url", metavar="URL")
    p.add_argument("--client-token", metavar="T", help="idempotency token")
    command(hooks, "ls", cmd_webhook_ls, "List webhooks.")
    p = command(hooks, "rm", cmd_webhook_rm, "Remove a webhook.")
    p.add_argument("webhook_id", metavar="ID")
    p = command(hooks, "deliveries", cmd_webhook_deliveries, "Show a webhook's delivery log.")
    p.add_argument("webhook_id", metavar="ID")
    p.add_argument("--limit", type=int, help="newest N deliveries")

    p = command(sub, "usage", cmd_usage, "Usage per tenant: vCPU and GiB seconds, storage, builds.")
    p.add_argument("--tenant", help="only this tenant (admins)")
    p.add_argument("--since", metavar="ISO", help="start (ISO-8601 UTC)")
    p.add_argument("--until", metavar="ISO", help="end (ISO-8601 UTC)")
    command(sub, "whoami", cmd_whoami, "Show the tenant and key this client acts as.")
    if words and (not named[0] or (grouped and len(words) > 1 and not named[1])):
        return parser()
    return top


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    words = []
    for word in argv[:2]:
        if word.startswith("-"):
            break
        words.append(word)
    if not words and argv not in ([], ["-h"], ["--help"]):
        args = parser().parse_args(argv)  # options before the command (an error) or '--': the whole parser
    else:
        args = parser(words).parse_args(argv)
    if not args.api:
        args.fn(args)
        return
    try:
        with Client() as c:
            args.fn(c, args)
    except EmberError as exc:
        fail(str(exc))
    except ValueError as exc:  # a bad EMBER_URL or EMBER_* setting
        fail(str(exc), 2)
    except BrokenPipeError:
        sys.stderr.close()  # e.g. 'ember ps | head': the reader is gone
        sys.exit(1)
