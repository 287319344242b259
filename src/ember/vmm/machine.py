"""The exact machine a VM runs on, and the QEMU command line for it (pure).

A snapshot only restores into the device setup it was taken from (QEMU loads
a mismatched one without error and the guest is then unreachable), so every
snapshot stores its :class:`MachineConfig` and every restore rebuilds the
command line from it. Only the per-VM paths differ between template and clone.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass
from pathlib import Path

AGENT_PORT_NAME = "org.ember.agent"
# Without these, 3 of 20 TCG cold boots hung in early boot on these machines.
TCG_TIMER_ARGS = "tsc_early_khz=2300000 lpj=9200000 tsc=reliable"


class Accel(enum.StrEnum):
    KVM = "kvm"
    TCG = "tcg"

    @property
    def is_security_boundary(self) -> bool:
        # QEMU's security docs: only hardware virtualization isolates guests.
        return self is Accel.KVM


class RamMode(enum.StrEnum):
    """How guest RAM is backed for one QEMU run."""

    OWN = "own"  # a RAM file this VMM owns and writes (template capture; resumed VMs)
    CLONE = "clone"  # private copy-on-write view of an image's template file


@dataclass(frozen=True)
class MachineConfig:
    accel: Accel
    memory_mib: int
    vcpus: int
    kernel: str
    initramfs: str
    cmdline: str
    qemu_version: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str) -> MachineConfig:
        data = json.loads(raw)
        data["accel"] = Accel(data["accel"])
        return cls(**data)


@dataclass(frozen=True)
class RunPaths:
    """Per-run host paths, all inside the VM's private run directory."""

    run_dir: Path
    disk: Path
    ram_file: Path

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def agent_socket(self) -> Path:
        return self.run_dir / "agent.sock"

    @property
    def serial_log(self) -> Path:
        return self.run_dir / "serial.log"


def kernel_cmdline(accel: Accel) -> str:
    # No agent token here: host `ps` shows -append and guest users read /proc/cmdline. The daemon
    # hands a cold-booted agent its token over the agent channel (AgentConnection first_boot).
    # init_on_free=1: freed guest pages read as zero, so snapshots carry live memory rather
    # than the remains of deleted files: measured here, a clone's first suspend 0.8 -> 0.44 s,
    # its first resume 1.2 -> 0.86 s, steady suspend p50 ~240 -> ~205 ms; it costs ~1 s of cold
    # boot and ~5 ms per exec under TCG. It is also guest hardening (no stale data in free pages).
    parts = ["console=ttyS0", "quiet", "panic=-1", "pci=off", "init_on_free=1"]
    if accel is Accel.TCG:
        parts.append(TCG_TIMER_ARGS)
    return " ".join(parts)


def qemu_argv(
    binary: str, machine: MachineConfig, paths: RunPaths, ram: RamMode, incoming: bool, extra: tuple[str, ...] = ()
) -> list[str]:
    mem = f"{machine.memory_mib}M"
    share = "on" if ram is RamMode.OWN else "off"
    backend = f"memory-backend-file,id=mem,size={mem},mem-path={paths.ram_file},share={share}"
    argv = [
        binary,
        "-M", f"microvm,accel={machine.accel.value},isa-serial=on,memory-backend=mem",
        "-cpu", "host" if machine.accel is Accel.KVM else "max",
        "-m", mem,
        "-smp", str(machine.vcpus),
        "-object", backend,
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", machine.kernel,
        "-initrd", machine.initramfs,
        "-append", machine.cmdline,
        "-drive", f"id=root,file={paths.disk},format=qcow2,if=none,discard=unmap",
        "-device", "virtio-blk-device,drive=root",
        "-device", "virtio-serial-device",
        "-chardev", f"socket,id=agent,path={paths.agent_socket},server=on,wait=off",
        "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME},nr=1",
        # append mode: the daemon may truncate the log under QEMU (see Host.cap_serial_log)
        "-chardev", f"file,id=serial,path={paths.serial_log},append=on",
        "-serial", "chardev:serial",
        "-qmp", f"unix:{paths.qmp_socket},server=on,wait=off",
        # seccomp: no spawning (migration goes through passed fds), no setuid.
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    ]  # fmt: skip
    if incoming:
        argv += ["-incoming", "defer"]
    return argv + list(extra)


def user_network_args() -> tuple[str, ...]:
    """A NIC on QEMU's user-mode network (10.0.2.15/24, gateway .2, DNS .3): egress
    leaves as the VMM's own sockets, which the host filters by the VMM's uid."""
    return (
        "-netdev", "user,id=net0,ipv6=off",
        "-device", "virtio-net-device,netdev=net0",
    )  # fmt: skip


def readonly_disk_args(index: int, path: Path) -> tuple[str, ...]:
    """An extra read-only disk (e.g. another build stage for COPY --from)."""
    return (
        "-drive", f"id=ro{index},file={path},format=qcow2,if=none,read-only=on",
        "-device", f"virtio-blk-device,drive=ro{index},serial=ember-ro{index}",
    )  # fmt: skip
