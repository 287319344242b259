"""What RUN steps can reach: the internet (through the host's resolver), never this host or metadata."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.sdk import Client
from tests.conftest import build, remove_quietly

pytestmark = [pytest.mark.vm, pytest.mark.store_agnostic]

GET = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8080/').read().decode())"

PIP_APP = r"""
import http.server, six
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(("six " + six.__version__).encode())
http.server.HTTPServer(("127.0.0.1", 8080), H).serve_forever()
"""

PIP_DOCKERFILE = """\
FROM python:3.11
RUN test -s "$PIP_CERT" && pip install --no-cache-dir six==1.17.0
ARG HOST_PORT
RUN python3 -c "import socket; print('host loopback:', socket.create_connection(('10.0.2.2', $HOST_PORT), 5))" \\
    || echo "host loopback refused"
COPY app.py /app/app.py
EXPOSE 8080
CMD ["python3", "/app/app.py"]
"""


def test_pip_dependency_over_https_and_no_way_to_the_host(client: Client, tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(PIP_DOCKERFILE)
    (ctx / "app.py").write_text(PIP_APP)
    with socket.socket() as listener:  # what a RUN step must not reach: the host's loopback
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        image, logs = build(client, ctx, "pipapp", host_ca_certs=True, build_args={"HOST_PORT": str(port)})
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert image["state"] == "CREATED", logs
    assert any("host loopback refused" in line for line in logs), logs
    assert not any(k.startswith(("SSL_CERT_FILE=", "PIP_CERT=")) for k in image["config"]["env"])
    vm_id = client.vms.run("pipapp").id
    try:
        assert client.vms.exec(vm_id, ["python3", "-c", GET]).stdout.decode().strip() == "six 1.17.0"
        # the CA was handed in for RUN steps only: nothing of it in the image
        left = client.vms.exec(vm_id, ["ls", "-d", "/run/ember-ca", "/dev/ember-ca.crt"])
        assert left.exit_code != 0 and left.stdout == b""
    finally:
        remove_quietly(client, vm_id)


PROBE = r"""
import socket, sys
for target in sys.argv[1].split():
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), 5).close()
        print(f"egress {target}: connected", flush=True)
    except OSError as exc:
        print(f"egress {target}: blocked ({type(exc).__name__})", flush=True)
try:
    socket.getaddrinfo("pypi.org", 443, type=socket.SOCK_STREAM)
    print("dns: resolved", flush=True)
except OSError as exc:
    print(f"dns: failed ({exc})", flush=True)
"""

PROBE_DOCKERFILE = """\
FROM ember:debian-python3
COPY probe.py /probe.py
ARG TARGETS
RUN python3 /probe.py "$TARGETS"
"""
ADDED = "198.51.100.77"  # an address no range denies: only 'fib daddr type local' keeps it from RUN steps


def global_ipv4() -> list[str]:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True)
    found = [line.split()[3].split("/")[0] for line in out.stdout.splitlines()]
    return [a for a in found if a != ADDED and not ipaddress.ip_address(a).is_loopback]


@contextlib.contextmanager
def address_on_lo(address: str) -> Iterator[None]:
    """This host gets ``address`` (on lo) for the block: a non-loopback address of its own, made here."""
    subprocess.run(["ip", "addr", "del", f"{address}/32", "dev", "lo"], capture_output=True)  # a killed run's
    subprocess.run(["ip", "addr", "add", f"{address}/32", "dev", "lo"], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["ip", "addr", "del", f"{address}/32", "dev", "lo"], check=True, capture_output=True)


def test_build_egress_blocks_host_own_addresses_and_metadata(client: Client, tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(PROBE_DOCKERFILE)
    (ctx / "probe.py").write_text(PROBE)
    with address_on_lo(ADDED), contextlib.ExitStack() as stack:
        listeners = []
        for address in [*global_ipv4(), ADDED]:  # the host's own non-loopback addresses, listening
            listener = stack.enter_context(socket.socket())
            listener.bind((address, 0))
            listener.listen(8)
            listener.setblocking(False)
            listeners.append(listener)
        targets = [f"{a}:{p}" for a, p in (s.getsockname() for s in listeners)]
        targets.append("169.254.169.254:80")  # cloud metadata; the filter rejects it before it leaves the host
        image, logs = build(client, ctx, "egress-probe", build_args={"TARGETS": " ".join(targets)})
        for listener in listeners:
            with pytest.raises(BlockingIOError):
                listener.accept()  # nothing arrived
    assert image["state"] == "CREATED", logs
    for target in targets:
        assert any(f"egress {target}: blocked" in line for line in logs), (target, logs)
    assert not any(": connected" in line for line in logs), logs
    assert any("dns: resolved" in line for line in logs), logs  # DNS through the host's resolver still works
