"""A VM's egress policy and the nftables rules that enforce it (pure: no I/O).

Every VM launched from an image built by this release has a virtio-net NIC in
its snapshot (microvm has no hotplug). A VM with egress ``none`` (the default)
runs that NIC with no backend at all: nothing to set up, and its launches are
served by the warm pool. A VM with ``internet`` or an allowlist gets a network
namespace of its own (ember.network.vmnet): a tap for the NIC (the daemon opens
it inside the namespace and hands QEMU the fd; QEMU stays jailed in an empty
namespace of its own) and a veth pair to the host, which masquerades it onto
the host's uplink. Every VM has the same guest address and MAC
(:data:`GUEST_IP`, :data:`GUEST_MAC`): the namespace tells them apart.

Rules, in the VM's namespace (gone with it):

- anti-spoofing on the tap's ingress: only IPv4 from the guest's MAC and
  address, and ARP for them, enter the namespace; everything else (another
  source address, another MAC, IPv6) is dropped;
- DNS: the guest's resolver is its gateway (:data:`GATEWAY_IP`, written into
  the guest at boot and so valid in every clone and after every resume); the
  namespace forwards it to the host's resolver of the moment (DNAT);
- forwarding to the uplink: DNS to that resolver; then this host's own
  addresses and connected networks and every range of ember.netpolicy
  (loopback, private, link-local and cloud metadata, CGNAT, ...) are refused,
  whatever the policy; then ``internet`` accepts the rest, an allowlist only
  its addresses;
- nothing reaches the namespace itself except DNS (and replies).

The host's own table (:func:`host_ruleset`) refuses the same ranges again for
packets from any VM's veth and drops VM packets addressed to the host.

Allowlist domains are resolved by the daemon (the host's resolver) when the
VM's network is set up, at every launch and resume, and their addresses are
pinned into the VM's set; the guest resolves names through the same host
resolver. This was chosen over checking SNI/Host because it filters every
protocol, needs no proxy on the data path and cannot be fooled by a forged
SNI or Host header (an SNI check can: the name and the address are chosen by
the guest independently). Its limit: a name whose addresses change while the
VM runs (DNS round robin, CDNs) may resolve, in the guest, to an address that
was not pinned; suspending and resuming the VM pins the current ones.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from ember.errors import InvalidRequest
from ember.netpolicy import DENIED, DENIED_V4, IPNetwork
from ember.vmm.machine import GUEST_MAC

GUEST_IP = "169.254.0.21"  # the guest's address in every VM (its own namespace tells them apart)
GATEWAY_IP = "169.254.0.22"  # the tap's address in the VM's namespace: the guest's gateway and resolver
GUEST_PREFIX = 30
GATEWAY_MAC = "02:45:4d:00:00:01"  # the tap's, in every namespace (a resumed or cloned guest's ARP cache holds)
TAP = "tap0"  # in the VM's namespace
NS_VETH = "ve0"  # the namespace's end of the veth pair
HOST_VETH_PREFIX = "e"  # the host's end: "e" + the daemon's uid base (base 36) + "x" + the VM's slot
HOST_VETH_IP = "169.254.1.1"  # on every host-side veth: the namespaces' gateway

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
MAX_DOMAIN = 253


class EgressMode(enum.StrEnum):
    NONE = "none"  # no network (the default): the NIC has no backend
    INTERNET = "internet"  # public addresses only
    ALLOW = "allow"  # only the listed CIDRs and domains


@dataclass(frozen=True)
class EgressPolicy:
    mode: EgressMode = EgressMode.NONE
    allow: tuple[str, ...] = ()  # normalised CIDRs ("203.0.113.0/24") and lowercase domain names

    @property
    def needs_network(self) -> bool:
        return self.mode is not EgressMode.NONE

    @property
    def networks(self) -> tuple[ipaddress.IPv4Network, ...]:
        return tuple(ipaddress.IPv4Network(e) for e in self.allow if _is_cidr(e))

    @property
    def domains(self) -> tuple[str, ...]:
        return tuple(e for e in self.allow if not _is_cidr(e))

    def to_json(self) -> str:
        return json.dumps({"mode": self.mode.value, "allow": list(self.allow)})

    @classmethod
    def from_json(cls, raw: str) -> EgressPolicy:
        data = json.loads(raw) if raw else {}
        return cls(EgressMode(data.get("mode", "none")), tuple(data.get("allow", ())))

    def view(self) -> dict[str, object]:
        return {"mode": self.mode.value, "allow": list(self.allow)}


NO_EGRESS = EgressPolicy()


def _is_cidr(entry: str) -> bool:
    return entry[:1].isdigit() and "/" in entry


def _domain(entry: str) -> str | None:
    name = entry.rstrip(".").lower()
    if not name or len(name) > MAX_DOMAIN or "." not in name:
        return None
    labels = name.split(".")
    if not all(_LABEL.match(label) for label in labels) or labels[-1].isdigit():
        return None
    return name


def parse_entry(entry: str) -> str:
    """One allowlist entry, normalised: an IPv4 address or CIDR, or a domain name. Raises InvalidRequest."""
    if not isinstance(entry, str) or not entry.strip() or len(entry) > MAX_DOMAIN:
        raise InvalidRequest(f"egress allowlist entries are CIDRs or domain names of at most {MAX_DOMAIN} characters")
    entry = entry.strip()
    try:
        net = ipaddress.ip_network(entry, strict=False)
    except ValueError:
        name = _domain(entry)
        if name is None:
            raise InvalidRequest(
                f"egress allowlist entry {entry[:80]!r} is neither an IPv4 CIDR (203.0.113.0/24) nor a domain name "
                "(pypi.org)"
            ) from None
        return name
    if net.version != 4:
        raise InvalidRequest(f"egress allowlist entry {entry!r}: VMs have IPv4 egress only")
    if any(net.subnet_of(d) for d in DENIED if isinstance(d, ipaddress.IPv4Network)):
        raise InvalidRequest(
            f"egress allowlist entry {entry!r} is a private, loopback, link-local or reserved range, which VMs "
            "never reach"
        )
    return str(net)


def parse_policy(mode: str, allow: Iterable[str], *, max_entries: int) -> EgressPolicy:
    """A run request's ``egress`` and ``allow``, checked and normalised. Raises InvalidRequest."""
    try:
        egress = EgressMode(mode)
    except ValueError:
        raise InvalidRequest(f"egress must be one of {', '.join(m.value for m in EgressMode)}, not {mode!r}") from None
    entries = list(allow)
    if egress is not EgressMode.ALLOW:
        if entries:
            raise InvalidRequest("an allowlist needs egress 'allow' (--egress allow --allow CIDR_OR_DOMAIN)")
        return EgressPolicy(egress)
    if not entries:
        raise InvalidRequest("egress 'allow' needs at least one --allow CIDR_OR_DOMAIN")
    if len(entries) > max_entries:
        raise InvalidRequest(f"an egress allowlist has at most {max_entries} entries, not {len(entries)}")
    return EgressPolicy(egress, tuple(dict.fromkeys(parse_entry(e) for e in entries)))


def _set(items: Iterable[str]) -> str:
    return "{ " + ", ".join(items) + " }"


def namespace_ruleset(
    policy: EgressPolicy, *, resolver: str | None, refused: Iterable[IPNetwork], allowed: Iterable[str]
) -> str:
    """The nftables script for a VM's namespace. ``resolver``: the host's IPv4 resolver (None: no DNS);
    ``refused``: this host's own addresses and connected networks; ``allowed``: the allowlist's
    addresses and networks (CIDRs and the domains' resolved addresses)."""
    refused_v4 = sorted({str(n) for n in refused if n.version == 4})
    allowed_v4 = [str(n) for n in ipaddress.collapse_addresses(ipaddress.IPv4Network(a) for a in set(allowed))]
    lines = [
        "table netdev ember_guard {",
        "  chain tap_in {",
        f'    type filter hook ingress device "{TAP}" priority -500; policy drop;',
        f"    ether saddr != {GUEST_MAC} drop",
        f"    arp saddr ether {GUEST_MAC} arp saddr ip {GUEST_IP} accept",
        f"    ip saddr {GUEST_IP} accept",
        "  }",
        "}",
        "table inet ember {",
    ]
    if policy.mode is EgressMode.ALLOW:
        lines += ["  set allowed {", "    type ipv4_addr; flags interval;"]
        if allowed_v4:
            lines.append(f"    elements = {_set(allowed_v4)}")
        lines.append("  }")
    lines += ["  chain vm_prerouting {", "    type nat hook prerouting priority dstnat; policy accept;"]
    if resolver is not None:
        lines.append(
            f'    iifname "{TAP}" ip daddr {GATEWAY_IP} meta l4proto {{ tcp, udp }} th dport 53 dnat ip to {resolver}'
        )
    lines += [
        "  }",
        "  chain vm_postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        f'    oifname "{NS_VETH}" masquerade',
        "  }",
        "  chain vm_input {",
        "    type filter hook input priority 0; policy drop;",
        "    ct state established,related accept",
        '    iifname "lo" accept',
        "  }",
        "  chain vm_forward {",
        "    type filter hook forward priority 0; policy drop;",
        "    ct state established,related accept",
        f'    iifname != "{TAP}" drop',
        f'    oifname != "{NS_VETH}" drop',
    ]
    if resolver is not None:
        lines.append(f"    ip daddr {resolver} meta l4proto {{ tcp, udp }} th dport 53 accept")
    lines.append(f"    ip daddr {_set(DENIED_V4)} reject with icmp type admin-prohibited")
    if refused_v4:
        lines.append(f"    ip daddr {_set(refused_v4)} reject with icmp type admin-prohibited")
    if policy.mode is EgressMode.INTERNET:
        lines.append("    meta nfproto ipv4 accept")
    elif policy.mode is EgressMode.ALLOW:
        lines.append("    ip daddr @allowed accept")
    lines += ["    reject with icmp type admin-prohibited", "  }", "}"]
    return "\n".join(lines) + "\n"


def host_ruleset(
    table: str, veth_prefix: str, *, resolvers: Iterable[str], refused: Iterable[IPNetwork], forwarding_was_on: bool
) -> str:
    """The daemon's host table: what leaves VM namespaces through their veths is filtered again
    (defence in depth: the same ranges as in each namespace), masqueraded onto the uplink, and
    nothing from a VM reaches the host itself. When the host did not forward before Ember turned
    forwarding on, forwarding that involves no VM stays off."""
    pattern = f'"{veth_prefix}*"'
    v4 = sorted({r for r in resolvers if ipaddress.ip_address(r).version == 4})
    refused_v4 = sorted({str(n) for n in refused if n.version == 4})
    lines = [
        f"table inet {table} {{",
        "  chain vm_input {",
        "    type filter hook input priority 0; policy accept;",
        f"    iifname {pattern} drop",
        "  }",
        "  chain vm_forward {",
        "    type filter hook forward priority 0; policy accept;",
    ]
    if v4:
        lines.append(f"    iifname {pattern} ip daddr {_set(v4)} meta l4proto {{ tcp, udp }} th dport 53 accept")
    lines.append(f"    iifname {pattern} ip daddr {_set(DENIED_V4)} drop")
    if refused_v4:
        lines.append(f"    iifname {pattern} ip daddr {_set(refused_v4)} drop")
    lines += [
        f"    iifname {pattern} meta nfproto ipv4 accept",
        f"    iifname {pattern} drop",
        f"    oifname {pattern} ct state established,related accept",
        f"    oifname {pattern} drop",
    ]
    if not forwarding_was_on:
        lines.append("    drop")
    lines += [
        "  }",
        "  chain vm_postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        f"    iifname {pattern} oifname != {pattern} masquerade",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"
