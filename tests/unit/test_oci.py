"""Pulling: references, image configs, platform choice; where a registry can make the daemon connect."""

from __future__ import annotations

import datetime
import hashlib
import json
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ember.build import oci
from ember.build.dockerfile import DEFAULT_SHELL
from ember.config import Settings
from ember.errors import BuildFailed
from tests.oci_images import free_port

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("ref", "want"),
    [
        ("alpine", ("docker.io", "library/alpine", "latest", "")),
        ("team/app:1.2", ("docker.io", "team/app", "1.2", "")),
        ("127.0.0.1:5000/a/b", ("127.0.0.1:5000", "a/b", "latest", "")),
        ("localhost/x:y", ("localhost", "x", "y", "")),
        (f"ghcr.io/o/r@{DIGEST}", ("ghcr.io", "o/r", "latest", DIGEST)),
        (f"reg.example:443/r:t@{DIGEST}", ("reg.example:443", "r", "t", DIGEST)),
    ],
)
def test_references_read_like_docker(ref: str, want: tuple[str, str, str, str]) -> None:
    r = oci.parse_reference(ref)
    assert (r.registry, r.repository, r.tag, r.digest) == want


@pytest.mark.parametrize("ref", ["UPPER/case", "a@sha256:short", "reg.io/a:bad tag", "reg.io//x"])
def test_bad_references_say_so(ref: str) -> None:
    with pytest.raises(BuildFailed, match=f"FROM {ref}"):
        oci.parse_reference(ref)


def test_image_config_maps_docker_fields() -> None:
    cfg = oci.image_config({
        "Env": ["PATH=/bin", "A=b=c"], "WorkingDir": "/srv", "User": "app", "Entrypoint": ["/init"],
        "Cmd": ["serve"], "ExposedPorts": {"8080/tcp": {}, "53/udp": {}}, "Labels": {"k": "v"},
        "StopSignal": "SIGINT", "Healthcheck": {"Test": ["CMD-SHELL", "true"], "Interval": 5_000_000_000},
    })  # fmt: skip
    assert cfg.env == (("PATH", "/bin"), ("A", "b=c"))
    assert (cfg.workdir, cfg.user, cfg.app_argv()) == ("/srv", "app", ("/init", "serve"))
    assert cfg.exposed == ("8080/tcp", "53/udp") and cfg.labels == (("k", "v"),) and cfg.stopsignal == "SIGINT"
    assert cfg.healthcheck is not None
    assert cfg.healthcheck.argv == (*DEFAULT_SHELL, "true") and cfg.healthcheck.interval_s == 5.0
    assert oci.image_config({}).workdir == "/"


@pytest.mark.parametrize(
    "config",
    [{"Healthcheck": {"Test": ["CMD", "true"], "Timeout": 10**30}},
     {"Healthcheck": {"Test": ["CMD", "x"], "Retries": "x"}}, {"Labels": ["not", "a", "map"]}, {"Env": 5}],
)  # fmt: skip
def test_a_malformed_image_config_is_refused(config: dict[str, Any]) -> None:
    with pytest.raises((ValueError, TypeError, AttributeError)):
        oci.image_config(config)


def test_an_index_without_linux_amd64_names_what_it_has() -> None:
    index = {"manifests": [{"digest": DIGEST, "size": 1, "platform": {"os": "linux", "architecture": "arm64"}}]}
    with pytest.raises(BuildFailed, match="linux/arm64"):
        oci._pick_platform(index, "x")


def test_local_references_split_path_and_tag() -> None:
    assert oci.split_local("oci-layout://base:1") == ("oci-layout", "base", "1")
    assert oci.split_local("oci-archive://dir/img.tar") == ("oci-archive", "dir/img.tar", "")
    assert oci.split_local("oci-layout://a:b/c") == ("oci-layout", "a:b/c", "")


# ---- what a registry can make the daemon connect to ----------------------------------------------
#
# Real servers on loopback addresses: a fake registry on 127.0.0.1 (configured as trusted, as an operator
# would), a token service beside it, an "internal" service on 127.0.0.2 that nothing may reach, and an
# HTTPS blob host named localhost whose certificate a test CA signs.


@dataclass(frozen=True)
class Seen:
    path: str
    authorization: str | None


Reply = tuple[int, dict[str, str], bytes]


class Server:
    """A real threaded HTTP(S) server: ``answer(path, authorization)`` replies; connections and requests are kept."""

    def __init__(self, host: str, answer: Callable[[str, str | None], Reply], tls: ssl.SSLContext | None = None):
        self.connections = 0
        self.seen: list[Seen] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.seen.append(Seen(self.path, self.headers.get("Authorization")))
                status, headers, body = answer(urllib.parse.urlsplit(self.path).path, self.headers.get("Authorization"))
                self.send_response(status)
                for k, v in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        class Counting(ThreadingHTTPServer):
            def verify_request(self, request: Any, client_address: Any) -> bool:
                outer.connections += 1
                return True

        self.server = Counting((host, 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def make_ca(tmp_path: Path) -> tuple[Path, ssl.SSLContext]:
    """A CA file for the client and a server context for 'localhost' signed by it."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ember test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    leaf = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "leaf.pem").write_bytes(
        leaf.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tmp_path / "leaf.pem")
    return tmp_path / "ca.pem", server


CONFIG_BLOB = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/app"]}}).encode()
CONFIG_DIGEST = oci.sha256_digest(CONFIG_BLOB)
MANIFEST = json.dumps({
    "schemaVersion": 2, "mediaType": oci.MANIFEST_TYPES[0], "layers": [],
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": CONFIG_DIGEST,
               "size": len(CONFIG_BLOB)},
}).encode()  # fmt: skip
TOKEN = "SECRET-TOKEN"


@dataclass
class Site:
    registry: Server
    tokens: Server
    internal: Server
    blobs: Server
    ca_file: Path
    challenge: str = ""  # the registry's 401 challenge; empty: no token needed
    manifest_location: str = ""  # where the registry redirects its manifest
    blob_location: str = ""  # where the registry redirects its config blob


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    ca_file, tls = make_ca(tmp_path)

    def registry(path: str, authorization: str | None) -> Reply:
        if s.challenge and authorization != f"Bearer {TOKEN}":
            return 401, {"WWW-Authenticate": s.challenge}, b""
        if path == "/v2/team/app/manifests/1":
            if s.manifest_location:
                return 307, {"Location": s.manifest_location}, b""
            return 200, {"Content-Type": oci.MANIFEST_TYPES[0]}, MANIFEST
        if path == f"/v2/team/app/blobs/{CONFIG_DIGEST}":
            return (307, {"Location": s.blob_location}, b"") if s.blob_location else (200, {}, CONFIG_BLOB)
        return 404, {}, b""

    def tokens(path: str, authorization: str | None) -> Reply:
        return 200, {"Content-Type": "application/json"}, json.dumps({"token": TOKEN}).encode()

    def internal(path: str, authorization: str | None) -> Reply:
        return 200, {"Content-Type": "application/json"}, json.dumps({"token": "INTERNAL-CREDENTIALS"}).encode()

    def blobs(path: str, authorization: str | None) -> Reply:
        return 200, {}, CONFIG_BLOB

    servers = [Server("127.0.0.1", registry), Server("127.0.0.1", tokens), Server("127.0.0.2", internal),
               Server("127.0.0.1", blobs, tls)]  # fmt: skip
    s = Site(*servers, ca_file=ca_file)
    try:
        yield s
    finally:
        for server in servers:
            server.close()


async def pull(site: Site, tmp_path: Path, trusted: tuple[str, ...] = ("127.0.0.1",)) -> oci.ResolvedImage:
    ref = oci.parse_reference(f"127.0.0.1:{site.registry.port}/team/app:1")
    async with oci.client(Settings(trusted_registries=trusted), ca_file=site.ca_file) as http:
        registry = oci.Registry(ref, http, ())
        return await oci.resolve(registry, oci.BlobStore(tmp_path / "cache"), ref.reference, str(ref))


async def test_a_same_host_realm_and_an_https_blob_host_work_and_only_the_registry_gets_the_token(
    site: Site, tmp_path: Path
) -> None:
    site.challenge = f'Bearer realm="http://127.0.0.1:{site.tokens.port}/token",service="reg"'
    site.blob_location = f"https://localhost:{site.blobs.port}/blob?sig=1"
    image = await pull(site, tmp_path, trusted=("127.0.0.1", "localhost"))
    assert image.config.cmd == ("/app",)
    assert [s.authorization for s in site.tokens.seen] == [None]
    assert site.tokens.seen[0].path == "/token?service=reg&scope=repository%3Ateam%2Fapp%3Apull"
    assert {s.authorization for s in site.registry.seen[1:]} == {f"Bearer {TOKEN}"}
    assert site.blobs.seen == [Seen("/blob?sig=1", None)]  # the CDN never sees the registry's token


@pytest.mark.parametrize(
    ("challenge", "manifest_location", "error"),
    [
        # the review's attack: a realm on an internal service, whose answer would be forwarded as Bearer
        (
            'Bearer realm="http://127.0.0.2:{port}/latest/meta-data/iam/security-credentials/admin"',
            "",
            "token realm must be on the registry's own host",
        ),
        ('Bearer realm="https://127.0.0.2:{port}/token"', "", "token realm must be on the registry's own host"),
        ('Bearer realm="http://localhost:{port}/token"', "", "token realm must be on the registry's own host"),
        ("", "http://127.0.0.2:{port}/admin/internal", "redirected to an address that is not https"),
        ("", "https://127.0.0.2:{port}/admin/internal", "blob host address is not allowed"),
        ("", "https://localhost:{port}/admin/internal", "blob host address is not allowed"),  # loopback after DNS
    ],
)
async def test_registry_realm_and_redirects_cannot_reach_other_hosts(
    site: Site, tmp_path: Path, challenge: str, manifest_location: str, error: str
) -> None:
    site.challenge = challenge.format(port=site.internal.port)
    site.manifest_location = manifest_location.format(port=site.internal.port)
    with pytest.raises(BuildFailed, match=error) as failed:
        await pull(site, tmp_path)
    assert site.internal.connections == 0 and site.internal.seen == []
    assert all(s.authorization is None for s in site.registry.seen)  # no token from anywhere
    message = str(failed.value)
    assert str(site.internal.port) not in message and "admin" not in message and "127.0.0.2" not in message


async def test_a_loopback_registry_is_reached_only_when_configured(site: Site, tmp_path: Path) -> None:
    with pytest.raises(BuildFailed, match="the registry address is not allowed"):
        await pull(site, tmp_path, trusted=())
    assert site.registry.connections == 0
    assert (await pull(site, tmp_path, trusted=(f"127.0.0.1:{site.registry.port}",))).config.cmd == ("/app",)


async def test_registry_failures_do_not_map_the_network(site: Site, tmp_path: Path) -> None:
    site.manifest_location = f"https://localhost:{free_port()}/x"
    with pytest.raises(BuildFailed, match="cannot reach the blob host of manifest 1: the connection failed") as e:
        await pull(site, tmp_path, trusted=("127.0.0.1", "localhost"))
    assert "localhost" not in str(e.value) and "refused" not in str(e.value).lower()
    site.manifest_location = f"/v2/team/app/manifests/{'x' * 8}"
    with pytest.raises(BuildFailed, match="manifest 1 not found in the registry"):
        await pull(site, tmp_path)
    site.manifest_location = ""
    site.challenge = f'Bearer realm="http://127.0.0.1:{site.registry.port}/no-token"'  # the registry 404s it
    with pytest.raises(BuildFailed, match=r"token service refused an anonymous pull$"):
        await pull(site, tmp_path)


def registry_named(name: str) -> oci.Registry:
    return oci.Registry(oci.parse_reference(f"{name}/team/app"), httpx.AsyncClient(), ())


@pytest.mark.parametrize(
    ("registry", "realm", "ok"),
    [
        ("docker.io", "https://auth.docker.io/token", True),
        ("registry.gitlab.com", "https://gitlab.com/jwt/auth", True),
        ("ghcr.io", "https://ghcr.io/token", True),
        ("ghcr.io", "https://github.io/token", False),
        ("docker.io", "http://auth.docker.io/token", False),  # https only
        ("docker.io", "https://user:pw@auth.docker.io/token", False),
        ("docker.io", "https://metadata.google.internal/computeMetadata/v1/", False),
        ("registry.example.com", "https://evil.example.org/", False),
        ("10.0.0.5:5000", "https://10.0.0.6/token", False),
        ("127.0.0.1:5000", "http://127.0.0.1:5001/token", True),  # loopback: same host, http allowed
        ("127.0.0.1:5000", "http://127.0.0.2/token", False),
        ("localhost:5000", "http://127.0.0.1/token", False),
        ("docker.io", "not a url", False),
    ],
)
def test_token_realms_must_be_on_the_registrys_own_site(registry: str, realm: str, ok: bool) -> None:
    reg = registry_named(registry)
    if ok:
        assert reg._realm(realm) == httpx.URL(realm)
    else:
        with pytest.raises(BuildFailed, match="token realm must be"):
            reg._realm(realm)


@pytest.mark.parametrize("name", ["a.b:99999", "a-.b", "[zz]:1"])
def test_registry_hosts_must_be_host_and_port(name: str) -> None:
    with pytest.raises(BuildFailed, match="is not a registry host"):
        registry_named(name)


class _Chunks:
    """A source that sends whatever bytes it is given for any blob."""

    name = "test"

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.sent = 0

    async def manifest(self, reference: str) -> tuple[bytes, str]:
        raise AssertionError("not asked")

    async def chunks(self, desc: oci.Descriptor) -> Any:
        for i in range(0, len(self.data), 1024):
            self.sent += 1024
            yield self.data[i : i + 1024]


@pytest.mark.parametrize("how", ["tampered", "larger", "shorter"])
async def test_blob_tampered_or_larger_than_descriptor_is_refused(tmp_path: Path, how: str) -> None:
    good = b"layer bytes " * 1000
    desc = oci.Descriptor(
        "application/vnd.oci.image.layer.v1.tar", "sha256:" + hashlib.sha256(good).hexdigest(), len(good)
    )
    sent = {"tampered": good[:-1] + b"!", "larger": good + bytes(10 << 20), "shorter": good[:-10]}[how]
    source = _Chunks(sent)
    store = oci.BlobStore(tmp_path)
    with pytest.raises(BuildFailed, match=r"larger than its manifest says|does not match"):
        await store.fetch(source, desc)
    assert not store.path(desc.digest).exists() and list(store.root.iterdir()) == []  # nothing kept, no partial
    assert source.sent <= len(good) + 2048  # a larger blob is cut off as soon as it passes its size
