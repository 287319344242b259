"""Test images built byte by byte: layer tars, OCI layouts, a real registry to push them to.

Layouts are written here (blobs, manifests, an index with two platforms) so the
tests control every detail a pull has to handle (gzip and zstd layers,
whiteouts, opaque directories, absolute symlinks); ``skopeo`` pushes them to a
real ``docker-registry`` on 127.0.0.1, optionally behind a real token service.
The test daemon trusts 127.0.0.1 (``EMBER_TRUSTED_REGISTRIES`` in tests/conftest.py):
an operator's choice, since loopback is otherwise refused to registry pulls.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import socket
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import zstandard

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str = "file"  # file, dir, symlink, link
    data: bytes = b""
    target: str = ""
    mode: int = 0o644


def layer_tar(entries: list[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.mode = e.mode
            info.mtime = 1_700_000_000
            if e.kind == "dir":
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
            elif e.kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, e.target
            elif e.kind == "link":
                info.type, info.linkname = tarfile.LNKTYPE, e.target
            else:
                info.size = len(e.data)
            tar.addfile(info, io.BytesIO(e.data) if e.kind == "file" else None)
    return buf.getvalue()


def compress(tar: bytes, how: str) -> tuple[bytes, str]:
    base = "application/vnd.oci.image.layer.v1.tar"
    if how == "gzip":
        return gzip.compress(tar, mtime=0), base + "+gzip"
    if how == "zstd":
        return zstandard.ZstdCompressor().compress(tar), base + "+zstd"
    return tar, base


Descriptor = dict[str, object]


class Layout:
    """An OCI image layout directory being written."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        self.index: list[dict[str, object]] = []

    def blob(self, data: bytes, media_type: str) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        (self.root / "blobs" / "sha256" / digest).write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    def image(
        self, layers: list[tuple[bytes, str]], config: dict[str, object], arch: str = "amd64"
    ) -> dict[str, object]:
        diff_ids = []
        descs = []
        for data, media_type in layers:
            raw = data
            if media_type.endswith("+gzip"):
                raw = gzip.decompress(data)
            elif media_type.endswith("+zstd"):
                raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=1 << 30)
            diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
            descs.append(self.blob(data, media_type))
        cfg = {
            "architecture": arch,
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
        cfg_desc = self.blob(json.dumps(cfg).encode(), "application/vnd.oci.image.config.v1+json")
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": cfg_desc, "layers": descs}
        return self.blob(json.dumps(manifest).encode(), OCI_MANIFEST)

    def tag(self, desc: dict[str, object], tag: str) -> None:
        self.index.append({**desc, "annotations": {"org.opencontainers.image.ref.name": tag}})
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.index}
        (self.root / "index.json").write_text(json.dumps(index))

    def multi_arch(self, images: dict[str, dict[str, object]]) -> dict[str, object]:
        manifests = [{**d, "platform": {"os": "linux", "architecture": a}} for a, d in images.items()]
        return self.blob(json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}).encode(),
                         OCI_INDEX)  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on {port}")


def registry(root: Path, auth: dict[str, object] | None = None) -> Iterator[str]:
    """A real docker-registry on 127.0.0.1 (its host:port), storage under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {
        "version": 0.1, "log": {"level": "warn"}, "http": {"addr": f"127.0.0.1:{port}"},
        "storage": {"filesystem": {"rootdirectory": str(root / "storage")}},
    }  # fmt: skip
    if auth is not None:
        config["auth"] = auth
    (root / "config.yml").write_text(json.dumps(config))  # JSON is YAML
    with open(root / "registry.log", "wb") as log:
        proc = subprocess.Popen(["docker-registry", "serve", str(root / "config.yml")], stdout=log, stderr=log)
    try:
        wait_port(port, proc, "docker-registry")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def push(layout: Path, tag: str, dest: str, creds: str = "") -> None:
    """skopeo copy of a layout's tag (and every platform of an index) to a registry."""
    cmd = ["skopeo", "copy", "--all", "--dest-tls-verify=false", "--preserve-digests"]
    if creds:
        cmd.append(f"--dest-creds={creds}")
    subprocess.run([*cmd, f"oci:{layout}:{tag}", f"docker://{dest}"], check=True, capture_output=True, timeout=120)
