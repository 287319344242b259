"""FROM images pulled from a real registry (docker-registry on 127.0.0.1) and from OCI layouts."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import secrets
import shutil
import tarfile
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from ember.sdk import Client, Request
from tests.conftest import build, remove_quietly
from tests.oci_images import Entry, Layout, compress, free_port, layer_tar, push, registry

pytestmark = [pytest.mark.vm, pytest.mark.store_agnostic]

BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static
CONFIG = {
    "Env": ["PATH=/bin", "GREETING=from the registry"], "WorkingDir": "/srv",
    "Cmd": ["busybox", "httpd", "-f", "-p", "8080", "-h", "/srv/www"], "ExposedPorts": {"8080/tcp": {}},
    "Labels": {"org.example.source": "test"},
}  # fmt: skip


def busybox_layout(root: Path) -> Path:
    """Tag 1: an index (linux/amd64 + linux/arm64) of a two-layer busybox image, gzip then zstd."""
    layout = Layout(root)
    lower = layer_tar([
        Entry("bin/", "dir"), Entry("bin/busybox", data=BUSYBOX.read_bytes(), mode=0o755),
        Entry("bin/sh", "symlink", target="/bin/busybox"), Entry("etc/", "dir"), Entry("srv/", "dir"),
        Entry("srv/www/", "dir"), Entry("srv/www/index.html", data=b"hello from the registry\n"),
        Entry("gone", data=b"deleted by the next layer"), Entry("opq/", "dir"), Entry("opq/old", data=b"old"),
    ])  # fmt: skip
    upper = layer_tar([Entry(".wh.gone"), Entry("opq/.wh..wh..opq"), Entry("opq/new", data=b"new")])
    layers = [compress(lower, "gzip"), compress(upper, "zstd")]
    amd64 = layout.image(layers, CONFIG)
    arm64 = layout.image(layers, CONFIG, arch="arm64")
    layout.tag(layout.multi_arch({"arm64": arm64, "amd64": amd64}), "1")
    layout.tag(amd64, "amd64-only")
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return busybox_layout(tmp_path_factory.mktemp("layout") / "busybox")


@pytest.fixture(scope="module")
def plain_registry(tmp_path_factory: pytest.TempPathFactory, images: Path) -> Iterator[str]:
    for host in registry(tmp_path_factory.mktemp("registry")):
        push(images, "1", f"{host}/ember-test/busybox:1")
        yield host


def test_from_a_registry_index_with_gzip_and_zstd_layers(client: Client, tmp_path: Path, plain_registry: str) -> None:
    served = httpx.get(f"http://{plain_registry}/v2/ember-test/busybox/manifests/1",
                       headers={"Accept": "application/vnd.oci.image.index.v1+json"}).json()  # fmt: skip
    assert served["mediaType"] == "application/vnd.oci.image.index.v1+json"  # the registry serves what we meant
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(
        f"FROM {plain_registry}/ember-test/busybox:1\n"
        'RUN test ! -e /gone && test "$(ls /opq)" = new && echo "built: $GREETING" > www/built.txt\n'
    )
    image, logs = build(client, ctx, "pulled")
    assert image["state"] == "CREATED", logs
    assert any("pulling layer 2/2" in line for line in logs)
    cfg = image["config"]
    assert cfg["workdir"] == "/srv" and "GREETING=from the registry" in cfg["env"]
    assert cfg["cmd"][:2] == ["busybox", "httpd"] and cfg["labels"]["org.example.source"] == "test"
    assert image["build"]["readiness"] == "tcp-ports"  # EXPOSE from the pulled image's config
    vm_id = client.vms.run("pulled").id
    try:
        got = client.vms.exec(vm_id, ["busybox", "wget", "-qO-", "http://127.0.0.1:8080/built.txt"])
        assert got.stdout.decode() == "built: from the registry\n"
    finally:
        remove_quietly(client, vm_id)

    # a second build resolves the tag again but neither downloads nor unpacks anything
    again, logs = build(client, ctx, "pulled")
    assert again["state"] == "CREATED" and not any("pulling" in line for line in logs), logs


def test_registry_errors_fail_the_build_clearly(client: Client, tmp_path: Path, plain_registry: str) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM {plain_registry}/ember-test/busybox:no-such-tag\n")
    result, _ = build(client, ctx, "missing")
    assert result["state"] == "CREATE_FAILED" and "not found in the registry" in result["error"]
    (ctx / "Dockerfile").write_text(f"FROM 127.0.0.1:{free_port()}/nobody/home\n")
    result, _ = build(client, ctx, "unreachable")
    assert result["state"] == "CREATE_FAILED" and "cannot reach the registry" in result["error"]
    # the same registry by a name the operator did not configure: loopback after DNS, refused
    port = plain_registry.rsplit(":", 1)[1]
    (ctx / "Dockerfile").write_text(f"FROM localhost:{port}/ember-test/busybox:1\n")
    result, _ = build(client, ctx, "unconfigured")
    assert result["state"] == "CREATE_FAILED" and "the registry address is not allowed" in result["error"]
    assert "127.0.0.1" not in result["error"] and "::1" not in result["error"]


def test_from_oci_layouts_and_archives_in_the_context(client: Client, tmp_path: Path, images: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    shutil.copytree(images, ctx / "layout")
    with tarfile.open(ctx / "image.tar", "w") as tar:
        for child in sorted(images.iterdir()):
            tar.add(child, arcname=child.name)
    (ctx / "Dockerfile").write_text("FROM oci-archive://image.tar:amd64-only\n")
    image, logs = build(client, ctx, "archived")
    assert image["state"] == "CREATED", logs
    (ctx / "Dockerfile").write_text("FROM oci-layout://layout:1\n")
    image, logs = build(client, ctx, "laid-out")
    assert image["state"] == "CREATED", logs

    tampered = Layout(ctx / "tampered")
    data, media_type = compress(layer_tar([Entry("hello", data=secrets.token_bytes(64))]), "gzip")
    tampered.tag(tampered.image([(data, media_type)], CONFIG), "1")
    blob = ctx / "tampered/blobs/sha256" / hashlib.sha256(data).hexdigest()
    blob.write_bytes(data[:-1] + b"!")
    (ctx / "Dockerfile").write_text("FROM oci-layout://tampered:1\n")
    result, _ = build(client, ctx, "tampered")
    assert result["state"] == "CREATE_FAILED" and "does not match its digest" in result["error"]
    (ctx / "Dockerfile").write_text("FROM oci-layout://../../etc\n")
    result, _ = build(client, ctx, "escape")
    assert result["state"] == "CREATE_FAILED" and "not an OCI image layout in the build context" in result["error"]


# ---- a registry behind a real token service -------------------------------------------------


class TokenService:
    """Docker's token auth: JWTs signed with a key whose certificate the registry trusts.

    Anonymous requests get pull access only; the push credentials get pull and push.
    """

    def __init__(self, root: Path) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ember-test-token")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(self.key, hashes.SHA256())
        )  # fmt: skip
        self.bundle = root / "token.pem"
        self.bundle.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.requests: list[dict[str, str]] = []
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = dict(urllib.parse.parse_qsl(urllib.parse.urlparse(self.path).query))
                service.requests.append(query)
                body = json.dumps({"token": service.token(query, "authorization" in self.headers)}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def token(self, query: dict[str, str], authenticated: bool) -> str:
        access = []
        for scope in query.get("scope", "").split(" "):
            kind, _, rest = scope.partition(":")
            repo, _, actions = rest.rpartition(":")
            allowed = [a for a in actions.split(",") if a == "pull" or authenticated]
            if kind == "repository":
                access.append({"type": kind, "name": repo, "actions": allowed})
        now = int(datetime.datetime.now(datetime.UTC).timestamp())
        claims = {"iss": "ember-test-issuer", "sub": "", "aud": query.get("service"), "exp": now + 300,
                  "nbf": now - 10, "iat": now, "jti": str(now), "access": access}  # fmt: skip
        der = self.cert.public_bytes(serialization.Encoding.DER)
        pem = self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return jwt.encode(claims, pem, algorithm="RS256", headers={"x5c": [base64.b64encode(der).decode()]})


def test_from_a_registry_that_wants_a_bearer_token(client: Client, tmp_path: Path, images: Path) -> None:
    tokens = TokenService(tmp_path)
    auth = {"token": {"realm": tokens.realm, "service": "ember-test", "issuer": "ember-test-issuer",
                      "rootcertbundle": str(tokens.bundle)}}  # fmt: skip
    try:
        for host in registry(tmp_path / "registry", auth):
            push(images, "amd64-only", f"{host}/private/busybox:2", creds="pusher:secret")
            assert httpx.get(f"http://{host}/v2/private/busybox/manifests/2").status_code == 401
            ctx = tmp_path / "ctx"
            ctx.mkdir()
            (ctx / "Dockerfile").write_text(f"FROM {host}/private/busybox:2\n")
            image, logs = build(client, ctx, "tokened")
            assert image["state"] == "CREATED", logs
            anonymous = [r for r in tokens.requests if r.get("scope") == "repository:private/busybox:pull"]
            assert anonymous and anonymous[-1]["service"] == "ember-test"
    finally:
        tokens.server.shutdown()
        tokens.server.server_close()
    names = [i["name"] for i in client.send(Request("GET", "/v1/images"))]
    assert "tokened:1" in names
