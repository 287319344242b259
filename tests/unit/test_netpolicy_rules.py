"""Egress policies and their nftables rules (ember.network.policy): parsing, bounds, rule generation."""

from __future__ import annotations

import ipaddress

import pytest

from ember.errors import InvalidRequest
from ember.network.policy import (
    GUEST_IP,
    GUEST_MAC,
    EgressMode,
    EgressPolicy,
    host_ruleset,
    namespace_ruleset,
    parse_policy,
)
from ember.vmm.machine import Accel, MachineConfig, nic_args

OWN = [ipaddress.ip_network("192.0.2.2/32"), ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("::1/128")]


def _forward(script: str) -> list[str]:
    lines = script.splitlines()
    start = lines.index("  chain vm_forward {")
    return [line.strip() for line in lines[start + 1 : lines.index("  }", start)]]


def test_parse_defaults_and_normalises() -> None:
    assert parse_policy("none", [], max_entries=4) == EgressPolicy()
    assert parse_policy("internet", [], max_entries=4).mode is EgressMode.INTERNET
    policy = parse_policy("allow", ["203.0.113.9/24", "PyPI.org.", "pypi.org", "198.51.100.1"], max_entries=4)
    assert policy.allow == ("203.0.113.0/24", "pypi.org", "198.51.100.1/32")
    assert policy.networks == (ipaddress.IPv4Network("203.0.113.0/24"), ipaddress.IPv4Network("198.51.100.1/32"))
    assert policy.domains == ("pypi.org",)
    assert EgressPolicy.from_json(policy.to_json()) == policy
    assert EgressPolicy.from_json("") == EgressPolicy()


@pytest.mark.parametrize(
    ("mode", "allow", "says"),
    [
        ("open", [], "egress must be one of"),
        ("none", ["pypi.org"], "needs egress 'allow'"),
        ("allow", [], "at least one"),
        ("allow", ["a.org"] * 5, "at most 4 entries"),
        ("allow", ["10.1.2.0/24"], "never reach"),
        ("allow", ["127.0.0.1"], "never reach"),
        ("allow", ["100.64.0.1"], "never reach"),
        ("allow", ["169.254.169.254/32"], "never reach"),
        ("allow", ["::/0"], "IPv4 egress only"),
        ("allow", ["x" * 254], "at most 253"),
        ("allow", ["-bad-.org"], "neither"),
        ("allow", ["localhost"], "neither"),
        ("allow", ["a..org"], "neither"),
        ("allow", ["1.2.3.4.5"], "neither"),
        ("allow", ["exa mple.org"], "neither"),
        ("allow", ["a.org\nflush ruleset"], "neither"),
        ("allow", ["a.org; flush ruleset"], "neither"),
    ],
)
def test_parse_refuses(mode: str, allow: list[str], says: str) -> None:
    with pytest.raises(InvalidRequest, match=says):
        parse_policy(mode, allow, max_entries=4)


def test_internet_refuses_private_and_own_before_accepting() -> None:
    rules = _forward(namespace_ruleset(EgressPolicy(EgressMode.INTERNET), resolver="10.255.255.53", refused=OWN,
                                       allowed=[]))  # fmt: skip
    dns = rules.index("ip daddr 10.255.255.53 meta l4proto { tcp, udp } th dport 53 accept")
    private = next(i for i, r in enumerate(rules) if "10.0.0.0/8" in r and "169.254.0.0/16" in r and "reject" in r)
    own = next(i for i, r in enumerate(rules) if "192.0.2.0/24" in r and "192.0.2.2" in r)
    accept = rules.index("meta nfproto ipv4 accept")
    assert dns < private < own < accept  # DNS to the resolver only, then the refusals, then the rest
    assert rules[-1].startswith("reject")
    assert "::1" not in " ".join(rules)  # IPv4 rules only: IPv6 never passes the tap's ingress


def test_allowlist_accepts_only_its_set() -> None:
    policy = parse_policy("allow", ["203.0.113.0/24", "pypi.org"], max_entries=8)
    script = namespace_ruleset(policy, resolver=None, refused=OWN, allowed=["203.0.113.0/24", "203.0.113.80"])
    assert "elements = { 203.0.113.0/24 }" in script  # overlapping entries are merged (nft refuses overlaps)
    rules = _forward(script)
    assert "ip daddr @allowed accept" in rules and "meta nfproto ipv4 accept" not in rules
    assert not any("dport 53" in r for r in rules)  # no resolver: no DNS
    assert "dnat" not in script


def test_anti_spoofing_on_the_tap() -> None:
    script = namespace_ruleset(EgressPolicy(EgressMode.INTERNET), resolver=None, refused=[], allowed=[])
    guard = script[: script.index("table inet ember")]
    assert 'hook ingress device "tap0"' in guard and "policy drop;" in guard
    assert f"ether saddr != {GUEST_MAC} drop" in guard
    assert f"ip saddr {GUEST_IP} accept" in guard and f"arp saddr ip {GUEST_IP} accept" in guard
    assert "ip6" not in guard  # nothing else, IPv6 included, enters the namespace


@pytest.mark.parametrize("was_on", [True, False])
def test_host_table(was_on: bool) -> None:
    script = host_ruleset("ember_net_1", "edqpcx", resolvers=["10.255.255.53", "::1"], refused=OWN,
                          forwarding_was_on=was_on)  # fmt: skip
    lines = [line.strip() for line in script.splitlines()]
    assert 'iifname "edqpcx*" drop' in lines  # from a VM, nothing reaches the host itself
    assert 'iifname "edqpcx*" oifname != "edqpcx*" masquerade' in lines
    assert 'iifname "edqpcx*" ip daddr { 192.0.2.0/24, 192.0.2.2/32 } drop' in lines
    assert ("drop" in lines) is not was_on  # a host that did not forward still forwards nothing else


def test_nic_args_same_device_on_both_backends() -> None:
    bare = nic_args(None)
    tap = nic_args(9)
    assert bare == ("-device", bare[1]) and "netdev" not in bare[1]
    assert tap[:2] == ("-netdev", "tap,id=net0,fd=9,vhost=off") and tap[3] == f"{bare[1]},netdev=net0"
    old = MachineConfig.from_json(
        '{"accel": "tcg", "memory_mib": 256, "vcpus": 1, "kernel": "k", "initramfs": "i", "cmdline": "", '
        '"qemu_version": "QEMU emulator version 10.0.2"}'
    )
    assert old.nic is False and old.accel is Accel.TCG  # images from before have no NIC
