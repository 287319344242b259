"""Guest artifacts Ember injects into every VM: kernel, initramfs, agent.

The agent is compiled from ``agent.c`` (static, so it needs nothing from the
image) and packed with the virtio modules the cloud kernel lacks into a small
initramfs. Outputs are cached under ``<data>/guest/<hash>/`` keyed by the
agent source, the kernel and the module list, so they are rebuilt exactly when
one of those changes.
"""

from __future__ import annotations

import hashlib
import os
import platform
import stat
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ember.errors import HostSetupError
from ember.host.binaries import compile_static

# Loaded in dependency order by the agent's stage 1 (modules.dep adds the rest).
GUEST_MODULES = ("virtio_mmio", "virtio_blk", "virtio_console", "virtio_net")  # every VM has a NIC (ember.network)
# Image-build VMs also get Ember's tools (a static busybox: tar for COPY, ip, fsfreeze), kept outside
# the image being built.
BUILD_MODULES = GUEST_MODULES
BUSYBOX = Path("/bin/busybox")
BUILD_TOOL = "/ember/busybox"


@dataclass(frozen=True)
class GuestKernel:
    release: str
    image: Path
    modules: Path


@dataclass(frozen=True)
class GuestArtifacts:
    kernel: Path
    initramfs: Path
    agent: Path
    fingerprint: str
    build_initramfs: Path


def find_kernel(boot_dir: Path = Path("/boot"), modules_root: Path = Path("/lib/modules")) -> GuestKernel:
    """Pick the newest installed Debian cloud kernel (small, virtio-ready)."""
    candidates = sorted(boot_dir.glob("vmlinuz-*-cloud-amd64"))
    if not candidates:
        raise HostSetupError(
            "no guest kernel found in /boot: install one with "
            "'apt-get install linux-image-cloud-amd64' (scripts/install.sh does this)"
        )
    image = candidates[-1]
    release = image.name.removeprefix("vmlinuz-")
    modules = modules_root / release
    if not (modules / "modules.dep").exists():
        raise HostSetupError(f"modules for guest kernel {release} are missing under {modules}")
    return GuestKernel(release=release, image=image, modules=modules)


def resolve_modules(modules_dir: Path, wanted: tuple[str, ...]) -> list[Path]:
    """Module files for ``wanted`` and their dependencies, dependencies first."""
    deps: dict[str, list[str]] = {}
    paths: dict[str, str] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        target, _, rest = line.partition(":")
        name = Path(target).name.split(".ko")[0].replace("-", "_")
        paths[name] = target
        deps[name] = [Path(d).name.split(".ko")[0].replace("-", "_") for d in rest.split()]
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        if name not in paths:
            builtin = (modules_dir / "modules.builtin").read_text()
            if f"/{name}.ko" in builtin.replace("-", "_"):
                return
            raise HostSetupError(f"kernel module {name} not found for {modules_dir.name}")
        for dep in deps[name]:
            visit(dep)
        order.append(name)

    for name in wanted:
        visit(name)
    return [modules_dir / paths[name] for name in order]


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (name, mode, data) entries (mode includes type)."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        raw_name = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw_name), 0]
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + raw_name
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def _agent_source() -> bytes:
    return resources.files("ember.guest").joinpath("agent.c").read_bytes()


def _initramfs(out: Path, agent: bytes, modules: list[Path], tools: dict[str, bytes]) -> None:
    entries: list[tuple[str, int, bytes]] = [
        (d, stat.S_IFDIR | 0o755, b"") for d in ("dev", "proc", "newroot", "ember", "ember/mods")
    ]
    listing = []
    for mod in modules:
        entries.append((f"ember/mods/{mod.name}", stat.S_IFREG | 0o644, mod.read_bytes()))
        listing.append(f"/ember/mods/{mod.name}")
    entries.append(("ember/modules", stat.S_IFREG | 0o644, ("\n".join(listing) + "\n").encode()))
    entries += [(name.lstrip("/"), stat.S_IFREG | 0o755, data) for name, data in tools.items()]
    entries.append(("init", stat.S_IFREG | 0o755, agent))
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(_cpio_newc(entries))
    os.replace(tmp, out)


def _static_busybox() -> bytes:
    try:
        data = BUSYBOX.read_bytes()
    except OSError:
        data = b""
    if not data.startswith(b"\x7fELF") or b"/lib64/ld-linux" in data[:4096]:
        raise HostSetupError(
            f"{BUSYBOX} is missing or not static: 'apt-get install busybox-static' (scripts/install.sh does this)"
        )
    return data


def ensure_artifacts(guest_dir: Path) -> GuestArtifacts:
    """Build (or reuse) the agent and initramfs for the installed guest kernel."""
    if platform.machine() != "x86_64":
        raise HostSetupError(f"Ember's guests are x86_64; this host is {platform.machine()}")
    kernel = find_kernel()
    modules = resolve_modules(kernel.modules, GUEST_MODULES)
    build_modules = resolve_modules(kernel.modules, BUILD_MODULES)
    busybox = _static_busybox()
    source = _agent_source()
    digest = hashlib.sha256(source)
    digest.update(kernel.release.encode())
    for mod in modules:
        digest.update(mod.name.encode())
    fingerprint = digest.hexdigest()[:16]
    target = guest_dir / fingerprint
    initramfs = target / "initramfs.cpio"
    agent = target / "ember-agent"
    if not initramfs.exists():
        target.mkdir(parents=True, exist_ok=True)
        compile_static(source, agent)
        _initramfs(initramfs, agent.read_bytes(), modules, {})
    build_initramfs = target / f"build-{hashlib.sha256(busybox).hexdigest()[:12]}.cpio"
    if not build_initramfs.exists():
        _initramfs(build_initramfs, agent.read_bytes(), build_modules, {BUILD_TOOL: busybox})
    return GuestArtifacts(
        kernel=kernel.image, initramfs=initramfs, agent=agent, fingerprint=fingerprint, build_initramfs=build_initramfs
    )
