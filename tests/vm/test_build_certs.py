"""A RUN step that fails verifying a TLS certificate says how to hand in the host's CA certificates.

The failure is real: the step serves HTTPS with a self-signed certificate on the build VM's own
loopback (build VMs cannot reach the host's) and fetches from it with Python's default context,
the way pip or requests would behind a TLS-inspecting proxy.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ember.build.certhint import HINT
from ember.config import Settings
from ember.sdk import Client
from tests.conftest import TEST_UID_BLOCK, TEST_UID_BLOCK_BASE, DaemonProcess, build, vm_tests_possible
from tests.databases import daemon_database_url, drop_database

pytestmark = [pytest.mark.vm, pytest.mark.store_agnostic]  # the build sandbox's certificates: SQLite pass only

FETCH = r"""
import http.server, os, ssl, threading, urllib.request
print("SSL_CERT_FILE=" + os.environ.get("SSL_CERT_FILE", ""), "ca handed in:", os.path.exists("/dev/ember-ca.crt"))
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain("/tls/cert.pem", "/tls/key.pem")
server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
server.socket = ctx.wrap_socket(server.socket, server_side=True)
threading.Thread(target=server.serve_forever, daemon=True).start()
urllib.request.urlopen(f"https://127.0.0.1:{server.server_address[1]}/", timeout=30)
"""

DOCKERFILE = """\
FROM ember:debian-python3
COPY fetch.py cert.pem key.pem /tls/
RUN python3 /tls/fetch.py
"""


def tls_ctx(root: Path, dockerfile: str = DOCKERFILE) -> Path:
    """A build context with a self-signed certificate for 127.0.0.1 (no CA anywhere trusts it)."""
    root.mkdir()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Inspecting Proxy")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    (root / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (root / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (root / "fetch.py").write_text(FETCH)
    (root / "Dockerfile").write_text(dockerfile)
    return root


def test_a_certificate_failure_ends_with_the_hint(client: Client, tmp_path: Path) -> None:
    result, logs = build(client, tls_ctx(tmp_path / "ctx"), "certfail")
    assert result["state"] == "CREATE_FAILED", logs
    assert "line 3" in result["failed_step"] and "CERTIFICATE_VERIFY_FAILED" in result["error"], result
    assert result["error"].splitlines()[-1] == HINT
    assert logs[-1].endswith(HINT), logs[-3:]  # the build log's CREATE_FAILED line ends with it too

    # a step that fails for another reason gets no hint
    (tmp_path / "ctx" / "Dockerfile").write_text(DOCKERFILE + "RUN echo 'no such package: flsk' && exit 3\n")
    (tmp_path / "ctx" / "fetch.py").write_text("print('fetched')\n")
    result, logs = build(client, tmp_path / "ctx", "certfail")
    assert result["state"] == "CREATE_FAILED" and "exit code 3" in result["error"], result
    assert "hint" not in result["error"] and "--host-ca-certs" not in "\n".join(logs)


def test_with_the_certificates_handed_in_the_hint_says_what_else_to_do(client: Client, tmp_path: Path) -> None:
    result, logs = build(client, tls_ctx(tmp_path / "ctx"), "certfail-handed", host_ca_certs=True)
    assert result["state"] == "CREATE_FAILED", logs
    assert any("SSL_CERT_FILE=/dev/ember-ca.crt ca handed in: True" in line for line in logs), logs
    last = result["error"].splitlines()[-1]
    assert last.startswith("hint:") and "were handed in" in last and "--host-ca-certs" not in last


@pytest.fixture(scope="module")
def ca_daemon() -> Iterator[DaemonProcess]:
    """A daemon whose operator hands the host's CA certificates to every build."""
    reason = vm_tests_possible()
    if reason:
        pytest.fail(reason)
    data = Path(tempfile.mkdtemp(prefix="ember-certs-"))
    database_url = daemon_database_url("certs")  # PostgreSQL in the suite's second pass
    settings = Settings.from_env(
        {
            "EMBER_DATA_DIR": str(data),
            "EMBER_DATABASE_URL": database_url,
            "EMBER_SOCKET": str(data / "ember.sock"),
            "EMBER_CACHE_DIR": os.environ.get("EMBER_TEST_CACHE", "/var/cache/ember-test"),
            "EMBER_AGENT_TIMEOUT": "10",
            # the second half of this run's id block: the session daemon has the first
            "EMBER_UID_BASE": str(TEST_UID_BLOCK_BASE + (os.getpid() % 200) * 2 * TEST_UID_BLOCK + TEST_UID_BLOCK),
            "EMBER_UID_COUNT": str(TEST_UID_BLOCK),
            "EMBER_BUILD_HOST_CA_CERTS": "1",
        }
    )
    d = DaemonProcess(settings, data.parent / f"{data.name}-daemon.log")
    d.start()
    yield d
    d.stop()
    shutil.rmtree(data, ignore_errors=True)
    if database_url:
        drop_database(database_url)


def test_the_operator_setting_hands_the_certificates_to_every_build(ca_daemon: DaemonProcess, tmp_path: Path) -> None:
    with Client(settings=ca_daemon.settings) as client:
        result, logs = build(client, tls_ctx(tmp_path / "ctx"), "certfail")  # host_ca_certs not asked
    assert result["state"] == "CREATE_FAILED", logs
    assert any("SSL_CERT_FILE=/dev/ember-ca.crt ca handed in: True" in line for line in logs), logs
    assert "were handed in" in result["error"].splitlines()[-1]
