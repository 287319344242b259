"""The addresses a tenant may never make this host connect to: one list for builds, pulls and webhooks.

Build VMs' egress (ember.build.egress turns the lists into nftables rules) and
the daemon's own connections on a tenant's behalf (registries in ember.build.oci,
webhooks in ember.webhooks, through :class:`PinnedTransport`) refuse the same
destinations: this host's own addresses,
loopback, private, link-local (cloud metadata), CGNAT, IETF special-purpose,
benchmarking, multicast and reserved IPv4, and the IPv6 ranges that are local
or that embed an IPv4 address (mapped, NAT64, 6to4), so no IPv6 spelling
reaches an IPv4 destination refused here.

These connections are checked after DNS resolution, and the connection goes
to the very address that was checked (no second lookup an attacker's DNS could
answer differently); TLS still verifies the name. Hosts the operator configured
(``EMBER_INSECURE_REGISTRIES``, ``EMBER_TRUSTED_REGISTRIES``,
``EMBER_WEBHOOK_TRUSTED_HOSTS``) are exempt.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpcore
import httpx

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DENIED_V4 = (
    "0.0.0.0/8",  # "this network"
    "10.0.0.0/8",  # private
    "100.64.0.0/10",  # CGNAT
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link-local, cloud metadata (169.254.169.254)
    "172.16.0.0/12",  # private
    "192.0.0.0/24",  # IETF protocol assignments (DS-Lite, NAT64 discovery)
    "192.168.0.0/16",  # private
    "198.18.0.0/15",  # benchmarking, used inside some clouds
    "224.0.0.0/3",  # multicast, reserved, broadcast
)
DENIED_V6 = (
    "::/96",  # unspecified (::), loopback (::1), IPv4-compatible
    "::ffff:0:0/96",  # IPv4-mapped
    "64:ff9b::/96",  # NAT64 well-known prefix (embeds IPv4)
    "64:ff9b:1::/48",  # NAT64 local-use prefix
    "100::/64",  # discard-only
    "2002::/16",  # 6to4 (embeds IPv4)
    "fc00::/7",  # unique local, incl. AWS metadata fd00:ec2::254
    "fe80::/10",  # link-local
    "fec0::/10",  # site-local (deprecated)
    "ff00::/8",  # multicast
)
DENIED: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n) for n in (*DENIED_V4, *DENIED_V6))

FIB_TRIE = Path("/proc/net/fib_trie")
IF_INET6 = Path("/proc/net/if_inet6")


def host_addresses(fib_trie: Path = FIB_TRIE, if_inet6: Path = IF_INET6) -> frozenset[IPNetwork]:
    """This host's own addresses (what nftables calls ``fib daddr type local``), as the kernel lists them."""
    nets: set[IPNetwork] = set()
    with contextlib.suppress(OSError):
        last = ""
        for line in fib_trie.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] in ("|--", "+--"):
                last = parts[1]
            elif len(parts) == 3 and parts[0].startswith("/") and parts[2] == "LOCAL" and last:
                with contextlib.suppress(ValueError):
                    nets.add(ipaddress.ip_network(f"{last}{parts[0]}", strict=False))
    with contextlib.suppress(OSError):
        for line in if_inet6.read_text().splitlines():
            hexaddr = line.split()[0] if line.strip() else ""
            with contextlib.suppress(ValueError):
                nets.add(ipaddress.ip_network(int(hexaddr, 16).to_bytes(16, "big")))
    return frozenset(nets)


def denied(address: IPAddress, own: Iterable[IPNetwork] = ()) -> bool:
    """Whether a connection to ``address`` is refused (``own``: this host's addresses)."""
    address = ipaddress.ip_address(address.compressed.partition("%")[0])  # drop an IPv6 zone
    return any(address in net for net in (*DENIED, *own) if net.version == address.version)


def hostname(entry: str) -> str:
    """``host[:port]`` (``[v6]:port`` too) -> the host, lowercased."""
    entry = entry.strip().lower()
    if entry.startswith("["):
        return entry[1 : entry.find("]")] if "]" in entry else entry
    return entry.rsplit(":", 1)[0] if entry.count(":") == 1 else entry


class AddressDenied(Exception):
    """A connection to a refused address; the message is for the daemon's log, not the tenant."""

    def __init__(self, host: str, address: str) -> None:
        super().__init__(f"{host} resolves to {address}, a refused address")
        self.host = host


@dataclass(frozen=True)
class AddressPolicy:
    """Which connections the daemon makes on a tenant's behalf: hosts in ``trusted`` are the operator's."""

    trusted: frozenset[str] = frozenset()

    @classmethod
    def trusting(cls, entries: Iterable[str]) -> AddressPolicy:
        return cls(frozenset(hostname(e) for e in entries if e.strip()))

    def is_trusted(self, host: str) -> bool:
        return hostname(host) in self.trusted


async def resolve_checked(host: str, port: int, policy: AddressPolicy, timeout: float | None = None) -> list[str]:
    """``host``'s TCP addresses, every one checked (unless the operator trusts ``host``): connect to these only.

    Raises :class:`AddressDenied` when any address is refused, ``TimeoutError`` or ``OSError`` when
    ``host`` cannot be resolved."""
    with anyio.fail_after(timeout):
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not policy.is_trusted(host):
        own = host_addresses()
        for address in addresses:
            if denied(ipaddress.ip_address(address.partition("%")[0]), own):
                log.warning("refused a connection to %s:%d (%s)", host, port, address)
                raise AddressDenied(host, address)
    return addresses


class PinnedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend with every TCP connection resolved, checked, and made to that address.

    httpcore hands TLS the origin's name separately (``server_hostname``), so the
    certificate is still verified against the name while the socket goes to the
    address that was checked."""

    def __init__(self, policy: AddressPolicy) -> None:
        self.policy = policy
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            addresses = await resolve_checked(host, port, self.policy, timeout)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from None
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from None
        last: Exception = httpcore.ConnectError(f"{host} has no address")
        for address in addresses:
            try:
                return await self._inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        raise last

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("connections on a tenant's behalf are TCP only")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class PinnedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport over :class:`PinnedBackend` (httpx has no parameter for it)."""

    def __init__(self, verify: ssl.SSLContext, policy: AddressPolicy, *, max_connections: int = 16) -> None:
        super().__init__(verify=verify, trust_env=False)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=verify, max_connections=max_connections, network_backend=PinnedBackend(policy)
        )
