"""App hooks through a real daemon: a Dockerfile app answering /ember/v1/<hook>, built and launched here."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.sdk import ApiError, Client, Request
from tests.conftest import build, remove_quietly

pytestmark = pytest.mark.vm

# Every hook call is kept in the app's memory (so the build's calls are in every clone), with its body's
# length and start, and the restore generation at the time. The run payload and /tmp/mode steer it.
APP = r"""
import http.server, json, os, time
CALLS = []
VALIDATE_503 = int(os.environ.get("VALIDATE_503", "0"))

def generation():
    try:
        return int(open("/run/ember/generation").read().split()[0])
    except OSError:
        return -1

class H(http.server.BaseHTTPRequestHandler):
    def answer(self, status, body=b""):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        hook = self.path.rsplit("/", 1)[-1]
        CALLS.append({"hook": hook, "len": len(body), "body": body[:40], "gen": generation()})
        mode = open("/tmp/mode").read().strip() if os.path.exists("/tmp/mode") else ""
        if hook == "validate" and sum(c["hook"] == "validate" for c in CALLS) <= VALIDATE_503:
            return self.answer(503, b"warming up")
        if hook == "validate" and os.environ.get("VALIDATE_SLEEP"):
            time.sleep(float(os.environ["VALIDATE_SLEEP"]))
        if (hook == "run" and body == "fail") or (hook == "suspend" and mode == "fail"):
            return self.answer(500, b"the app says no")
        if (hook == "run" and body == "sleep") or (hook == "suspend" and mode == "sleep"):
            time.sleep(4)
        self.answer(200, b"done " + hook.encode())

    def do_GET(self):
        self.answer(200, json.dumps(CALLS).encode())

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("127.0.0.1", 8080), H).serve_forever()
"""

DOCKERFILE = """\
FROM ember:debian-python3
COPY app.py /app/app.py
ENV VALIDATE_503=2
LABEL ember.hooks.port=8080 ember.hooks=ready,validate,run,resume,suspend,terminate
LABEL ember.hooks.run.timeout=2 ember.hooks.suspend.timeout=1
CMD ["python3", "/app/app.py"]
"""

CALLS = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8080/').read().decode())"


def calls(client: Client, vm_id: str) -> list[dict[str, object]]:
    return list(json.loads(client.vms.exec(vm_id, ["python3", "-c", CALLS]).stdout))


def hook_events(client: Client, vm_id: str) -> list[str]:
    events = client.send(Request("GET", f"/v1/vms/{vm_id}/events"))
    hooks = [e for e in events if e["reason"] == "hook"]
    assert all(e["from_state"] == e["to_state"] for e in hooks), hooks
    return [e["message"] for e in hooks]


def app_ctx(root: Path, dockerfile: str = DOCKERFILE) -> Path:
    root.mkdir()
    (root / "Dockerfile").write_text(dockerfile)
    (root / "app.py").write_text(APP)
    return root


@pytest.fixture(scope="module")
def hooked_image(client: Client, tmp_path_factory: pytest.TempPathFactory) -> str:
    image, logs = build(client, app_ctx(tmp_path_factory.mktemp("hooks") / "ctx"), "hooked")
    assert image["state"] == "CREATED", logs
    assert any("calling the validate hook on port 8080" in line for line in logs), logs
    return str(image["name"])


@pytest.fixture
def hooked_vm(client: Client, hooked_image: str) -> Iterator[str]:
    vm_id = client.vms.run(hooked_image, run_payload="hello app").id
    yield vm_id
    remove_quietly(client, vm_id)


def test_hooks_are_called_in_order_with_the_payload(client: Client, hooked_vm: str) -> None:
    seen = calls(client, hooked_vm)
    names = [c["hook"] for c in seen]
    # build: ready (until it answers), validate (503 twice, polled again, then 200); the pool's clone
    # may have validated once more before it was handed out; then this launch's run, with the payload
    assert names[0] == "ready" and names[-1] == "run", names
    assert [n for i, n in enumerate(names) if i == 0 or names[i - 1] != n] == ["ready", "validate", "run"], names
    assert names.count("validate") >= 3, names
    assert seen[-1]["body"] == "hello app"

    client.vms.suspend(hooked_vm)
    client.vms.resume(hooked_vm)
    seen = calls(client, hooked_vm)
    assert [c["hook"] for c in seen[-3:]] == ["run", "suspend", "resume"], seen
    run, suspend, resume = seen[-3:]
    assert run["gen"] == suspend["gen"] and int(str(resume["gen"])) > int(str(suspend["gen"])), seen  # bumped first

    messages = hook_events(client, hooked_vm)
    assert [m.split()[1] for m in messages] == ["run", "suspend", "resume"], messages
    assert all(" ok, HTTP 200 in " in m for m in messages), messages

    client.vms.remove(hooked_vm)
    last = hook_events(client, hooked_vm)[-1]
    assert last.startswith("hook terminate ok, HTTP 200"), last


def test_a_failing_or_slow_run_hook_terminates_the_vm(client: Client, hooked_image: str) -> None:
    for payload, outcome in (("fail", "failed, HTTP 500"), ("sleep", "timeout")):
        started = time.monotonic()
        with pytest.raises(ApiError) as err:
            client.vms.run(hooked_image, run_payload=payload)
        assert err.value.status == 422 and err.value.kind == "HookFailed", err.value
        assert f"hook run {outcome}" in err.value.message, err.value.message
        if payload == "sleep":
            assert time.monotonic() - started < 4, "the 2 s run timeout was not enforced"
        gone = [v for v in client.vms.list(all=True) if v.state_reason == "run_hook_failed"]
        assert gone and all(v.state == "TERMINATED" for v in gone), gone


def test_a_failing_or_slow_suspend_hook_does_not_stop_the_suspend(client: Client, hooked_vm: str) -> None:
    for mode, outcome in (("fail", "failed, HTTP 500"), ("sleep", "timeout")):
        client.files.write(hooked_vm, "/tmp/mode", mode.encode())
        started = time.monotonic()
        client.vms.suspend(hooked_vm)
        if mode == "sleep":
            assert time.monotonic() - started < 4, "the 1 s suspend timeout was not enforced"
        assert client.vms.get(hooked_vm).state == "SUSPENDED"
        client.vms.resume(hooked_vm)
        assert f"hook suspend {outcome}" in hook_events(client, hooked_vm)[-2]
    assert client.vms.exec(hooked_vm, ["true"]).exit_code == 0


def test_run_payload_is_bounded(client: Client, hooked_image: str) -> None:
    with pytest.raises(ApiError) as err:
        client.vms.run(hooked_image, run_payload="x" * (16 * 1024 + 1))
    assert err.value.status == 400 and "at most 16384" in err.value.message
    vm_id = client.vms.run(hooked_image, run_payload="é" * (8 * 1024)).id  # 16 KiB of UTF-8 exactly
    try:
        assert calls(client, vm_id)[-1]["len"] == 8 * 1024
    finally:
        remove_quietly(client, vm_id)


def test_validate_that_never_passes_fails_the_build(client: Client, tmp_path: Path) -> None:
    dockerfile = DOCKERFILE.replace("ENV VALIDATE_503=2", "ENV VALIDATE_503=1000").replace(
        "ember.hooks.run.timeout=2", "ember.hooks.validate.timeout=2"
    )
    image, logs = build(client, app_ctx(tmp_path / "ctx", dockerfile), "neverready")
    assert image["state"] == "CREATE_FAILED", logs
    assert image["error"].startswith("validate: the app's validate hook did not pass: hook validate timeout, HTTP 503")


def test_a_bad_hook_label_fails_the_build_naming_it(client: Client, tmp_path: Path) -> None:
    dockerfile = DOCKERFILE.replace("ember.hooks.suspend.timeout=1", "ember.hooks.suspend.timeout=61")
    image, logs = build(client, app_ctx(tmp_path / "ctx", dockerfile), "badhooks")
    assert image["state"] == "CREATE_FAILED", logs
    assert "LABEL ember.hooks.suspend.timeout=61: expected whole seconds 1-60" in image["error"]
