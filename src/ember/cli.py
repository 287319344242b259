"""The ``ember`` command line: a thin client of the daemon's API."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import sys
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import httpx

from ember.client import ApiError, Call, Client, call_build, call_simple, context_tar
from ember.config import Settings
from ember.errors import EmberError

CHUNK = 1024 * 1024


def _client() -> Client:
    return Client(os.environ.get("EMBER_URL") or None)


def shown(text: str, *, lines: bool = False) -> str:
    """Text a tenant or a guest chose, made safe for a terminal: control and format characters (ESC,
    CR, backspace, bidi overrides...) appear escaped, never act. ``lines`` keeps newlines and tabs."""
    kept = "\n\t" if lines else ""
    return "".join(
        c if c in kept or unicodedata.category(c) not in ("Cc", "Cf") else c.encode("unicode_escape").decode()
        for c in text
    )


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"ember: {shown(message, lines=True)}", err=True)
    sys.exit(code)


class EmberGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ApiError as exc:
            _fail(str(exc))
        except httpx.TransportError as exc:
            sock = Settings.from_env().socket_path
            _fail(f"cannot reach the Ember daemon at {sock} ({exc}); start it with 'ember serve'")


@click.group(cls=EmberGroup)
def main() -> None:
    """Ember: stateful micro-VMs for untrusted code."""


@main.command()
@click.option("-v", "--verbose", is_flag=True)
def serve(verbose: bool) -> None:
    """Run the daemon (as root) on EMBER_SOCKET and, if set, EMBER_LISTEN."""
    from ember.daemon import serve as run_daemon

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(run_daemon(Settings.from_env()))
    except EmberError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        pass


@main.group()
def image() -> None:
    """Manage images."""


def ensure_base(client: Client, quiet: bool = False) -> None:
    for event in client.stream_events(call_simple("POST", "/v1/images/debian/prepare")):
        if "progress" in event and not quiet:
            click.echo(f"[debian] {event['progress']}", err=True)


@image.command("ls")
def image_ls() -> None:
    """List images and builds (builds the built-in 'debian' image the first time)."""
    with _client() as c:
        ensure_base(c)
        rows = c.send(call_simple("GET", "/v1/images"))
    click.echo(f"{'NAME':<24} {'STATE':<14} {'DISK':>10} {'MEMORY':>10} CREATED")
    for r in rows:
        click.echo(
            f"{shown(r['name']):<24} {r.get('state', 'CREATED'):<14} {r.get('disk_bytes', 0) / 2**20:>8.1f}Mi "
            f"{r.get('memory_bytes', 0) / 2**20:>8.0f}Mi {r['created_at']}"
        )


@image.command("build")
@click.argument("context", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--name", "-t", required=True, help="image name, optionally name:tag (default tag: next version)")
@click.option("--file", "-f", "dockerfile", default="Dockerfile", help="Dockerfile path inside the context")
@click.option("--build-arg", multiple=True, help="NAME=VALUE for an ARG (repeatable)")
@click.option("--target", default="", help="build this stage instead of the last")
@click.option("--ready-cmd", default="", help="shell command that exits 0 once the app is ready")
@click.option("--ready-timeout", default=120.0, show_default=True, help="seconds to wait for the app to be ready")
@click.option("--no-cache", is_flag=True, help="run every step again")
@click.option("--no-network", is_flag=True, help="RUN steps get no network at all")
@click.option("--host-ca-certs", is_flag=True, help="hand the host's CA bundle to RUN steps (TLS-inspecting proxies)")
def image_build(
    context: Path, name: str, dockerfile: str, build_arg: tuple[str, ...], target: str, ready_cmd: str,
    ready_timeout: float, no_cache: bool, no_network: bool, host_ca_certs: bool,
) -> None:  # fmt: skip
    """Build an image from CONTEXT/Dockerfile: the app is started and snapshotted running."""
    try:
        tar = context_tar(context, dockerfile)
    except EmberError as exc:
        _fail(str(exc))
    call = call_build(
        name, tar, dockerfile, build_arg=list(build_arg), target=target, ready_cmd=ready_cmd,
        ready_timeout=ready_timeout, no_cache=no_cache, network=not no_network, host_ca_certs=host_ca_certs,
    )  # fmt: skip
    with _client() as c:
        for event in c.stream_events(call):
            if "log" in event:
                click.echo(shown(event["log"]), err=True)
            elif "build" in event:
                build = event["build"]
                if build["state"] != "CREATED":
                    _fail(f"{build['name']} CREATE_FAILED: {build['error']}")
                click.echo(shown(build["name"]))


@image.command("inspect")
@click.argument("name")
def image_inspect(name: str) -> None:
    """Show an image: state, sizes, Dockerfile config, build time per step (JSON)."""
    with _client() as c:
        click.echo(json.dumps(c.send(call_simple("GET", f"/v1/images/{name}")), indent=2))


@image.command("logs")
@click.argument("name")
@click.option("--tail", type=click.IntRange(1, 64 << 20), default=1 << 20, show_default=True,
              help="bytes from the end of the log")  # fmt: skip
def image_logs(name: str, tail: int) -> None:
    """Print an image's build log (its last --tail bytes)."""
    with _client() as c:
        text = c.text(call_simple("GET", f"/v1/images/{name}/logs", tail=tail))
        click.echo(shown(text, lines=True), nl=False)


@image.command("rm")
@click.argument("name")
@click.option("--all", "every_version", is_flag=True, help="remove every version of the repo NAME")
def image_rm(name: str, every_version: bool) -> None:
    """Remove an image version, e.g. myapp:2 (refused while VMs use it)."""
    with _client() as c:
        c.send(call_simple("DELETE", f"/v1/images/{name}", **({"all": "true"} if every_version else {})))


@main.command()
@click.argument("image_name", metavar="IMAGE")
def run(image_name: str) -> None:
    """Launch a VM from IMAGE's snapshot; prints its id."""
    with _client() as c:
        if image_name == "debian":
            ensure_base(c)
        vm = c.run(image_name)
    click.echo(vm["id"])


@main.command(name="exec", context_settings={"ignore_unknown_options": True})
@click.argument("vm_id")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("-e", "--env", multiple=True, help="KEY=VALUE (repeatable)")
@click.option("-w", "--workdir", default="", help="working directory in the guest")
@click.option("-u", "--user", default="", help="user name or uid[:gid] in the guest")
@click.option("-i", "--stdin", "use_stdin", is_flag=True, help="send this process's stdin to the command")
@click.option("-t", "--timeout", type=float, default=0, help="kill the command after this many seconds")
def exec_cmd(
    vm_id: str, argv: tuple[str, ...], env: tuple[str, ...], workdir: str, user: str, use_stdin: bool, timeout: float
) -> None:
    """Run a command in a VM, streaming its output; exits with its exit code."""
    envs = {}
    for item in env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail(f"--env wants KEY=VALUE, not {item!r}", 2)
        envs[key] = value
    stdin = _stdin_chunks() if use_stdin else None  # streamed as the command reads it
    with _client() as c:
        for event in c.exec_events(vm_id, list(argv), stdin=stdin, env=envs, cwd=workdir, user=user, timeout_s=timeout):
            if "stream" in event:
                out = sys.stdout.buffer if event["stream"] == "stdout" else sys.stderr.buffer
                out.write(event["data"])
                out.flush()
            elif "exit_code" in event:
                if event["timed_out"]:
                    _fail(f"command timed out after {timeout:g} s and was killed", 124)
                code = event["exit_code"]
                sys.exit(128 + event["signal"] if event["signal"] else code)
    _fail("lost the exec stream before the command finished", 255)


def _stdin_chunks() -> Iterator[bytes]:
    while chunk := os.read(sys.stdin.fileno(), CHUNK):  # what is there now: a pipe or a terminal line
        yield chunk


def _split_remote(spec: str) -> tuple[str, str] | None:
    vm_id, sep, path = spec.partition(":")
    if sep and vm_id.startswith("vm-") and path.startswith("/"):
        return vm_id, path
    return None


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


@main.command()
@click.argument("src")
@click.argument("dst")
def cp(src: str, dst: str) -> None:
    """Copy a file: 'ember cp ./f ID:/path' or 'ember cp ID:/path ./f'."""
    remote_src, remote_dst = _split_remote(src), _split_remote(dst)
    with _client() as c:
        if remote_dst and not remote_src:
            local = Path(src)
            if not local.is_file():
                _fail(f"{src} is not a regular file")
            vm_id, path = remote_dst
            if path.endswith("/"):
                path += local.name
            mode = stat.S_IMODE(local.stat().st_mode)
            r = c.put_file(vm_id, path, _file_chunks(local), mode=mode)
            click.echo(f"copied {r['bytes']} bytes to {vm_id}:{path}", err=True)
        elif remote_src and not remote_dst:
            vm_id, path = remote_src
            out = Path(dst)
            if out.is_dir():
                out = out / Path(path).name
            n = c.get_file(vm_id, path, out)
            click.echo(f"copied {n} bytes to {out}", err=True)
        else:
            _fail("exactly one side must be VM_ID:/absolute/path")


@main.command(name="ls")
@click.argument("spec", metavar="ID:/DIR")
def ls_cmd(spec: str) -> None:
    """List a directory in a VM."""
    remote = _split_remote(spec)
    if remote is None:
        _fail("usage: ember ls VM_ID:/absolute/dir", 2)
        return
    with _client() as c:
        listing = c.send(call_simple("GET", f"/v1/vms/{remote[0]}/ls", path=remote[1]))
    for r in listing["entries"]:
        click.echo(f"{stat.filemode(r['mode'])} {r['size']:>12} {shown(r['name'])}")
    if listing["truncated"]:
        shown_n = len(listing["entries"])
        click.echo(f"ember: only the first {shown_n} entries are listed (EMBER_LS_MAX_ENTRIES)", err=True)


def _lifecycle(action: str, vm_id: str) -> dict[str, Any]:
    with _client() as c:
        result: dict[str, Any] = c.send(call_simple("POST", f"/v1/vms/{vm_id}/{action}"))
    return result


@main.command()
@click.argument("vm_id")
def suspend(vm_id: str) -> None:
    """Save a VM's memory, devices and disk; free its host resources."""
    r = _lifecycle("suspend", vm_id)
    click.echo(f"{vm_id} suspended in {r['elapsed_ms']:.0f} ms ({r['snapshot_bytes'] / 2**20:.1f} MiB saved)")


@main.command()
@click.argument("vm_id")
def resume(vm_id: str) -> None:
    """Bring a suspended VM back, every process and file as it was."""
    r = _lifecycle("resume", vm_id)
    click.echo(f"{vm_id} resumed in {r['elapsed_ms']:.0f} ms")


@main.command()
@click.argument("vm_id")
@click.option("--name", required=True, help="name of the new image")
def snapshot(vm_id: str, name: str) -> None:
    """Turn a running VM into a new image (it keeps running)."""
    with _client() as c:
        img = c.send(Call("POST", f"/v1/vms/{vm_id}/snapshot", json={"name": name}))
    click.echo(shown(img["name"]))


@main.command()
def ps() -> None:
    """List VMs."""
    with _client() as c:
        rows = c.send(call_simple("GET", "/v1/vms"))
    click.echo(f"{'ID':<16} {'STATE':<11} {'IMAGE':<16} {'ACCEL':<5} CREATED")
    for r in rows:
        click.echo(
            f"{shown(r['id']):<16} {r['state']:<11} {shown(r['image']):<16} {r['accelerator']['name']:<5} "
            f"{r['created_at']}"
        )


@main.command()
@click.argument("vm_id")
def inspect(vm_id: str) -> None:
    """Show a VM's state, image, accelerator, memory and timestamps (JSON)."""
    with _client() as c:
        click.echo(json.dumps(c.send(call_simple("GET", f"/v1/vms/{vm_id}")), indent=2))


@main.command()
@click.argument("vm_ids", nargs=-1, required=True)
def rm(vm_ids: tuple[str, ...]) -> None:
    """Remove VMs and everything they use on the host."""
    with _client() as c:
        for vm_id in vm_ids:
            c.send(call_simple("DELETE", f"/v1/vms/{vm_id}"))
            click.echo(vm_id)


@main.command()
def demo() -> None:
    """Ember's main job on its embedded defaults (see ember/demo.py)."""
    from ember.demo import run_demo

    sys.exit(run_demo())
