"""VM egress through a real daemon and real VMs (ember.network).

The "internet" is the package registry these machines reach (deb.debian.org over HTTP) and a
target of the test's own: a network namespace with a server on a public test address
(198.51.100.7, TEST-NET-2) and on forbidden ones (10.203.0.7, 169.254.169.254), routed on the
host into that namespace, so the host itself reaches all of them (the positive control) and no
packet to a forbidden address could leave this machine even if a rule were missing. The host's
own addresses get a server of their own on 0.0.0.0.
"""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.config import Settings
from ember.netpolicy import host_addresses
from ember.network.vmnet import VmNetworks
from ember.sdk import Client, InvalidRequest, Request
from tests.conftest import DaemonProcess, remove_quietly

TARGET_NS = "embtest-target"
PUBLIC = "198.51.100.7"  # TEST-NET-2: not a refused range, so "internet" reaches it (our namespace)
PRIVATE = "10.203.0.7"
METADATA = "169.254.169.254"
PORT = 8079
REGISTRY = "deb.debian.org"

PROBE = r"""
import json, socket, sys
out = {}
for spec in sys.argv[1:]:
    host, port, *src = spec.split(":")
    try:
        s = socket.socket()
        s.settimeout(3)
        if src:  # a source address the guest does not have (IP_FREEBIND): a spoofed packet
            s.setsockopt(socket.SOL_IP, 15, 1)
            s.bind((src[0], 0))
        s.connect((host, int(port)))
        s.sendall(b"GET / HTTP/1.0\r\nHost: " + host.encode() + b"\r\n\r\n")
        out[spec] = "ok" if s.recv(16).startswith(b"HTTP/") else "no http"
    except OSError as exc:
        out[spec] = f"{type(exc).__name__} {exc.errno}"
print(json.dumps(out))
"""


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


class _Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def target() -> Iterator[None]:
    """The test's own namespace: 198.51.100.7, 10.203.0.7 and 169.254.169.254 answer HTTP on PORT there."""
    subprocess.run(["ip", "netns", "del", TARGET_NS], capture_output=True)
    subprocess.run(["ip", "link", "del", "embtt0"], capture_output=True)
    sh("ip", "netns", "add", TARGET_NS)
    server = None
    try:
        sh("ip", "link", "add", "embtt0", "type", "veth", "peer", "name", "embtt1", "netns", TARGET_NS)
        sh("ip", "addr", "add", "169.254.78.1/32", "dev", "embtt0")
        sh("ip", "link", "set", "embtt0", "up")
        for address in (PUBLIC, PRIVATE, METADATA):
            sh("ip", "route", "add", f"{address}/32", "dev", "embtt0")
            sh("ip", "-n", TARGET_NS, "addr", "add", f"{address}/32", "dev", "embtt1")
        sh("ip", "-n", TARGET_NS, "link", "set", "embtt1", "up")
        sh("ip", "-n", TARGET_NS, "link", "set", "lo", "up")
        sh("ip", "-n", TARGET_NS, "route", "add", "169.254.78.1/32", "dev", "embtt1")
        sh("ip", "-n", TARGET_NS, "route", "add", "default", "via", "169.254.78.1", "dev", "embtt1")
        server = subprocess.Popen(
            ["ip", "netns", "exec", TARGET_NS, "python3", "-m", "http.server", "--bind", "0.0.0.0", str(PORT)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/tmp",
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:  # the positive control: the host reaches every target
            try:
                for address in (PUBLIC, PRIVATE, METADATA):
                    socket.create_connection((address, PORT), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the test's target namespace does not answer"
                time.sleep(0.1)
        yield
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "link", "del", "embtt0"], capture_output=True)
        subprocess.run(["ip", "netns", "del", TARGET_NS], capture_output=True)


@pytest.fixture(scope="module")
def host_server() -> Iterator[tuple[str, int]]:
    """A server on every host address; returns (the host's own non-loopback IPv4 address, its port)."""
    own = [n for n in host_addresses() if n.version == 4 and not n.network_address.is_loopback]
    assert own, "the host has no IPv4 address of its own"
    server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), _Ok)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield str(own[0].network_address), server.server_address[1]
    server.shutdown()
    server.server_close()


def probe(client: Client, vm_id: str, *specs: str) -> dict[str, str]:
    result = client.vms.get(vm_id).exec(["python3", "-c", PROBE, *specs], timeout_s=60)
    assert result.exit_code == 0, result.stderr
    return dict(json.loads(result.stdout))


def namespaces(settings: Settings, vm_id: str = "") -> list[str]:
    prefix = f"emb{settings.uid_base}-{vm_id}"
    return [p.name for p in Path("/run/netns").glob(f"{prefix}*")] if Path("/run/netns").exists() else []


def veths(settings: Settings) -> list[str]:
    """The host ends of this daemon's VM veth pairs."""
    prefix = VmNetworks(settings).veth_prefix
    return [p.name for p in Path("/sys/class/net").iterdir() if p.name.startswith(prefix)]


def run(client: Client, image: str, egress: str, allow: tuple[str, ...] = ()) -> str:
    return client.vms.run(image, egress=egress, allow=allow).id


def test_egress_none_reaches_nothing(client: Client, base_image: str, settings: Settings, target: None) -> None:
    vm_id = run(client, base_image, "none")
    try:
        assert client.vms.get(vm_id).egress == {"mode": "none", "allow": []}
        assert namespaces(settings, vm_id) == []
        got = probe(client, vm_id, f"{PUBLIC}:{PORT}", f"{REGISTRY}:80")
        assert got[f"{PUBLIC}:{PORT}"] != "ok" and got[f"{REGISTRY}:80"] != "ok", got
        nic = client.vms.get(vm_id).exec(["cat", "/sys/class/net/eth0/address"]).stdout.decode().strip()
        assert nic == "52:54:00:12:34:56"  # the NIC is there (in the snapshot), with no backend
    finally:
        remove_quietly(client, vm_id)


def test_egress_internet_public_only_spoofing_dropped_survives_suspend(
    client: Client, base_image: str, settings: Settings, target: None, host_server: tuple[str, int]
) -> None:
    own, port = host_server
    vm_id = run(client, base_image, "internet")
    try:
        assert client.vms.get(vm_id).egress == {"mode": "internet", "allow": []}
        specs = [f"{REGISTRY}:80", f"{PUBLIC}:{PORT}", f"{PRIVATE}:{PORT}", f"{METADATA}:{PORT}", f"{own}:{port}",
                 f"169.254.1.1:{port}", f"169.254.0.22:{port}", f"{PUBLIC}:{PORT}:169.254.0.25"]  # fmt: skip
        for round_ in ("launched", "resumed"):
            got = probe(client, vm_id, *specs)
            assert got[f"{REGISTRY}:80"] == "ok", (round_, got)  # DNS through the gateway, then the registry
            assert got[f"{PUBLIC}:{PORT}"] == "ok", (round_, got)
            for forbidden in specs[2:]:
                assert got[forbidden] != "ok", (round_, forbidden, got)
            client.send(Request("POST", f"/v1/vms/{vm_id}/suspend"))
            assert namespaces(settings, vm_id) == [] and veths(settings) == []  # a suspended VM holds none
            client.send(Request("POST", f"/v1/vms/{vm_id}/resume"))
            assert client.vms.get(vm_id).egress["mode"] == "internet"
    finally:
        remove_quietly(client, vm_id)
    assert namespaces(settings, vm_id) == [] and veths(settings) == []


def test_egress_allowlist(client: Client, base_image: str, target: None) -> None:
    registry = socket.gethostbyname(REGISTRY)
    listed = run(client, base_image, "allow", (f"{PUBLIC}/32",))
    by_name = run(client, base_image, "allow", (REGISTRY,))
    try:
        assert client.vms.get(by_name).egress == {"mode": "allow", "allow": [REGISTRY]}
        got = probe(client, listed, f"{PUBLIC}:{PORT}", f"{registry}:80", f"{PRIVATE}:{PORT}")
        assert got[f"{PUBLIC}:{PORT}"] == "ok", got
        assert got[f"{registry}:80"] != "ok" and got[f"{PRIVATE}:{PORT}"] != "ok", got
        got = probe(client, by_name, f"{REGISTRY}:80", f"{PUBLIC}:{PORT}")
        assert got[f"{REGISTRY}:80"] == "ok" and got[f"{PUBLIC}:{PORT}"] != "ok", got
    finally:
        remove_quietly(client, listed)
        remove_quietly(client, by_name)


@pytest.mark.parametrize(
    ("egress", "allow", "says"),
    [
        ("everything", (), "egress must be one of"),
        ("internet", ("1.2.3.4",), "needs egress 'allow'"),
        ("allow", (), "at least one"),
        ("allow", ("10.0.0.0/8",), "never reach"),
        ("allow", ("169.254.169.254",), "never reach"),
        ("allow", ("not a name!",), "neither an IPv4 CIDR"),
        ("allow", ("2001:db8::/32",), "IPv4 egress only"),
        ("allow", tuple(f"198.51.100.{i}" for i in range(40)), "at most 32 entries"),
    ],
)
def test_bad_egress_is_a_400_and_creates_nothing(
    client: Client, base_image: str, egress: str, allow: tuple[str, ...], says: str
) -> None:
    before = {vm["id"] for vm in client.send(Request("GET", "/v1/vms?all=true"))}
    with pytest.raises(InvalidRequest, match=says):
        client.vms.run(base_image, egress=egress, allow=allow)
    assert {vm["id"] for vm in client.send(Request("GET", "/v1/vms?all=true"))} == before


def test_namespaces_swept_and_readopted_after_kill9(
    client: Client, daemon: DaemonProcess, base_image: str, settings: Settings, target: None
) -> None:
    live = run(client, base_image, "internet")
    try:
        # a killed daemon's leftover: a namespace of this daemon's no VM owns
        stale = f"emb{settings.uid_base}-vm-0000deadbeef-4000"
        sh("ip", "netns", "add", stale)
        daemon.kill9()
        daemon.start()
        assert namespaces(settings, "vm-0000deadbeef") == []
        assert len(namespaces(settings, live)) == 1  # the live VM's is kept, and works
        assert probe(client, live, f"{PUBLIC}:{PORT}")[f"{PUBLIC}:{PORT}"] == "ok"
        other = run(client, base_image, "internet")  # a new one takes another slot
        assert probe(client, other, f"{PUBLIC}:{PORT}")[f"{PUBLIC}:{PORT}"] == "ok"
        remove_quietly(client, other)
    finally:
        remove_quietly(client, live)
    assert namespaces(settings) == [] and veths(settings) == []
