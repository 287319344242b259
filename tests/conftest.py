"""Shared fixtures. VM tests talk to a real daemon process booting real micro-VMs.

Layers (as in Firecracker's test framework): ``daemon`` (a real ``ember serve``
with its own data directory), ``base_image`` (the built-in image, built once
per run), and ``vm``: a VM launched from the image's snapshot, parametrized
as ``launched`` (fresh clone) and ``resumed`` (after a suspend/resume
cycle), so every guest test runs on both. When a test fails, the serial and
VMM logs of every VM and the daemon log are copied to ``artifacts/``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from ember.config import Settings
from ember.sdk import ApiError, Client, Request
from ember.sdk.context import context_tar
from ember.sdk.core import build_request
from tests.awsfixtures import aws_client, aws_endpoint, aws_tenant  # noqa: F401 (fixtures for every test)
from tests.databases import daemon_database_url, drop_database
from tests.s3store import S3Store, s3_store  # noqa: F401 (a real S3-compatible store for every test that asks)

ROOT = Path(__file__).resolve().parent.parent
AGENT_TIMEOUT_S = 10  # the test daemon's limit on one agent request
TAR_MAX_BYTES = 192 << 20  # the test daemon's limit on one untrusted tar, decompressed
TEST_UID_BLOCK_BASE, TEST_UID_BLOCK = 800000, 2048
ARTIFACTS = ROOT / "artifacts"


class DaemonProcess:
    """A real ``ember serve`` process with its own data directory."""

    def __init__(
        self, settings: Settings, log: Path, command: tuple[str, ...] = ("-m", "ember", "serve", "-v")
    ) -> None:
        if settings.ingress_listen == Settings().ingress_listen:  # never a real daemon's port, nor another test's
            settings = dataclasses.replace(settings, ingress_listen=f"127.0.0.1:{free_port()}")
        self.settings = settings
        self.log = log
        self.command = command  # the Python arguments that start the daemon
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        for f in fields(Settings):
            value = getattr(self.settings, f.name)
            env[f.metadata["env"]] = ",".join(value) if isinstance(value, tuple) else str(value)
        return env

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, *self.command], stdout=log, stderr=log, env=self.env)
        deadline = time.monotonic() + 120
        while not self._accepting():
            assert self.proc.poll() is None, f"daemon exited at start-up:\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "daemon did not start"
            time.sleep(0.1)

    def _accepting(self) -> bool:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(self.settings.socket_path))
            except OSError:
                return False
        return True

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_alive(pid: int) -> bool:
    """True for a live process; a zombie (dead, awaiting its reaper) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def vm_tests_possible() -> str | None:
    if os.geteuid() != 0:
        return "VM tests need root"
    if shutil.which("qemu-system-x86_64") is None:
        return "QEMU is not installed (scripts/install.sh)"
    return None


@pytest.fixture(scope="session")
def settings(s3_store: S3Store) -> Iterator[Settings]:  # noqa: F811 (the fixture imported above)
    reason = vm_tests_possible()
    if reason:
        pytest.fail(reason)  # never skip silently: CI must boot real VMs
    data = Path(tempfile.mkdtemp(prefix="ember-test-"))
    artifacts = Path(tempfile.mkdtemp(prefix="ember-test-artifacts-"))  # file:// code artifacts: <root>/<account>/
    cache = os.environ.get("EMBER_TEST_CACHE", "/var/cache/ember-test")
    database_url = daemon_database_url("session")  # "": SQLite in the data directory (tests.databases)
    yield Settings.from_env(
        {
            "EMBER_DATA_DIR": str(data),
            "EMBER_DATABASE_URL": database_url,
            "EMBER_SOCKET": str(data / "ember.sock"),
            "EMBER_CACHE_DIR": cache,
            "EMBER_AGENT_TIMEOUT": str(AGENT_TIMEOUT_S),
            "EMBER_TAR_MAX_BYTES": str(TAR_MAX_BYTES),  # small enough for bombs to hit it quickly
            # a block of host ids of its own: a developer's daemon or another run may be up
            "EMBER_UID_BASE": str(TEST_UID_BLOCK_BASE + (os.getpid() % 200) * 2 * TEST_UID_BLOCK),
            "EMBER_UID_COUNT": str(TEST_UID_BLOCK),
            "EMBER_NET_CIDR": "10.201.0.0/16",  # VM egress veths: not a developer daemon's (tests/vm/test_network.py)
            # the tests' registries and token services listen on 127.0.0.1 (tests.oci_images)
            "EMBER_TRUSTED_REGISTRIES": "127.0.0.1",
            # the webhook tests' receivers listen on 127.0.0.1 (tests/vm/test_webhooks.py); retries come quickly
            "EMBER_WEBHOOK_TRUSTED_HOSTS": "127.0.0.1",
            "EMBER_WEBHOOK_BACKOFF": "0.2",
            # a burst a test can pass on purpose (tests/vm/test_tenancy.py), and more than any other test sends
            # the build tests queue concurrent builds of one tenant behind EMBER_MAX_BUILDS
            "EMBER_QUOTA_CONCURRENT_BUILDS": "8",
            "EMBER_RATE_LIMIT_PER_S": "100",
            "EMBER_RATE_LIMIT_BURST": "200",
            "EMBER_INGRESS_HEAD_TIMEOUT": "2",  # a slow request head is cut quickly (tests/vm/test_ingress.py)
            "EMBER_USAGE_SAMPLE_S": "1",  # storage usage of a VM suspended for seconds shows (tests/vm/test_usage.py)
            "EMBER_LISTEN": f"127.0.0.1:{free_port()}",  # boto3 reaches the AWS API over TCP (tests/awsfixtures.py)
            # the AWS API's code artifacts: s3:// in the session's SeaweedFS, file:// under a root of the session's
            **s3_store.env(),
            "EMBER_AWS_FILE_ARTIFACT_ROOT": str(artifacts),
        }
    )
    shutil.rmtree(data, ignore_errors=True)
    shutil.rmtree(artifacts, ignore_errors=True)
    if database_url:
        drop_database(database_url)


@pytest.fixture(scope="session")
def daemon(settings: Settings) -> Iterator[DaemonProcess]:
    d = DaemonProcess(settings, settings.data_dir.parent / f"{settings.data_dir.name}-daemon.log")
    d.start()
    yield d
    # a stopped daemon leaves VMs running for its successor: remove them all first
    with Client(settings=settings) as c:
        for vm in c.send(Request("GET", "/v1/vms")):
            remove_quietly(c, vm["id"])
    d.stop()


@pytest.fixture(scope="session")
def client(daemon: DaemonProcess) -> Iterator[Client]:
    with Client(settings=daemon.settings) as c:
        yield c


@pytest.fixture(scope="session")
def base_image(client: Client) -> str:
    for event in client.stream(Request("POST", "/v1/images/debian/prepare")):
        if "error" in event:
            pytest.fail(f"building the base image failed: {event}")
    return "debian"


def build(
    client: Client, ctx: Path, name: str, on_log: Callable[[str], None] | None = None, **options: Any
) -> tuple[dict[str, Any], list[str]]:
    """An image build through the API: (the final build record, the streamed log lines)."""
    logs: list[str] = []
    result: dict[str, Any] = {}
    for event in client.stream(build_request(name, context_tar(ctx), **options)):
        if "log" in event:
            logs.append(event["log"])
            if on_log is not None:
                on_log(event["log"])
        elif "build" in event:
            result = event["build"]
    return result, logs


def remove_quietly(client: Client, vm_id: str) -> None:
    try:
        client.send(Request("DELETE", f"/v1/vms/{vm_id}"))
    except ApiError as exc:
        assert exc.status == 404, exc


@pytest.fixture
def no_vms_left(daemon: DaemonProcess) -> Iterator[None]:
    """For tests that kill and restart the session's daemon: whatever happens in the test, the
    next one starts with a running daemon and no VM (a failure here must not cascade into load,
    leftover QEMUs and false failures of the tests after it)."""
    yield
    if daemon.proc is None or daemon.proc.poll() is not None:
        daemon.start()
    with Client(settings=daemon.settings) as c:
        for vm in c.send(Request("GET", "/v1/vms")):
            remove_quietly(c, vm["id"])


@pytest.fixture(params=["launched", "resumed"])
def vm(request: pytest.FixtureRequest, client: Client, base_image: str) -> Iterator[str]:
    vm_id = client.vms.run(base_image).id
    if request.param == "resumed":
        client.send(Request("POST", f"/v1/vms/{vm_id}/suspend"))
        client.send(Request("POST", f"/v1/vms/{vm_id}/resume"))
    yield vm_id
    remove_quietly(client, vm_id)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that boot nothing and reach no database of :mod:`tests.databases` (pure logic, or a SQLite file of
    their own in both passes) are store-agnostic: the PostgreSQL pass would run them exactly as the SQLite
    pass did. Only :mod:`tests.databases` hands out PostgreSQL databases, and only the ``settings`` fixture's
    daemon (and modules that use :mod:`tests.databases`) reach one."""
    for item in items:
        if item.get_closest_marker("vm") or item.get_closest_marker("store_agnostic"):
            continue
        module = getattr(item, "module", None)
        if "settings" in getattr(item, "fixturenames", ()) or module is None or _reaches_test_databases(module):
            continue
        item.add_marker(pytest.mark.store_agnostic)


def _reaches_test_databases(module: object) -> bool:
    return any(
        getattr(value, "__module__", None) == "tests.databases" or getattr(value, "__name__", None) == "tests.databases"
        for value in vars(module).values()
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    if report.failed and "settings" in getattr(item, "fixturenames", ()):
        settings = item.funcargs.get("settings")  # type: ignore[attr-defined]
        if not isinstance(settings, Settings):
            return report
        out = ARTIFACTS / item.nodeid.replace("/", "_").replace("::", "__")
        out.mkdir(parents=True, exist_ok=True)
        for log in settings.data_dir.glob("**/run/*.log"):
            shutil.copy(log, out / f"{log.parent.parent.name}-{log.name}")
        daemon_log = settings.data_dir.parent / f"{settings.data_dir.name}-daemon.log"
        if daemon_log.exists():
            shutil.copy(daemon_log, out / "daemon.log")
    return report
