"""The nftables rules of build egress come from the shared deny list, and nft accepts them."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from ember import netpolicy
from ember.build.egress import BuildEgress, ruleset


def rejected(rules: str, family: str) -> set[str]:
    (line,) = (
        ln.strip() for ln in rules.splitlines() if ln.strip().startswith(f"{family} daddr {{") and "reject" in ln
    )
    return {net.strip() for net in line.split("{")[1].split("}")[0].split(",")}


def test_rules_reject_the_hosts_own_addresses_and_every_denied_range() -> None:
    rules = ruleset("t", [4242], ["10.255.255.53", "fd00::53"])
    assert "fib daddr type local reject" in rules
    assert rejected(rules, "ip") == set(netpolicy.DENIED_V4)
    assert rejected(rules, "ip6") == set(netpolicy.DENIED_V6)
    # DNS to the host's resolvers comes first, even when they are local or private
    assert rules.index("ip6 daddr { fd00::53 } udp dport 53 accept") < rules.index("fib daddr type local reject")
    assert rules.index("dport 53 accept") < rules.index("reject")


def test_nft_accepts_the_rules() -> None:
    proc = subprocess.run(["nft", "-c", "-f", "-"], input=ruleset("ember_check", [42, 43], ["10.255.255.53", "::1"]),
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_the_installed_filter_leaves_other_traffic_and_socketless_replies_alone() -> None:
    """Only the builder's sockets are filtered: with the table installed, a closed port on this host still
    answers a reset at once (the kernel's RST has no socket; it used to be rejected, so every connection
    to a closed local port hung until its timeout while any build ran)."""
    egress = BuildEgress("ember_build_test")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]  # bound, never listening: connections to it are reset
        egress.install()
        try:
            egress.add(4_242_424)
            with socket.socket() as s:
                s.settimeout(5)
                started = time.monotonic()
                with pytest.raises(ConnectionRefusedError):
                    s.connect(("127.0.0.1", closed))
                assert time.monotonic() - started < 1
        finally:
            egress.uninstall()
    assert "ember_build_test" not in subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout


def test_build_uids_join_and_leave_the_set_and_a_new_daemon_starts_clean() -> None:
    """Every build VMM uid is filtered while it runs; what a killed daemon left in the set is gone
    when the next one installs the table."""
    egress = BuildEgress("ember_build_test")
    egress.install()
    try:
        egress.add(4_242_424)
        egress.add(4_242_425)
        assert egress.members() == {4_242_424, 4_242_425}
        egress.remove(4_242_424)
        assert egress.members() == {4_242_425}
        BuildEgress("ember_build_test").install()  # the next daemon, after a kill -9
        assert egress.members() == set()
    finally:
        egress.uninstall()
