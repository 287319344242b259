"""The AWS Lambda MicroVMs API end to end, as its users drive it, against the real test daemon and its S3 store:
boto3's S3 client uploads a code zip (a Dockerfile and a small app that answers AWS's hooks) under the tenant's
account id, CreateMicrovmImage builds it (a waiter polls for CREATED), RunMicrovm runs it with an idle policy and
a run-hook payload, the app is reached through the endpoint with an auth token, suspended, resumed (its process
and a file survive; its hooks are called at AWS's paths) and terminated; tags; UpdateMicrovmImage from a file://
zip makes version 2; an INACTIVE version cannot be run; versions, builds, deletion; another tenant sees none of it.
Then the AWS CLI, unchanged, against the same daemon.

Builds are slow here (~15 s each): the module builds one image and updates it once."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import WaiterError
from botocore.waiter import WaiterModel, create_waiter_with_client

from ember.sdk import Client, Request
from tests.awsfixtures import REGION, AwsClientFactory, AwsTenant, new_aws_tenant
from tests.conftest import DaemonProcess, remove_quietly
from tests.s3store import S3Store
from tests.vm.test_aws_microvms import through_endpoint
from tests.zips import good_zip

pytestmark = pytest.mark.vm

NAME = "FlowApp"  # uppercase: not an Ember repo name, so the AWS name <-> repo mapping is exercised
DEBIAN = f"arn:aws:lambda:{REGION}:aws:microvm-image:debian"
ROLE = "arn:aws:iam::123456789012:role/build"
HOOK_PORT = 9001  # hooks.port: not the app's 8080, not AWS's default 9000
AWS_HOOKS = "/aws/lambda-microvms/runtime/v1/"
IDLE = {"maxIdleDurationSeconds": 600, "suspendedDurationSeconds": 3600, "autoResumeEnabled": True}
HOOKS = {
    "port": HOOK_PORT,
    "microvmImageHooks": {"ready": "ENABLED", "readyTimeoutInSeconds": 120, "validate": "ENABLED"},
    "microvmHooks": {"run": "ENABLED", "runTimeoutInSeconds": 10, "resume": "ENABLED", "suspend": "ENABLED",
                     "terminate": "ENABLED"},
}  # fmt: skip

# The app: GET on 8080 shows what it has seen (its process's boot id, its version, every hook call, the file its
# run hook wrote); the hooks answer POSTs on HOOK_PORT. The calls are kept in memory, so the build's ready and
# validate calls are in every microVM of the image.
APP = r"""
import http.server, json, os, secrets, threading
BOOT = secrets.token_hex(8)
CALLS = []
MARK = "/var/tmp/run-payload"

def answer(handler, status, body):
    handler.send_response(status)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)

class Hooks(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        CALLS.append({"path": self.path, "body": body})
        if self.path.endswith("/run"):
            with open(MARK, "w") as f:
                f.write(body)
        answer(self, 200, b"ok")

    def log_message(self, *args):
        pass

class App(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        mark = open(MARK).read() if os.path.exists(MARK) else None
        seen = {"boot": BOOT, "pid": os.getpid(), "version": os.environ.get("APP_VERSION"), "calls": CALLS,
                "file": mark, "path": self.path}
        answer(self, 200, json.dumps(seen).encode())

    def log_message(self, *args):
        pass

# both listen before the hooks answer: ready means ready (binding looks the host name up, which can take seconds)
app = http.server.ThreadingHTTPServer(("127.0.0.1", 8080), App)
hooks = http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["HOOK_PORT"])), Hooks)
threading.Thread(target=hooks.serve_forever, daemon=True).start()
app.serve_forever()
"""

DOCKERFILE = f"""\
FROM ember:debian-python3
COPY app.py /app/app.py
ENV HOOK_PORT={HOOK_PORT}
CMD ["python3", "/app/app.py"]
"""


def code_zip() -> bytes:
    return good_zip({"Dockerfile": DOCKERFILE.encode(), "app.py": APP.encode()})


def wait_for_image(lam: Any, name: str, done: str) -> None:
    """A waiter (botocore's, from a waiter model: the service ships none) until the image is ``done``."""
    failed = {"CREATED": "CREATE_FAILED", "UPDATED": "UPDATE_FAILED"}[done]
    model = WaiterModel({"version": 2, "waiters": {"ImageReady": {
        "operation": "GetMicrovmImage", "delay": 1, "maxAttempts": 300,
        "acceptors": [
            {"state": "success", "matcher": "path", "argument": "state", "expected": done},
            {"state": "failure", "matcher": "path", "argument": "state", "expected": failed},
        ],
    }}})  # fmt: skip
    try:
        create_waiter_with_client("ImageReady", model, lam).wait(imageIdentifier=name)
    except WaiterError as exc:
        image = lam.get_microvm_image(imageIdentifier=name)
        newest = image.get("latestFailedImageVersion") or "1"
        reason = lam.get_microvm_image_version(imageIdentifier=name, imageVersion=newest).get("stateReason")
        pytest.fail(f"image {name} is not {done}: {exc}; version {newest}: {reason}")


def app_state(daemon: DaemonProcess, vm: dict[str, Any], token: dict[str, str]) -> dict[str, Any]:
    """What the app shows at GET /state through the microVM's endpoint (the auth token in X-aws-proxy-auth)."""
    status, body = through_endpoint(vm["endpoint"], daemon.settings.ingress_listen, token, "/state")
    assert status == 200, body[:500]
    seen: dict[str, Any] = json.loads(body)
    assert seen["path"] == "/state"
    return seen


def hooks_called(seen: dict[str, Any]) -> list[str]:
    """The hooks the app received, in order, consecutive repeats folded (a pool clone may validate again)."""
    paths = [str(c["path"]) for c in seen["calls"]]
    assert all(p.startswith(AWS_HOOKS) for p in paths), paths
    names = [p.removeprefix(AWS_HOOKS) for p in paths]
    return [n for i, n in enumerate(names) if i == 0 or names[i - 1] != n]


def hook_events(client: Client, vm_id: str) -> list[str]:
    """The hook calls the daemon recorded as events of the microVM (Ember's own API; the AWS API has none)."""
    return [e["message"] for e in client.send(Request("GET", f"/v1/vms/{vm_id}/events")) if e["reason"] == "hook"]


@pytest.fixture(scope="module")
def tenant(client: Client) -> Iterator[AwsTenant]:
    """The module's tenant; its microVMs are removed at the end, whatever happened."""
    owner = new_aws_tenant(client, "aws-flow")
    yield owner
    for vm in client.vms.list(tenant=owner.name):
        remove_quietly(client, vm.id)


@pytest.fixture(scope="module")
def lam(tenant: AwsTenant, aws_client: AwsClientFactory) -> Any:
    return aws_client(tenant)


def file_artifact(daemon: DaemonProcess, tenant: AwsTenant) -> str:
    """The file:// URI of the code zip on the daemon's host, in the tenant's directory under the root."""
    return f"file://{daemon.settings.aws_file_artifact_root}/{tenant.account_id}/app.zip"


@pytest.fixture(scope="module")
def image(daemon: DaemonProcess, base_image: str, s3_store: S3Store, tenant: AwsTenant, lam: Any) -> dict[str, Any]:
    """The module's image: its code zip uploaded with boto3 under the tenant's account id, built with hooks (and
    the same zip on the daemon's host, in the tenant's directory under the file:// root, for the update)."""
    bucket = s3_store.bucket("ember-flow")
    key = f"{tenant.account_id}/app.zip"  # code artifacts are scoped per tenant: <account>/...
    s3_store.client().put_object(Bucket=bucket, Key=key, Body=code_zip())
    mine = Path(daemon.settings.aws_file_artifact_root) / tenant.account_id
    mine.mkdir()
    (mine / "app.zip").write_bytes(code_zip())
    created = lam.create_microvm_image(
        name=NAME, baseImageArn=DEBIAN, buildRoleArn=ROLE, codeArtifact={"uri": f"s3://{bucket}/{key}"},
        description="the flow test's app", hooks=HOOKS, environmentVariables={"APP_VERSION": "1"},
        tags={"team": "flow"}, clientToken=secrets.token_hex(8),
    )  # fmt: skip
    arn = f"arn:aws:lambda:{REGION}:{tenant.account_id}:microvm-image:{NAME}"
    assert (created["imageArn"], created["name"], created["imageVersion"]) == (arn, NAME, "1")
    assert created["state"] in ("CREATING", "CREATED")
    assert created["codeArtifact"] == {"uri": f"s3://{bucket}/{key}"} and created["hooks"] == HOOKS
    wait_for_image(lam, NAME, "CREATED")
    return dict(created)


def test_run_reach_suspend_resume_terminate_with_hooks(
    client: Client, daemon: DaemonProcess, image: dict[str, Any], tenant: AwsTenant, lam: Any,
    aws_client: AwsClientFactory,
) -> None:  # fmt: skip
    got = lam.get_microvm_image(imageIdentifier=image["imageArn"])
    assert (got["state"], got["latestActiveImageVersion"], got["name"]) == ("CREATED", "1", NAME)
    assert "latestFailedImageVersion" not in got
    version = lam.get_microvm_image_version(imageIdentifier=NAME, imageVersion="1")
    assert (version["state"], version["status"], version["hooks"]) == ("SUCCESSFUL", "ACTIVE", HOOKS)
    assert version["environmentVariables"] == {"APP_VERSION": "1"} and version["baseImageArn"] == DEBIAN

    payload = json.dumps({"job": secrets.token_hex(6), "note": "é ünïcode"})
    vm = lam.run_microvm(
        imageIdentifier=NAME, idlePolicy=IDLE, runHookPayload=payload, ingressNetworkConnectors=["ALL_INGRESS"],
        maximumDurationInSeconds=3600,
    )  # fmt: skip
    vm_id = vm["microvmId"]
    assert (vm["state"], vm["imageArn"], vm["imageVersion"]) == ("RUNNING", image["imageArn"], "1")
    assert vm["idlePolicy"] == IDLE and vm["maximumDurationInSeconds"] == 3600
    got_vm = lam.get_microvm(microvmIdentifier=vm_id)
    assert {k: got_vm[k] for k in ("state", "endpoint", "imageArn", "imageVersion", "idlePolicy")} == {
        k: vm[k] for k in ("state", "endpoint", "imageArn", "imageVersion", "idlePolicy")
    }

    # the endpoint: refused without a token, the app's answer with one
    listen = daemon.settings.ingress_listen
    assert through_endpoint(vm["endpoint"], listen, {}, "/state")[0] == 401
    token = lam.create_microvm_auth_token(
        microvmIdentifier=vm_id, expirationInMinutes=10, allowedPorts=[{"port": 8080}]
    )["authToken"]
    seen = app_state(daemon, vm, token)
    assert hooks_called(seen) == ["ready", "validate", "run"], seen["calls"]
    assert seen["calls"][-1]["body"] == payload and seen["file"] == payload  # the run hook got the payload
    assert seen["version"] == "1"

    lam.suspend_microvm(microvmIdentifier=vm_id)
    assert lam.get_microvm(microvmIdentifier=vm_id)["state"] == "SUSPENDED"
    lam.resume_microvm(microvmIdentifier=vm_id)
    assert lam.get_microvm(microvmIdentifier=vm_id)["state"] == "RUNNING"
    after = app_state(daemon, vm, token)
    assert (after["boot"], after["pid"], after["file"]) == (seen["boot"], seen["pid"], payload)  # the same process
    assert hooks_called(after)[-3:] == ["run", "suspend", "resume"], after["calls"]

    # a second microVM of version 1 by ARN; both listed a page at a time, oldest first
    other = lam.run_microvm(imageIdentifier=image["imageArn"], imageVersion="1", runHookPayload="second")
    first = lam.list_microvms(imageIdentifier=image["imageArn"], maxResults=1)
    assert [i["microvmId"] for i in first["items"]] == [vm_id] and first["nextToken"]
    rest = lam.list_microvms(imageIdentifier=image["imageArn"], maxResults=1, nextToken=first["nextToken"])
    assert [i["microvmId"] for i in rest["items"]] == [other["microvmId"]] and "nextToken" not in rest
    pages = lam.get_paginator("list_microvms").paginate(PaginationConfig={"PageSize": 1})
    items = [i for page in pages for i in page["items"]]
    assert [(i["microvmId"], i["imageArn"], i["imageVersion"]) for i in items] == [
        (vm_id, image["imageArn"], "1"), (other["microvmId"], image["imageArn"], "1")
    ]  # fmt: skip

    # another tenant: the image, its version and the microVMs answer as missing ones
    stranger = aws_client(new_aws_tenant(client, "aws-stranger"))
    calls = [
        lambda: stranger.get_microvm_image(imageIdentifier=image["imageArn"]),
        lambda: stranger.get_microvm_image_version(imageIdentifier=image["imageArn"], imageVersion="1"),
        lambda: stranger.list_tags(Resource=image["imageArn"]),
        lambda: stranger.run_microvm(imageIdentifier=image["imageArn"]),
        lambda: stranger.get_microvm(microvmIdentifier=vm_id),
        lambda: stranger.create_microvm_auth_token(
            microvmIdentifier=vm_id, expirationInMinutes=5, allowedPorts=[{"port": 8080}]
        ),
        lambda: stranger.terminate_microvm(microvmIdentifier=other["microvmId"]),
    ]
    for call in calls:
        with pytest.raises(stranger.exceptions.ResourceNotFoundException) as missing:
            call()
        assert missing.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    assert stranger.list_microvms()["items"] == [] and stranger.list_microvm_images()["items"] == []
    assert lam.get_microvm(microvmIdentifier=other["microvmId"])["state"] == "RUNNING"

    for ended in (vm_id, other["microvmId"]):
        lam.terminate_microvm(microvmIdentifier=ended)
        gone = lam.get_microvm(microvmIdentifier=ended)
        assert gone["state"] == "TERMINATED" and gone["terminatedAt"] >= gone["startedAt"]
    assert [m.split()[1] for m in hook_events(client, vm_id)] == ["run", "suspend", "resume", "terminate"]
    assert all(" ok, HTTP 200 " in m for m in hook_events(client, vm_id))

    # nor can it build from this tenant's code artifacts, in the store or on the host: as if they did not exist
    for uri in (image["codeArtifact"]["uri"], file_artifact(daemon, tenant)):
        with pytest.raises(stranger.exceptions.ResourceNotFoundException):
            stranger.create_microvm_image(name=NAME, baseImageArn=DEBIAN, buildRoleArn=ROLE, codeArtifact={"uri": uri})
    assert stranger.list_microvm_images()["items"] == []


def test_tags(image: dict[str, Any], lam: Any) -> None:
    arn = image["imageArn"]
    assert lam.list_tags(Resource=arn)["Tags"] == {"team": "flow"}
    lam.tag_resource(Resource=arn, Tags={"stage": "test", "team": "ember"})
    assert lam.list_tags(Resource=arn)["Tags"] == {"team": "ember", "stage": "test"}
    assert lam.get_microvm_image(imageIdentifier=NAME)["tags"] == {"team": "ember", "stage": "test"}
    lam.untag_resource(Resource=arn, TagKeys=["team", "not-there"])
    assert lam.list_tags(Resource=arn)["Tags"] == {"stage": "test"}


def test_update_inactive_versions_builds_delete(
    daemon: DaemonProcess, image: dict[str, Any], tenant: AwsTenant, lam: Any
) -> None:
    # version 2 from a file:// zip on the daemon's host, under the root's directory of the tenant's account
    uri = file_artifact(daemon, tenant)
    updated = lam.update_microvm_image(
        imageIdentifier=NAME, baseImageArn=DEBIAN, buildRoleArn=ROLE, codeArtifact={"uri": uri}, hooks=HOOKS,
        environmentVariables={"APP_VERSION": "2"},
    )  # fmt: skip
    assert (updated["imageVersion"], updated["name"], updated["codeArtifact"]) == ("2", NAME, {"uri": uri})
    assert updated["state"] in ("UPDATING", "UPDATED")
    wait_for_image(lam, NAME, "UPDATED")
    assert lam.get_microvm_image(imageIdentifier=NAME)["latestActiveImageVersion"] == "2"

    versions = lam.list_microvm_image_versions(imageIdentifier=NAME)["items"]
    assert [(v["imageVersion"], v["state"], v["status"]) for v in versions] == [
        ("1", "SUCCESSFUL", "ACTIVE"), ("2", "SUCCESSFUL", "ACTIVE")
    ]  # fmt: skip
    assert [v["codeArtifact"]["uri"] for v in versions] == [image["codeArtifact"]["uri"], uri]
    builds = lam.list_microvm_image_builds(imageIdentifier=NAME, imageVersion="2")["items"]
    assert [(b["imageVersion"], b["buildState"], b["architecture"]) for b in builds] == [("2", "SUCCESSFUL", "X86_64")]
    build = lam.get_microvm_image_build(imageIdentifier=NAME, imageVersion="2", buildId=builds[0]["buildId"])
    assert (build["buildState"], build["imageArn"]) == ("SUCCESSFUL", image["imageArn"])

    # version 1 INACTIVE: it cannot be run; the image's default is version 2
    inactive = lam.update_microvm_image_version(imageIdentifier=NAME, imageVersion="1", status="INACTIVE")
    assert (inactive["imageVersion"], inactive["status"], inactive["state"]) == ("1", "INACTIVE", "SUCCESSFUL")
    with pytest.raises(lam.exceptions.ConflictException, match="INACTIVE"):
        lam.run_microvm(imageIdentifier=NAME, imageVersion="1")
    vm = lam.run_microvm(imageIdentifier=NAME, ingressNetworkConnectors=["ALL_INGRESS"], runHookPayload="v2")
    assert vm["imageVersion"] == "2"
    token = lam.create_microvm_auth_token(
        microvmIdentifier=vm["microvmId"], expirationInMinutes=5, allowedPorts=[{"allPorts": {}}]
    )["authToken"]
    seen = app_state(daemon, vm, token)
    assert (seen["version"], seen["file"]) == ("2", "v2")

    # deletion: a version; the image while a microVM runs it (refused), then after it is terminated
    deleted = lam.delete_microvm_image_version(imageIdentifier=NAME, imageVersion="1")
    assert (deleted["imageVersion"], deleted["state"]) == ("1", "DELETED")
    assert [v["imageVersion"] for v in lam.list_microvm_image_versions(imageIdentifier=NAME)["items"]] == ["2"]
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.run_microvm(imageIdentifier=NAME, imageVersion="1")
    with pytest.raises(lam.exceptions.ConflictException, match="terminate"):
        lam.delete_microvm_image(imageIdentifier=NAME)
    lam.terminate_microvm(microvmIdentifier=vm["microvmId"])
    assert lam.delete_microvm_image(imageIdentifier=image["imageArn"])["state"] == "DELETED"
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_microvm_image(imageIdentifier=NAME)
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.run_microvm(imageIdentifier=NAME)
    assert lam.list_microvm_images()["items"] == []


# ---- the AWS CLI ---------------------------------------------------------------------------------------------

AWS = Path(sys.executable).parent / "aws"  # awscli (a dev dependency) beside the venv's python


def aws_cli(endpoint: str, tenant: AwsTenant, home: Path, *args: str) -> tuple[int, Any, str]:
    """``aws lambda-microvms ARGS`` with the tenant's key in the environment and nothing of the host's AWS
    configuration: (exit code, the JSON output or None, stderr)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
        "AWS_ACCESS_KEY_ID": tenant.access_key_id, "AWS_SECRET_ACCESS_KEY": tenant.secret_access_key,
        "AWS_DEFAULT_REGION": REGION, "AWS_CONFIG_FILE": str(home / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "credentials"), "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_RETRY_MODE": "standard", "AWS_MAX_ATTEMPTS": "1", "AWS_PAGER": "",
    }  # fmt: skip
    done = subprocess.run(
        [str(AWS), "lambda-microvms", *args, "--endpoint-url", endpoint, "--output", "json"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    out = json.loads(done.stdout) if done.returncode == 0 and done.stdout.strip() else None
    return done.returncode, out, done.stderr


def test_aws_cli_smoke(
    client: Client, base_image: str, aws_endpoint: str, aws_tenant: AwsTenant, tmp_path: Path
) -> None:
    assert AWS.exists(), f"{AWS} is missing: pip install awscli (a dev dependency)"
    (tmp_path / "config").write_text("")  # the CLI reads these files only: never the host's
    (tmp_path / "credentials").write_text("")
    code, managed, err = aws_cli(aws_endpoint, aws_tenant, tmp_path, "list-managed-microvm-images")
    assert code == 0, err
    assert [i["imageArn"] for i in managed["items"]] == [DEBIAN]
    idle = "maxIdleDurationSeconds=600,suspendedDurationSeconds=0,autoResumeEnabled=false"
    code, vm, err = aws_cli(aws_endpoint, aws_tenant, tmp_path, "run-microvm", "--image-identifier", DEBIAN,
                            "--idle-policy", idle, "--run-hook-payload", "from the CLI")  # fmt: skip
    try:
        assert code == 0, err
        assert vm["state"] == "RUNNING" and vm["imageArn"] == DEBIAN
        assert vm["idlePolicy"] == {"maxIdleDurationSeconds": 600, "suspendedDurationSeconds": 0,
                                    "autoResumeEnabled": False}  # fmt: skip
        code, got, err = aws_cli(aws_endpoint, aws_tenant, tmp_path, "get-microvm", "--microvm-identifier",
                                 vm["microvmId"])  # fmt: skip
        assert code == 0, err
        assert (got["microvmId"], got["state"], got["endpoint"]) == (vm["microvmId"], "RUNNING", vm["endpoint"])
        code, listed, err = aws_cli(aws_endpoint, aws_tenant, tmp_path, "list-microvms")
        assert code == 0 and [i["microvmId"] for i in listed["items"]] == [vm["microvmId"]], err
        code, _, err = aws_cli(aws_endpoint, aws_tenant, tmp_path, "terminate-microvm", "--microvm-identifier",
                               vm["microvmId"])  # fmt: skip
        assert code == 0, err
    finally:
        if vm is not None:
            remove_quietly(client, vm["microvmId"])
    code, _, err = aws_cli(aws_endpoint, aws_tenant, tmp_path, "get-microvm", "--microvm-identifier", "vm-0123")
    assert code == 255 and "(ResourceNotFoundException)" in err and "GetMicrovm" in err, (code, err)
    bad = AwsTenant(aws_tenant.name, aws_tenant.account_id, "", "", aws_tenant.access_key_id, "x" * 40)
    code, _, err = aws_cli(aws_endpoint, bad, tmp_path, "list-microvms")
    assert code == 255 and "(AccessDeniedException)" in err, (code, err)
