"""VM network namespaces on the host: one per running VM with egress (the rules: ember.network.policy).

A VM's namespace is ``/run/netns/emb<uid_base>-<vm id>-<slot>``: the daemon's
uid base (one daemon's namespaces are not another's), the VM, and the slot
that numbers its veth address inside ``EMBER_NET_CIDR`` (so a restarted daemon
knows which slots its live VMs hold without asking the kernel). It holds the
tap QEMU's NIC uses, the namespace's end of a veth pair and the VM's nftables
tables; deleting the namespace deletes all of them (the host's end of the veth
and its route go with its peer). The namespace belongs to the VMM run that
uses it (ember.microvm registers its removal when it is made); a starting
daemon sweeps its namespaces that belong to no live VM.

Blocking (ip, nft, setns): call these off the event loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from ember.build.egress import resolvers
from ember.config import Settings
from ember.errors import HostSetupError, InvalidRequest
from ember.netpolicy import IPNetwork, denied, host_addresses
from ember.network.policy import (
    GATEWAY_IP,
    GATEWAY_MAC,
    GUEST_PREFIX,
    HOST_VETH_IP,
    HOST_VETH_PREFIX,
    NS_VETH,
    TAP,
    EgressPolicy,
    host_ruleset,
    namespace_ruleset,
)

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000


@dataclass(frozen=True)
class VmNet:
    """One VM's namespace while its VMM runs: ``tap_fd`` is the daemon's until handed to QEMU."""

    namespace: str
    slot: int
    tap_fd: int


def _run(argv: list[str], stdin: str = "") -> None:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise HostSetupError(f"setting up the VM's network failed: {' '.join(argv[:4])}: {proc.stderr.strip()[:500]}")


def connected_networks() -> frozenset[IPNetwork]:
    """The networks of the host's own IPv4 addresses (its LAN neighbours), VMs' veths left out."""
    argv = ["ip", "-4", "-j", "route", "show", "table", "main", "proto", "kernel", "scope", "link"]
    proc = subprocess.run(argv, capture_output=True, text=True)
    nets: set[IPNetwork] = set()
    with contextlib.suppress(ValueError):
        for route in json.loads(proc.stdout or "[]"):
            if route.get("dst") not in (None, "default"):
                nets.add(ipaddress.ip_network(route["dst"], strict=False))
    return frozenset(nets)


class VmNetworks:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.prefix = f"emb{settings.uid_base}-"
        # host-side veth names: this daemon's own pattern, so no other daemon's table matches them
        self.veth_prefix = f"{HOST_VETH_PREFIX}{_base36(settings.uid_base)}x"
        self.table = f"ember_net_{settings.uid_base}"
        self.cidr = ipaddress.IPv4Network(settings.net_cidr)
        self._forwarding_marker = settings.data_dir / "net-forwarding-was-off"
        self._slots: set[int] = set()
        self._lock = threading.Lock()
        self._installed = False

    # ---- the host's table ------------------------------------------------

    def _ensure_host(self) -> None:
        """Turn forwarding on and install the host table (once per daemon; a killed daemon's is replaced)."""
        if self._installed:
            return
        for tool in ("ip", "nft"):
            if shutil.which(tool) is None:
                raise HostSetupError(f"{tool} is missing: 'apt-get install iproute2 nftables' (VM egress needs it)")
        if IP_FORWARD.read_text().strip() != "1":
            self._forwarding_marker.touch()  # remembered across daemon restarts: the host did not forward
            IP_FORWARD.write_text("1\n")
        script = f"table inet {self.table} {{}}\ndelete table inet {self.table}\n" + host_ruleset(
            self.table, self.veth_prefix, resolvers=resolvers(), refused=self.refused(),
            forwarding_was_on=not self._forwarding_marker.exists(),
        )  # fmt: skip
        _run(["nft", "-f", "-"], script)
        self._installed = True

    def refused(self) -> frozenset[IPNetwork]:
        return host_addresses() | connected_networks()

    def uninstall(self) -> None:
        subprocess.run(["nft", "delete", "table", "inet", self.table], capture_output=True)
        self._installed = False

    # ---- one VM ----------------------------------------------------------

    def _take_slot(self) -> int:
        with self._lock:
            for slot in range(1, self.cidr.num_addresses - 1):
                if slot not in self._slots:
                    self._slots.add(slot)
                    return slot
        raise HostSetupError(f"no free VM network address left in EMBER_NET_CIDR {self.cidr}")

    def _free_slot(self, slot: int) -> None:
        with self._lock:
            self._slots.discard(slot)

    def create(self, vm_id: str, policy: EgressPolicy) -> VmNet:
        """Make ``vm_id``'s namespace, its rules for ``policy`` and its tap; return the tap's fd.
        On failure nothing is left behind."""
        with self._lock:
            self._ensure_host()
        allowed = self._allowed(policy)
        slot = self._take_slot()
        name = f"{self.prefix}{vm_id}-{slot}"
        try:
            _run(["ip", "netns", "add", name])
        except BaseException:
            self._free_slot(slot)
            raise
        try:
            tap_fd = self._setup(vm_id, name, slot, policy, allowed)
        except BaseException:
            self.destroy(name)
            raise
        return VmNet(name, slot, tap_fd)

    def _allowed(self, policy: EgressPolicy) -> list[str]:
        """The allowlist's networks and its domains' current addresses (refused ones left out)."""
        out = [str(n) for n in policy.networks]
        own = self.refused()
        for name in policy.domains:
            try:
                infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
            except OSError as exc:
                raise InvalidRequest(f"egress allowlist: cannot resolve {name}: {exc.strerror or exc}") from None
            for info in infos:
                address = ipaddress.IPv4Address(info[4][0])
                if denied(address, own):
                    log.warning("egress allowlist: %s resolves to refused %s; left out", name, address)
                else:
                    out.append(str(address))
        return out

    def _setup(self, vm_id: str, name: str, slot: int, policy: EgressPolicy, allowed: list[str]) -> int:
        veth = self.host_veth(slot)
        ns_ip = str(self.cidr.network_address + slot)
        _run(["ip", "-b", "-"], "\n".join([
            f"link add {veth} type veth peer name {NS_VETH} netns {name}",
            f"addr add {HOST_VETH_IP}/32 dev {veth}",
            f"link set {veth} up",
            f"route add {ns_ip}/32 dev {veth}",
        ]) + "\n")  # fmt: skip
        _run(["ip", "-n", name, "-b", "-"], "\n".join([
            "link set lo up",
            f"tuntap add dev {TAP} mode tap",
            f"link set {TAP} address {GATEWAY_MAC}",  # the same in every namespace: a resumed guest's ARP cache holds
            f"addr add {GATEWAY_IP}/{GUEST_PREFIX} dev {TAP}",
            f"link set {TAP} up",
            f"addr add {ns_ip}/32 dev {NS_VETH}",
            f"link set {NS_VETH} up",
            f"route add default via {HOST_VETH_IP} dev {NS_VETH} onlink",
        ]) + "\n")  # fmt: skip
        v4 = [r for r in resolvers() if ipaddress.ip_address(r).version == 4]
        rules = namespace_ruleset(policy, resolver=v4[0] if v4 else None, refused=self.refused(), allowed=allowed)
        return _in_namespace(name, rules)

    def destroy(self, name: str) -> None:
        """Remove a VM's namespace (its tap, veth pair, route and rules go with it). Idempotent."""
        # the veth pair and its route first, at once: a namespace itself is freed later, by the kernel,
        # once the last reference to it is gone
        slot = _slot(name)
        if slot is not None:
            subprocess.run(["ip", "link", "del", self.host_veth(slot)], capture_output=True)
        proc = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True)
        if proc.returncode != 0 and (NETNS_DIR / name).exists():
            log.warning("cannot remove VM network namespace %s: %s", name, proc.stderr.strip())
            return
        if slot is not None:
            self._free_slot(slot)

    def host_veth(self, slot: int) -> str:
        """The host's end of the veth pair of the VM in ``slot`` (an interface name: 15 characters at most)."""
        return f"{self.veth_prefix}{slot}"

    def release(self) -> None:
        """Daemon shutdown: with no VM namespace left, the host table goes (VMs that keep running keep it)."""
        if not self.namespaces():
            self.uninstall()

    def namespaces(self) -> dict[str, str]:
        """This daemon's VM namespaces: name -> VM id."""
        found: dict[str, str] = {}
        with contextlib.suppress(OSError):
            for entry in NETNS_DIR.iterdir():
                if entry.name.startswith(self.prefix) and _slot(entry.name) is not None:
                    found[entry.name] = entry.name[len(self.prefix) :].rpartition("-")[0]
        return found

    def of_vm(self, vm_id: str) -> list[str]:
        return [name for name, owner in self.namespaces().items() if owner == vm_id]

    def sweep(self, keep: set[str]) -> None:
        """After a daemon start: namespaces of VMs not in ``keep`` are a killed daemon's leftovers; the
        live ones keep their slots, and the host table is renewed if any is left (else removed)."""
        kept = False
        for name, vm_id in self.namespaces().items():
            if vm_id in keep:
                slot = _slot(name)
                assert slot is not None
                with self._lock:
                    self._slots.add(slot)
                kept = True
            else:
                log.warning("removing VM network namespace %s (no live VM owns it)", name)
                self.destroy(name)
        self.uninstall()
        if kept:
            with self._lock:
                self._ensure_host()


def _base36(n: int) -> str:
    digits = ""
    while True:
        n, r = divmod(n, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[r] + digits
        if n == 0:
            return digits


def _slot(name: str) -> int | None:
    tail = name.rpartition("-")[2]
    return int(tail) if tail.isascii() and tail.isdigit() else None


def _in_namespace(name: str, rules: str) -> int:
    """In a thread of its own that joins namespace ``name`` (setns is per thread; the thread ends
    after): turn forwarding on there, load ``rules`` and open its tap. Returns the tap's fd."""
    result: list[int] = []
    failure: list[BaseException] = []

    def work() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            nsfd = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                if libc.setns(nsfd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns: {os.strerror(err)}")
            finally:
                os.close(nsfd)
            Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")  # this namespace's, opened from this thread
            _run(["nft", "-f", "-"], rules)  # forked from this thread: in the namespace too
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", TAP.encode(), IFF_TAP | IFF_NO_PI))
            except BaseException:
                os.close(fd)
                raise
            result.append(fd)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=work, name=f"netns-{name}")
    thread.start()
    thread.join()
    if failure:
        exc = failure[0]
        if isinstance(exc, OSError) and exc.errno in (errno.ENOENT, errno.EPERM):
            raise HostSetupError(f"setting up the VM's network failed: {exc}") from exc
        raise exc
    return result[0]
