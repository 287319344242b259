"""Network egress of image-build VMMs: the internet yes, this host and private ranges no.

A build VM's NIC is QEMU's user-mode network, so its traffic leaves as sockets
of the VMM process, which runs as a uid of its own. One nftables table per
daemon holds the set of those uids (a build VM's uid is added when it starts
and removed when it stops; a starting daemon installs the table afresh, so
what a killed daemon left is gone) and, for their sockets, rejects this host's own addresses (``fib daddr type local``),
loopback (QEMU maps the guest's 10.0.2.2 to the host's 127.0.0.1) and every
range of ember.netpolicy (the same list registry pulls are checked against),
IPv4 and IPv6, except DNS to the host's own resolvers (QEMU's DNS proxy at
10.0.2.3 forwards to them).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import shutil
import subprocess
from collections.abc import Collection
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


def ruleset(table: str, uids: Collection[int], dns: list[str]) -> str:
    v4 = [d for d in dns if ipaddress.ip_address(d).version == 4]
    v6 = [d for d in dns if ipaddress.ip_address(d).version == 6]
    elements = f"    elements = {{ {', '.join(map(str, sorted(uids)))} }}" if uids else ""
    lines = [
        f"table inet {table} {{",
        "  set builders {",
        "    type uid",
        *([elements] if elements else []),
        "  }",
        "  chain out {",
        "    type filter hook output priority 0; policy accept;",
        # only build VMMs' sockets: packets without a socket (the kernel's RSTs and ICMP errors for
        # the whole host) match no 'skuid' and must not reach the rejects
        "    meta skuid @builders jump builder",
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


class BuildEgress:
    """The daemon's build egress table: the filter for every build VMM uid in its set.

    Blocking (nft): call it off the event loop."""

    def __init__(self, table: str) -> None:
        self.table = table

    def install(self) -> None:
        """Install the table with an empty set, replacing any a killed daemon left."""
        if shutil.which("nft") is None:
            raise HostSetupError("nft is missing: 'apt-get install nftables' (builds need it to fence off the host)")
        self.uninstall()
        proc = _nft(ruleset(self.table, (), resolvers()))
        if proc.returncode != 0:
            raise HostSetupError(f"cannot install the build network filter: {proc.stderr.strip()}")

    def uninstall(self) -> None:
        subprocess.run(["nft", "delete", "table", "inet", self.table], capture_output=True)

    def add(self, uid: int) -> None:
        """Filter ``uid``'s sockets from now on (before its VMM starts)."""
        proc = _nft(f"add element inet {self.table} builders {{ {uid} }}\n")
        if proc.returncode != 0:
            raise HostSetupError(f"cannot add a build VM to the build network filter: {proc.stderr.strip()}")

    def remove(self, uid: int) -> None:
        """``uid``'s VMM is gone: it may be handed to a VMM that is no build VM."""
        _nft(f"delete element inet {self.table} builders {{ {uid} }}\n")

    def members(self) -> set[int]:
        proc = subprocess.run(["nft", "-j", "list", "set", "inet", self.table, "builders"], capture_output=True,
                              text=True)  # fmt: skip
        if proc.returncode != 0:
            return set()
        found: set[int] = set()
        for item in json.loads(proc.stdout).get("nftables", []):
            found.update(int(e) for e in item.get("set", {}).get("elem", []))
        return found
