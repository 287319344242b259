"""Network egress of image-build VMMs: the internet yes, this host and private ranges no.

A build VM's NIC is QEMU's user-mode network, so its traffic leaves as sockets
of the VMM process, which runs as the daemon's builder uid. An nftables table
keyed to that uid rejects this host's own addresses (``fib daddr type local``),
loopback (QEMU maps the guest's 10.0.2.2 to the host's 127.0.0.1) and every
range of ember.netpolicy (the same list registry pulls are checked against),
IPv4 and IPv6, except DNS to the host's own resolvers (QEMU's DNS proxy at
10.0.2.3 forwards to them).
"""

from __future__ import annotations

import contextlib
import ipaddress
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from ember.errors import HostSetupError
from ember.netpolicy import DENIED_V4, DENIED_V6


def resolvers(resolv_conf: Path = Path("/etc/resolv.conf")) -> list[str]:
    out = []
    with contextlib.suppress(OSError):
        for line in resolv_conf.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                with contextlib.suppress(ValueError):
                    out.append(str(ipaddress.ip_address(parts[1])))
    return out


def ruleset(table: str, uid: int, dns: list[str]) -> str:
    v4 = [d for d in dns if ipaddress.ip_address(d).version == 4]
    v6 = [d for d in dns if ipaddress.ip_address(d).version == 6]
    lines = [
        f"table inet {table} {{",
        "  chain out {",
        "    type filter hook output priority 0; policy accept;",
        # only the builder's sockets: packets without a socket (the kernel's RSTs and ICMP errors for
        # the whole host) match neither 'skuid X' nor 'skuid != X' and must not reach the rejects
        f"    meta skuid {uid} jump builder",
        "  }",
        "  chain builder {",
    ]
    for proto in ("udp", "tcp"):
        if v4:
            lines.append(f"    ip daddr {{ {', '.join(v4)} }} {proto} dport 53 accept")
        if v6:
            lines.append(f"    ip6 daddr {{ {', '.join(v6)} }} {proto} dport 53 accept")
    lines += [
        "    fib daddr type local reject",
        f"    ip daddr {{ {', '.join(DENIED_V4)} }} reject",
        f"    ip6 daddr {{ {', '.join(DENIED_V6)} }} reject",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _nft(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True)


@contextlib.contextmanager
def build_egress(uid: int) -> Iterator[None]:
    """Filter the builder uid's traffic while the block runs."""
    if shutil.which("nft") is None:
        raise HostSetupError("nft is missing: 'apt-get install nftables' (builds need it to fence off the host)")
    table = f"ember_build_{uid}"
    subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True)  # left by a killed daemon
    proc = _nft(ruleset(table, uid, resolvers()))
    if proc.returncode != 0:
        raise HostSetupError(f"cannot install the build network filter: {proc.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True)
