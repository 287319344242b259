"""Idle policy, lifetime and auto-resume through a real daemon and real VMs (ember.lifecycle).

Its own daemon: idle timeouts from 2 s (EMBER_MIN_IDLE_SECONDS) and a scheduler pass every 0.5 s, so an
idle suspend shows within seconds; it is killed with -9 and restarted by the last test.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from ember.config import Settings
from ember.sdk import Client, IdlePolicy, InvalidState, QuotaExceeded, Request
from tests.conftest import TEST_UID_BLOCK, TEST_UID_BLOCK_BASE, DaemonProcess, remove_quietly, vm_tests_possible
from tests.databases import daemon_database_url, drop_database
from tests.vm.test_ingress import echo, open_websocket, start_app
from tests.vm.test_ingress import get as ingress_get

pytestmark = pytest.mark.vm

CHECK_S = 0.5  # the scheduler's pass
SLACK_S = 10.0  # a suspend (TCG, a loaded host) and a pass or two


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    reason = vm_tests_possible()
    if reason:
        pytest.fail(reason)
    data = Path(tempfile.mkdtemp(prefix="ember-idle-"))
    database_url = daemon_database_url("idle")  # PostgreSQL in the suite's second pass
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
            "EMBER_MIN_IDLE_SECONDS": "2",
            "EMBER_IDLE_CHECK_S": str(CHECK_S),
            "EMBER_POOL_SIZE": "1",
        }
    )
    d = DaemonProcess(settings, data.parent / f"{data.name}-daemon.log")
    d.start()
    yield d
    with Client(settings=settings) as c:
        for vm in c.send(Request("GET", "/v1/vms")):
            remove_quietly(c, vm["id"])
    d.stop()
    shutil.rmtree(data, ignore_errors=True)
    if database_url:
        drop_database(database_url)


@pytest.fixture(scope="module")
def client(daemon: DaemonProcess) -> Iterator[Client]:
    with Client(settings=daemon.settings) as c:
        for event in c.stream(Request("POST", "/v1/images/debian/prepare")):
            assert "error" not in event, event
        yield c


@pytest.fixture
def launch(client: Client) -> Iterator[Callable[..., str]]:
    made: list[str] = []

    def run(**policy: Any) -> str:
        vm_id = client.vms.run("debian", idle=IdlePolicy(**policy)).id
        made.append(vm_id)
        return vm_id

    yield run
    for vm_id in made:
        remove_quietly(client, vm_id)


def state(client: Client, vm_id: str) -> dict[str, Any]:
    result: dict[str, Any] = client.send(Request("GET", f"/v1/vms/{vm_id}"))
    return result


def wait_state(client: Client, vm_id: str, want: str, within: float) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while (view := state(client, vm_id))["state"] != want:
        assert time.monotonic() < deadline, f"{vm_id} is {view['state']} ({view['state_reason']}), not {want}"
        time.sleep(0.1)
    return view


def events(client: Client, vm_id: str) -> list[tuple[str, str, str]]:
    return [(e.to_state, e.reason, e.actor) for e in client.vms.events(vm_id)]


def seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


def event_at(client: Client, vm_id: str, to_state: str) -> float:
    return max(seconds(e.at) for e in client.vms.events(vm_id) if e.to_state == to_state)


def test_an_idle_vm_suspends_and_an_exec_or_a_file_read_resumes_it_intact(client: Client, launch: Any) -> None:
    vm = launch(timeout_s=2, auto_resume=True)
    client.files.write(vm, "/root/kept", b"kept across suspends")
    client.vms.exec(vm, ["sh", "-c", "sleep 10000 > /dev/null 2>&1 & echo $! > /root/sleeper"])
    last_use = time.time()
    view = wait_state(client, vm, "SUSPENDED", 2 + SLACK_S)
    assert view["state_reason"] == "idle" and view["suspended_at"]
    late = event_at(client, vm, "SUSPENDING") - (last_use + 2)
    print(f"idle detection: suspending {late:.2f} s after the idle timeout")
    assert 0 <= late < SLACK_S

    started = time.perf_counter()
    assert client.files.read(vm, "/root/kept") == b"kept across suspends"
    print(f"auto-resume: a file read of a suspended VM took {(time.perf_counter() - started) * 1000:.0f} ms")
    assert state(client, vm)["state"] == "RUNNING"
    wait_state(client, vm, "SUSPENDED", 2 + SLACK_S)
    started = time.perf_counter()
    result = client.vms.exec(vm, ["sh", "-c", "kill -0 $(cat /root/sleeper) && cat /root/kept"])
    print(f"auto-resume: an exec in a suspended VM took {(time.perf_counter() - started) * 1000:.0f} ms")
    assert result.exit_code == 0 and result.stdout == b"kept across suspends"
    assert [e for e in events(client, vm) if e[1] in ("idle", "auto_resume")] == [
        ("SUSPENDING", "idle", "system"), ("SUSPENDED", "idle", "system"),
        ("RESUMING", "auto_resume", "system"), ("RUNNING", "auto_resume", "system"),
    ] * 2  # fmt: skip


def test_ingress_requests_and_websockets_resume_an_idle_vm_and_an_open_one_keeps_it_awake(
    client: Client, launch: Any, daemon: DaemonProcess
) -> None:
    """The ingress is activity: an open WebSocket keeps the VM awake past its idle timeout; once it is
    closed the VM suspends, and an HTTP request, then a WebSocket, through the ingress resume it with
    its app (a process started before) still serving."""
    host, _, port = daemon.settings.ingress_listen.rpartition(":")
    ingress = (host, int(port))
    vm = client.vms.get(launch(timeout_s=2, auto_resume=True))
    start_app(vm)
    token = vm.auth_token(ports=8080, minutes=10).token
    with open_websocket(ingress, vm.id, token) as ws:
        time.sleep(6)  # three idle timeouts
        assert state(client, vm.id)["state"] == "RUNNING", "suspended under an open ingress connection"
        echo(ws, b"still here")
    wait_state(client, vm.id, "SUSPENDED", 2 + SLACK_S)

    started = time.perf_counter()
    status, body = ingress_get(ingress, "/headers", {"X-Ember-Proxy-Auth": token}, vm.id)
    print(f"auto-resume: an HTTP request to a suspended VM took {(time.perf_counter() - started) * 1000:.0f} ms")
    assert status == 200 and json.loads(body)["port"] == 8080
    wait_state(client, vm.id, "SUSPENDED", 2 + SLACK_S)
    with open_websocket(ingress, vm.id, token) as ws:
        echo(ws, b"resumed by a websocket")
    assert [e[1] for e in events(client, vm.id) if e[0] == "RESUMING"] == ["auto_resume", "auto_resume"]


def test_a_busy_vm_is_not_suspended_until_it_is_idle(client: Client, launch: Any) -> None:
    running, burning, held = (launch(timeout_s=2) for _ in range(3))
    exec_done = threading.Event()

    def long_exec() -> None:
        client.vms.exec(running, ["sleep", "8"])
        exec_done.set()

    threading.Thread(target=long_exec, daemon=True).start()
    client.vms.exec(
        burning, ["sh", "-c", "nohup sh -c 'while :; do :; done' > /dev/null 2>&1 & echo $! > /root/burner"]
    )
    hold = client.vms.exec(held, ["ember-idle", "hold"], user="nobody")  # any guest user may hold
    assert hold.exit_code == 0, hold.stderr
    assert client.vms.exec(held, ["ember-idle", "status"]).stdout == b"held\n"
    time.sleep(7)
    for vm in (running, burning, held):
        assert state(client, vm)["state"] == "RUNNING", f"{vm} was suspended while busy"

    # then idle again: each is suspended
    assert exec_done.wait(10)
    client.vms.exec(burning, ["sh", "-c", "kill $(cat /root/burner)"])
    client.vms.exec(held, ["/run/ember/bin/ember-idle", "release"])
    for vm in (running, burning, held):
        assert wait_state(client, vm, "SUSPENDED", 2 + SLACK_S)["state_reason"] == "idle"


def test_the_guest_asks_to_be_suspended_now(client: Client, launch: Any) -> None:
    vm = launch(timeout_s=600)
    asked = time.time()
    client.vms.exec(vm, ["ember-idle", "suspend"])
    view = wait_state(client, vm, "SUSPENDED", SLACK_S)
    assert view["state_reason"] == "idle" and "asked by the guest" in view["state_message"]
    assert event_at(client, vm, "SUSPENDING") - asked < 2 * CHECK_S + 2
    # the request was consumed: resumed, it is not suspended again
    client.vms.resume(vm)
    time.sleep(3)
    assert state(client, vm)["state"] == "RUNNING"
    usage = client.vms.exec(vm, ["ember-idle"])
    assert usage.exit_code == 2 and b"usage: ember-idle hold|release|suspend|status" in usage.stderr


def test_suspended_ttl_terminates_and_without_auto_resume_an_exec_is_refused(client: Client, launch: Any) -> None:
    vm = launch(suspended_ttl_s=3)
    client.vms.suspend(vm)
    with pytest.raises(InvalidState, match="while it is SUSPENDED: resume it first"):
        client.vms.exec(vm, ["true"])
    view = wait_state(client, vm, "TERMINATED", 3 + SLACK_S)
    assert view["state_reason"] == "suspended_ttl"
    assert events(client, vm)[-2:] == [
        ("TERMINATING", "suspended_ttl", "system"),
        ("TERMINATED", "suspended_ttl", "system"),
    ]
    assert event_at(client, vm, "TERMINATING") - event_at(client, vm, "SUSPENDED") >= 3


def test_a_suspended_ttl_of_0_terminates_an_idle_vm(client: Client, launch: Any) -> None:
    vm = launch(timeout_s=2, suspended_ttl_s=0)
    view = wait_state(client, vm, "TERMINATED", 2 + SLACK_S)
    assert view["state_reason"] == "idle"
    assert "SUSPENDED" not in [e[0] for e in events(client, vm)]


def test_max_duration_counts_suspended_time_unless_running_only(client: Client, launch: Any) -> None:
    total = launch(max_duration_s=4)
    running_only = launch(max_duration_s=4, max_duration_running_only=True)
    client.vms.suspend(total)
    client.vms.suspend(running_only)
    view = wait_state(client, total, "TERMINATED", 4 + SLACK_S)
    assert view["state_reason"] == "max_duration"
    assert event_at(client, total, "TERMINATING") - seconds(view["created_at"]) >= 4
    time.sleep(2)
    assert state(client, running_only)["state"] == "SUSPENDED"  # its clock stops while suspended
    client.vms.resume(running_only)
    view = wait_state(client, running_only, "TERMINATED", 4 + SLACK_S)
    assert view["state_reason"] == "max_duration"
    assert events(client, running_only)[-1] == ("TERMINATED", "max_duration", "system")


def test_concurrent_calls_to_a_suspended_vm_share_one_resume(client: Client, launch: Any) -> None:
    vm = launch(auto_resume=True)
    client.files.write(vm, "/root/n", b"42")
    client.vms.suspend(vm)
    results: list[bytes] = []
    threads = [
        threading.Thread(target=lambda: results.append(client.vms.exec(vm, ["cat", "/root/n"]).stdout))
        for _ in range(4)
    ] + [threading.Thread(target=lambda: results.append(client.files.read(vm, "/root/n"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [b"42"] * 6
    assert [e for e in events(client, vm) if e[0] == "RESUMING"] == [("RESUMING", "auto_resume", "system")]


def test_an_auto_resume_past_the_running_quota_is_a_429(client: Client, launch: Any) -> None:
    vm = launch(auto_resume=True)
    client.vms.suspend(vm)
    launch()  # the one running VM the quota allows
    client.tenants.set_quotas("default", {"max_running_vms": 1})
    try:
        with pytest.raises(QuotaExceeded, match="quota max_running_vms would be exceeded"):
            client.vms.exec(vm, ["true"])
    finally:
        client.tenants.set_quotas("default", {"max_running_vms": 50})
    assert state(client, vm)["state"] == "SUSPENDED"
    assert client.vms.exec(vm, ["true"]).exit_code == 0


def test_deadlines_survive_a_daemon_kill9(client: Client, daemon: DaemonProcess, launch: Any) -> None:
    lifetime = launch(max_duration_s=6)
    ttl = launch(suspended_ttl_s=5)
    client.vms.suspend(ttl)
    daemon.kill9()
    time.sleep(7)  # both deadlines pass while no daemon runs
    daemon.start()
    back = time.time()
    for vm, reason, limit in ((lifetime, "max_duration", 6), (ttl, "suspended_ttl", 5)):
        view = wait_state(client, vm, "TERMINATED", SLACK_S)
        assert view["state_reason"] == reason
        start = seconds(view["created_at"]) if reason == "max_duration" else event_at(client, vm, "SUSPENDED")
        ended = event_at(client, vm, "TERMINATING")
        # counted from the record's timestamps (overdue at the restart), not again from the restart
        assert ended - start >= limit and ended - back < limit - 1
