"""Which client connections the ingress serves, before anyone has logged in.

A connection is admitted when it arrives, and counted until it closes, against three limits:

- ``EMBER_INGRESS_MAX_PER_ADDRESS``: connections from one client address (an IPv6 client's /64) at once;
  past it the new connection is answered 503. One address cannot take the whole ingress.
- ``EMBER_INGRESS_MAX_UNAUTHENTICATED``: connections whose first request has not been authorised yet (an idle
  socket, a head still arriving). Past it, or when the ingress is at ``EMBER_INGRESS_MAX_CONNECTIONS``, the
  oldest of them is closed (no answer) to make room: idle sockets cannot keep out a client that sends a
  request at once; they only ever push each other out.
- ``EMBER_INGRESS_MAX_CONNECTIONS``: all connections; a new one is answered 503 only when every open
  connection has an authorised request (a token or key holder: accountable, and bounded per address).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass


def address_key(peer: object) -> str:
    """What one client is counted as: its IPv4 address, or its IPv6 address's /64 (one host's usual share)."""
    host = peer[0] if isinstance(peer, tuple) and peer else None
    if not isinstance(host, str):
        return ""
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass(frozen=True)
class Limits:
    total: int
    per_address: int
    unauthenticated: int


class Admission:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._open: dict[object, str] = {}  # connection -> its address key
        self._per_address: dict[str, int] = {}
        self._waiting: dict[object, Callable[[], None]] = {}  # not yet authorised, oldest first -> how to close it

    def admit(self, conn: object, peer: object, close: Callable[[], None]) -> str | None:
        """Count ``conn`` (not yet authorised; ``close`` ends it if it must make room); or the reason it is refused."""
        key = address_key(peer)
        if self._per_address.get(key, 0) >= self.limits.per_address:
            return "too many connections from your address (EMBER_INGRESS_MAX_PER_ADDRESS): retry shortly"
        while self._waiting and (
            len(self._waiting) >= self.limits.unauthenticated or len(self._open) >= self.limits.total
        ):
            oldest = next(iter(self._waiting))
            closer = self._waiting[oldest]
            self.leave(oldest)
            closer()
        if len(self._open) >= self.limits.total:
            return "the ingress is at its connection limit: retry shortly"
        self._open[conn] = key
        self._per_address[key] = self._per_address.get(key, 0) + 1
        self._waiting[conn] = close
        return None

    def authorised(self, conn: object) -> None:
        """``conn`` had a request authorised: it no longer makes room for new connections."""
        self._waiting.pop(conn, None)

    def leave(self, conn: object) -> None:
        """``conn`` closed (or was closed to make room); again is a no-op."""
        self._waiting.pop(conn, None)
        key = self._open.pop(conn, None)
        if key is None:
            return
        left = self._per_address[key] - 1
        if left:
            self._per_address[key] = left
        else:
            del self._per_address[key]
