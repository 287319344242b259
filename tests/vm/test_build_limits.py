"""Builds cannot hang or flood the daemon; every failure ends CREATE_FAILED and leaves nothing behind.

These tests run their own daemon with short limits (a 60 s step deadline, a 1 MiB build log,
two builds at once), so a hijacked step or a flood shows within a test's time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ember.config import Settings
from ember.host.cgroup import group_for
from ember.sdk import ApiError, Client, Request
from ember.sdk.context import context_tar
from ember.sdk.core import build_request
from tests.conftest import TEST_UID_BLOCK, TEST_UID_BLOCK_BASE, DaemonProcess, process_alive, vm_tests_possible
from tests.databases import daemon_database_url, drop_database

pytestmark = [pytest.mark.vm, pytest.mark.store_agnostic]  # the build sandbox's limits: SQLite pass only

STEP_TIMEOUT_S = 50
LOG_CAP = 1024 * 1024
# In the build VM, root can move the agent (PID 1) into a frozen cgroup: it never answers again.
FREEZE_AGENT = (
    "echo freezing-the-agent && sleep 2 && mount -t cgroup2 none /sys/fs/cgroup && mkdir /sys/fs/cgroup/hold "
    "&& echo 1 > /sys/fs/cgroup/hold/cgroup.procs && echo 1 > /sys/fs/cgroup/hold/cgroup.freeze && sleep 1000"
)


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    reason = vm_tests_possible()
    if reason:
        pytest.fail(reason)
    data = Path(tempfile.mkdtemp(prefix="ember-limits-"))
    database_url = daemon_database_url("limits")  # PostgreSQL in the suite's second pass
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
            "EMBER_BUILD_STEP_TIMEOUT": str(STEP_TIMEOUT_S),
            "EMBER_BUILD_LOG_MAX_BYTES": str(LOG_CAP),
            "EMBER_MAX_BUILDS": "2",
            "EMBER_QUOTA_CONCURRENT_BUILDS": "8",  # root's builds queue behind EMBER_MAX_BUILDS, not a quota
        }
    )
    d = DaemonProcess(settings, data.parent / f"{data.name}-daemon.log")
    d.start()
    yield d
    d.stop()
    shutil.rmtree(data, ignore_errors=True)
    if database_url:
        drop_database(database_url)


@pytest.fixture(scope="module")
def client(daemon: DaemonProcess) -> Iterator[Client]:
    with Client(settings=daemon.settings) as c:
        yield c


def leftovers(settings: Settings) -> list[str]:
    data = settings.data_dir
    found = [p for pattern in ("build-*", ".rootfs-*", ".layout-*", "tmp*") for p in data.glob(pattern)]
    found += list((data / "run").glob("build-*"))
    return sorted(str(p.relative_to(data)) for p in found)


def build_vm_pids(settings: Settings) -> list[int]:
    """This daemon's build VMMs (QEMU in its cgroups named build-*: cold-booted or restored)."""
    marker = f"/{group_for(settings.data_dir)}/build-"
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
                cgroups = (proc / "cgroup").read_text()
            except OSError:
                continue
            if b"qemu-system" in cmdline and marker in cgroups and process_alive(int(proc.name)):
                pids.append(int(proc.name))
    return pids


class BuildThread(threading.Thread):
    """A build streamed in the background; each log line is kept with when it arrived."""

    def __init__(self, settings: Settings, ctx: Path, name: str) -> None:
        super().__init__(daemon=True)
        self.settings, self.ctx, self.name_ = settings, ctx, name
        self.lines: list[tuple[float, str]] = []
        self.result: dict[str, Any] = {}
        self.error: Exception | None = None  # the stream broke (the daemon was killed)
        self.finished_at = 0.0

    def run(self) -> None:
        try:
            with Client(settings=self.settings) as c:
                for event in c.stream(build_request(self.name_, context_tar(self.ctx))):
                    if "log" in event:
                        self.lines.append((time.monotonic(), event["log"]))
                    self.result = event.get("build", self.result)
        except Exception as exc:
            self.error = exc
        self.finished_at = time.monotonic()

    def first(self, text: str) -> float:
        return next((t for t, line in self.lines if text in line), 0.0)

    def wait_for(self, text: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while not self.first(text):
            assert self.is_alive(), f"{self.name_} ended before '{text}': {self.result}"
            assert time.monotonic() < deadline, f"{self.name_}: no '{text}' in {[line for _, line in self.lines]}"
            time.sleep(0.1)
        return self.first(text)


def context(root: Path, dockerfile: str) -> Path:
    root.mkdir()
    (root / "Dockerfile").write_text(dockerfile)
    return root


def test_ready_timeout_nan_inf_rejected(client: Client, daemon: DaemonProcess, tmp_path: Path) -> None:
    ctx = context(tmp_path / "ctx", "FROM scratch\n")
    for bad in ("nan", "inf", "-inf", "0", "-1", "3601"):
        with pytest.raises(ApiError) as err:
            list(client.stream(build_request("sloth", context_tar(ctx), ready_timeout=bad)))
        assert err.value.status == 400, (bad, err.value)
        assert "ready_timeout" in str(err.value), str(err.value)
    assert client.send(Request("GET", "/v1/images")) == []
    assert leftovers(daemon.settings) == []


def test_stuck_build_fails_on_time_without_blocking_others_and_a_third_queues(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    settings = daemon.settings
    stuck = BuildThread(
        settings, context(tmp_path / "stuck", f"FROM ember:debian-python3\nRUN {FREEZE_AGENT}\n"), "stuck"
    )
    second = BuildThread(
        settings, context(tmp_path / "second", "FROM ember:debian-python3\nRUN echo second\n"), "second"
    )
    third = BuildThread(settings, context(tmp_path / "third", "FROM scratch\nCOPY missing /missing\n"), "third")

    stuck.start()
    frozen_at = stuck.wait_for("freezing-the-agent", 180)
    second.start()
    second.wait_for("building second:1", 30)
    third.start()
    third.wait_for("queued behind 2 build(s)", 30)
    assert not third.first("building third:1"), "a third build ran beyond EMBER_MAX_BUILDS=2"

    # the second build runs its own build VM and finishes while the stuck one is still stuck
    second.join(300)
    assert second.result.get("state") == "CREATED", second.result
    assert not stuck.result, "the stuck build ended before the second one"
    assert len(egress_uids(settings)) == 1, "the stuck build's VMM lost its egress filter"

    stuck.join(STEP_TIMEOUT_S + 120)
    third.join(60)
    assert stuck.result.get("state") == "CREATE_FAILED", stuck.result
    error = stuck.result["error"]
    assert error.startswith("step at line 2 (RUN echo freezing-the-agent"), error
    assert f"did not finish within {STEP_TIMEOUT_S} s" in error and "killed" in error, error
    took = stuck.finished_at - frozen_at
    assert took < STEP_TIMEOUT_S + 30, f"the stuck step was given up after {took:.0f} s"
    assert third.result.get("state") == "CREATE_FAILED" and third.first("building third:1"), third.result
    assert build_vm_pids(settings) == [], "a build VM outlived its build"
    assert leftovers(settings) == []
    assert egress_uids(settings) == [], "a build VMM's uid stayed in the egress filter after its build"


def egress_uids(settings: Settings) -> list[int]:
    """The build VMM uids the daemon's egress filter holds (its table is there as long as the daemon)."""
    table = f"ember_build_{settings.uid_base}"
    out = subprocess.run(["nft", "-j", "list", "set", "inet", table, "builders"], capture_output=True, check=True)
    sets = [item["set"] for item in json.loads(out.stdout)["nftables"] if "set" in item]
    return sorted(int(e) for e in sets[0].get("elem", []))


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_build_log_flood_with_disconnected_client_is_bounded(
    client: Client, daemon: DaemonProcess, tmp_path: Path
) -> None:
    flood_mib = 96  # lines of 1 KiB; before the fix they all piled up in the daemon for the gone client
    ctx = context(
        tmp_path / "flood",
        f'FROM ember:debian-python3\nRUN yes "$(printf %01023d 0)" | head -c {flood_mib}M; echo flood-done\n',
    )
    assert daemon.proc is not None
    pid = daemon.proc.pid
    with Client(settings=daemon.settings) as gone:
        events = gone.stream(build_request("flood", context_tar(ctx)))
        for event in events:
            if "building flood:1" in event.get("log", ""):
                break
        events.close()  # the client goes away
    baseline = _rss_kib(pid)
    peak = baseline
    deadline = time.monotonic() + 400
    state = "BUILDING"
    while state == "BUILDING":
        assert time.monotonic() < deadline, "the flood build did not finish"
        peak = max(peak, _rss_kib(pid))
        state = client.send(Request("GET", "/v1/images/flood:1"))["state"]
        time.sleep(0.2)
    assert state == "CREATED", client.send(Request("GET", "/v1/images/flood:1"))
    assert (peak - baseline) < 40 * 1024, f"daemon RSS grew by {(peak - baseline) // 1024} MiB"

    log_file = daemon.settings.data_dir / "builds" / "flood:1.log"
    size = log_file.stat().st_size
    assert size <= LOG_CAP + 4096, f"build log is {size} bytes"
    text = log_file.read_text()
    assert "log truncated" in text and text.rstrip().splitlines()[-1].startswith("CREATED flood:1")

    tail = client.text(Request("GET", "/v1/images/flood:1/logs", {"tail": 4000}))
    assert len(tail) <= 4200 and tail.startswith("... ") and "earlier bytes of the log not shown" in tail
    assert "CREATED flood:1" in tail
    whole = client.text(Request("GET", "/v1/images/flood:1/logs"))
    assert whole == text, "the default tail holds a whole capped log"
    with pytest.raises(ApiError) as err:
        client.text(Request("GET", "/v1/images/flood:1/logs", {"tail": 0}))
    assert err.value.status == 400


def test_daemon_kill9_mid_build_leaves_no_build_dirs(daemon: DaemonProcess, tmp_path: Path) -> None:
    settings = daemon.settings
    victim = BuildThread(
        settings, context(tmp_path / "victim", "FROM ember:debian-python3\nRUN echo started && sleep 1000\n"), "victim"
    )
    victim.start()
    victim.wait_for("started", 180)
    assert leftovers(settings), "the build should have its context and run directories now"
    vm_pids = build_vm_pids(settings)
    assert vm_pids

    daemon.kill9()
    victim.join(30)
    daemon.start()
    assert leftovers(settings) == [], "an interrupted build's directories survived the restart"
    assert not [p for p in vm_pids if process_alive(p)], "the interrupted build's VM survived the restart"
    with Client(settings=settings) as c:
        record = c.send(Request("GET", "/v1/images/victim:1"))
    assert record["state"] == "CREATE_FAILED" and "interrupted" in record["error"], record
    assert not list((settings.data_dir / "layers").glob("*.qcow2.tmp")) and all(
        p.with_suffix(".json").exists() for p in (settings.data_dir / "layers").glob("*.qcow2")
    ), "an unfinished layer survived the restart"
