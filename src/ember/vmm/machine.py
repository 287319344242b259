"""The exact machine a VM runs on, and the QEMU command line for it (pure).

A snapshot only restores into the device setup it was taken from (QEMU loads
a mismatched one without error and the guest is then unreachable), so every
snapshot stores its :class:`MachineConfig` and every restore rebuilds the
command line from it. Only the per-VM paths differ between template and clone.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

AGENT_PORT_NAME = "org.ember.agent"
GUEST_MAC = "52:54:00:12:34:56"  # every VM's NIC (each VM with egress has a namespace of its own)
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


def _release(version_line: str) -> tuple[str, ...]:
    match = re.search(r"version (\d+)\.(\d+)", version_line)
    return match.groups() if match else (version_line,)


@dataclass(frozen=True)
class MachineConfig:
    accel: Accel
    memory_mib: int
    vcpus: int
    kernel: str
    initramfs: str
    cmdline: str
    qemu_version: str
    # A virtio-net NIC (images built before Ember had VM egress have none: from_json's default)
    nic: bool = False

    def restores_on(self, qemu_version: str) -> bool:
        """Whether a snapshot of this machine loads into ``qemu_version`` (``qemu --version``'s
        first line): the same upstream release (major.minor); distribution patches do not matter."""
        return _release(self.qemu_version) == _release(qemu_version)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str) -> MachineConfig:
        data = json.loads(raw)
        data["accel"] = Accel(data["accel"])
        return cls(**data)


# The file descriptors a VMM gets from the daemon, at these numbers (the jailer keeps exactly these open).
FD_QMP = 3  # a listening Unix socket the daemon bound in the VM's root-owned control directory
FD_AGENT = 4  # likewise, for the guest agent's virtio-serial port
FD_SERIAL = 5  # the serial log, opened by the daemon (append)
FD_FIRST_DISK = 6  # then one read-only fd per backing file of the root disk, base last; then the tap, if any


@dataclass(frozen=True)
class DiskChain:
    """A VM's root disk: ``top`` (the qcow2 the VMM writes) and the read-only chain it backs onto.

    The backing files reach QEMU as file descriptors the daemon opened, each named as the
    next one's backing node, so QEMU neither opens them by path nor follows a backing file
    name from a header (which the VMM that wrote the file controls)."""

    top: Path
    backing: tuple[Path, ...] = ()


@dataclass(frozen=True)
class RamBacking:
    path: Path
    mode: RamMode
    offset: int = 0  # where guest RAM starts in the file (a mapped-ram file keeps its header before it)


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


def _blockdev(**node: object) -> str:
    return json.dumps(node, separators=(",", ":"))


def disk_args(disk: DiskChain) -> tuple[str, ...]:
    """The root disk as explicit blockdev nodes: its backing files from fds, base last."""
    args: list[str] = []
    below = None
    for i, _ in reversed(list(enumerate(disk.backing))):
        fdset = 10 + i
        args += ["-add-fd", f"fd={FD_FIRST_DISK + i},set={fdset}"]
        node = {"driver": "qcow2", "node-name": f"b{i}", "read-only": True,
                "file": {"driver": "file", "filename": f"/dev/fdset/{fdset}", "read-only": True}}  # fmt: skip
        node["backing"] = below
        args += ["-blockdev", _blockdev(**node)]
        below = f"b{i}"
    top = {"driver": "qcow2", "node-name": "root", "discard": "unmap", "backing": below,
           "file": {"driver": "file", "filename": str(disk.top), "discard": "unmap"}}  # fmt: skip
    if not disk.backing:
        del top["backing"]  # a stand-alone disk, or a build layer chain opened inside the jail
    return (*args, "-blockdev", _blockdev(**top), "-device", "virtio-blk-device,drive=root")


def boot_args(machine: MachineConfig, *, incoming: bool) -> tuple[str, ...]:
    """The kernel to boot: none for a restore (it never boots again: ``-no-reboot``). Left out,
    QEMU keeps no copy of the kernel image in its memory (~13 MiB less Pss per clone, measured)
    and starts ~10 ms sooner."""
    if incoming:
        return ()
    return ("-kernel", machine.kernel, "-initrd", machine.initramfs, "-append", machine.cmdline)


def qemu_argv(
    binary: str, machine: MachineConfig, disk: DiskChain, ram: RamBacking, *, incoming: bool,
    extra: tuple[str, ...] = (), tap_fd: int | None = None,
) -> list[str]:  # fmt: skip
    """QEMU's argv. Sockets and the serial log are the daemon's fds (``FD_*``): the VMM
    never opens a path in its control directory, and after a daemon restart the
    daemon reconnects to sockets in a directory no VMM can write."""
    mem = f"{machine.memory_mib}M"
    if ram.mode is RamMode.OWN:
        backend = f"memory-backend-file,id=mem,size={mem},mem-path={ram.path},offset={ram.offset},share=on"
    else:  # a private copy-on-write mapping of a template the VMM can only read
        backend = f"memory-backend-file,id=mem,size={mem},mem-path={ram.path},share=off,readonly=on,rom=off"
    argv = [
        binary,
        "-M", f"microvm,accel={machine.accel.value},isa-serial=on,memory-backend=mem",
        "-cpu", "host" if machine.accel is Accel.KVM else "max",
        "-m", mem,
        "-smp", str(machine.vcpus),
        "-object", backend,
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        *boot_args(machine, incoming=incoming),
        *disk_args(disk),
        "-device", "virtio-serial-device",
        "-chardev", f"socket,id=agent,fd={FD_AGENT},server=on,wait=off",
        "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME},nr=1",
        "-add-fd", f"fd={FD_SERIAL},set=1",
        "-chardev", "file,id=serial,path=/dev/fdset/1,append=on",
        "-serial", "chardev:serial",
        "-chardev", f"socket,id=qmp,fd={FD_QMP},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        # seccomp: no spawning (migration goes through passed fds), no setuid.
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    ]  # fmt: skip
    if machine.nic:
        argv += nic_args(tap_fd)
    if incoming:
        argv += ["-incoming", "defer"]
    return argv + list(extra)


def nic_args(tap_fd: int | None) -> tuple[str, ...]:
    """The VM's NIC (ember.network.policy): on a tap the daemon opened in the VM's network namespace
    (``tap_fd``, QEMU's fd number), or with no backend at all (egress none: frames go nowhere).
    Offloads are off, so the guest negotiates the same features on either backend and a snapshot
    taken on one restores on the other."""
    offloads = "csum=off,guest_csum=off,gso=off,guest_tso4=off,guest_tso6=off,guest_ecn=off,guest_ufo=off," \
               "host_tso4=off,host_tso6=off,host_ecn=off,host_ufo=off,mrg_rxbuf=off,guest_announce=off"  # fmt: skip
    device = f"virtio-net-device,id=nic0,mac={GUEST_MAC},{offloads}"
    if tap_fd is None:
        return ("-device", device)
    return ("-netdev", f"tap,id=net0,fd={tap_fd},vhost=off", "-device", f"{device},netdev=net0")


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
