"""The one deny list of build egress and registry pulls, and the connection backend that enforces it."""

from __future__ import annotations

import ipaddress
import itertools
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ember import netpolicy

DENIED_SAMPLES = [
    "0.0.0.0", "10.1.2.3", "100.64.0.1", "100.127.255.254", "127.0.0.1", "127.255.0.9", "169.254.169.254",
    "172.16.0.1", "172.31.255.255", "192.0.0.8", "192.0.0.170", "192.168.1.1", "198.18.0.1", "198.19.255.255",
    "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255",
    "::", "::1", "::10.0.0.1", "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::ffff:8.8.8.8", "64:ff9b::a00:1",
    "64:ff9b::a9fe:a9fe", "64:ff9b:1::1", "100::1", "2002:a00:1::1", "2002:a9fe:a9fe::1", "fc00::1",
    "fd00:ec2::254", "fe80::1", "febf::1", "fec0::1", "feff::1", "ff02::1",
]  # fmt: skip
ALLOWED_SAMPLES = ["1.1.1.1", "8.8.8.8", "100.128.0.1", "172.32.0.1", "192.0.1.1", "198.20.0.1", "2606:4700::1111",
                   "2a00:1450::1", "64:ff9a::1"]  # fmt: skip


@pytest.mark.parametrize("address", DENIED_SAMPLES)
def test_every_denied_range_is_refused(address: str) -> None:
    assert netpolicy.denied(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ALLOWED_SAMPLES)
def test_public_addresses_are_allowed(address: str) -> None:
    assert not netpolicy.denied(ipaddress.ip_address(address))


def test_each_range_is_sampled_and_none_overlap() -> None:
    """Every range has a denied sample above (so none is untested), and nft refuses overlapping set elements."""
    for net in netpolicy.DENIED:
        assert any(ipaddress.ip_address(a) in net for a in DENIED_SAMPLES), net
    for a, b in itertools.combinations(netpolicy.DENIED, 2):
        assert a.version != b.version or not a.overlaps(b), (a, b)


def test_a_zone_on_a_link_local_address_does_not_hide_it() -> None:
    assert netpolicy.denied(ipaddress.ip_address("fe80::1%eth0"))


FIB_TRIE = """\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     |-- 203.0.113.7
        /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
     |-- 203.0.113.7
        /32 host LOCAL
"""
IF_INET6 = """\
00000000000000000000000000000001 01 80 10 80       lo
20010db8000000000000000000000042 02 40 00 80     eth0
"""


def test_host_addresses_are_read_from_the_kernel_tables(tmp_path: Path) -> None:
    (tmp_path / "fib_trie").write_text(FIB_TRIE)
    (tmp_path / "if_inet6").write_text(IF_INET6)
    own = netpolicy.host_addresses(tmp_path / "fib_trie", tmp_path / "if_inet6")
    want = {"127.0.0.0/8", "127.0.0.1/32", "203.0.113.7/32", "::1/128", "2001:db8::42/128"}
    assert own == {ipaddress.ip_network(n) for n in want}
    # an address that no range denies is refused once it is this host's own
    assert not netpolicy.denied(ipaddress.ip_address("203.0.113.7"))
    assert netpolicy.denied(ipaddress.ip_address("203.0.113.7"), own)
    assert netpolicy.denied(ipaddress.ip_address("2001:db8::42"), own)
    assert not netpolicy.denied(ipaddress.ip_address("203.0.113.8"), own)


def own_global_addresses() -> list[str]:
    out = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
    addresses = [line.split()[3].split("/")[0] for line in out.splitlines() if " scope global " in line]
    return [a for a in addresses if not netpolicy.denied(ipaddress.ip_address(a))] or addresses


def test_this_hosts_own_addresses_are_found() -> None:
    own = netpolicy.host_addresses()
    assert netpolicy.denied(ipaddress.ip_address("127.0.0.1"), own)
    addresses = own_global_addresses()
    assert addresses, "this host has no global address"  # every CI machine has one (eth0 or similar)
    for address in addresses:
        assert any(ipaddress.ip_address(address) in net for net in own), (address, own)
        assert netpolicy.denied(ipaddress.ip_address(address), own)


@pytest.mark.parametrize(
    ("entry", "host"),
    [("Registry.Example", "registry.example"), ("127.0.0.1:5000", "127.0.0.1"), ("[::1]:5000", "::1"), ("::1", "::1")],
)
def test_configured_registries_name_hosts(entry: str, host: str) -> None:
    assert netpolicy.hostname(entry) == host


@pytest.fixture
def listener() -> Any:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(4)
        s.setblocking(False)
        yield s


async def test_backend_refuses_a_name_that_resolves_to_loopback_before_connecting(listener: socket.socket) -> None:
    backend = netpolicy.PinnedBackend(netpolicy.AddressPolicy.trusting(["127.0.0.1"]))
    with pytest.raises(netpolicy.AddressDenied):
        await backend.connect_tcp("localhost", listener.getsockname()[1], timeout=5)
    with pytest.raises(BlockingIOError):
        listener.accept()  # not even a TCP handshake
    stream = await backend.connect_tcp("127.0.0.1", listener.getsockname()[1], timeout=5)  # configured: allowed
    await stream.aclose()


async def test_backend_connects_to_the_address_it_checked(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The name is resolved once, by the check; the socket goes to that address (a second lookup could differ)."""
    lookups: list[str] = []

    async def resolve(host: str, port: int, **kwargs: Any) -> list[Any]:
        lookups.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr(netpolicy.anyio, "getaddrinfo", resolve)
    backend = netpolicy.PinnedBackend(netpolicy.AddressPolicy.trusting(["registry.invalid"]))
    stream = await backend.connect_tcp("registry.invalid", listener.getsockname()[1], timeout=5)
    await stream.aclose()
    assert lookups == ["registry.invalid"]
    untrusted = netpolicy.PinnedBackend(netpolicy.AddressPolicy())
    with pytest.raises(netpolicy.AddressDenied):
        await untrusted.connect_tcp("registry.invalid", listener.getsockname()[1], timeout=5)
