"""The AWS Lambda MicroVMs API's microVM operations, driven by boto3 against the real test daemon: run (the
managed base by ARN, connectors, idle policy, client token), get, HTTP through the endpoint with the auth token
in X-aws-proxy-auth, the shell on the ingress with AWS's subprotocols, suspend, resume, terminate, list with
pagination, another tenant's microVMs answering ResourceNotFound, a client token answering its retry after a
newer version of the image, every refusal parsed by botocore as the model's exception; and, on a daemon of
their own with tiny limits, per-key throttling that botocore's retries wait out and per-peer refusal limits."""

from __future__ import annotations

import dataclasses
import http.client
import json
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import botocore.auth
import botocore.exceptions
import httpx
import pytest
from botocore.config import Config

from ember.config import Settings
from ember.sdk import Client
from tests.awsfixtures import REGION, AwsClientFactory, AwsTenant, new_aws_tenant
from tests.conftest import TEST_UID_BLOCK, DaemonProcess, build, free_port, remove_quietly
from tests.databases import daemon_database_url, drop_database
from tests.vm.test_ingress import start_app
from tests.vm.test_shell_tokens import open_shell, run_in

DEBIAN = "arn:aws:lambda:us-east-1:aws:microvm-image:debian"
IDLE = {"maxIdleDurationSeconds": 600, "suspendedDurationSeconds": 3600, "autoResumeEnabled": True}


@pytest.fixture
def tenant_vms(client: Client, aws_tenant: AwsTenant) -> Iterator[AwsTenant]:
    """The test's tenant; its VMs are removed after the test, whatever happened."""
    yield aws_tenant
    for vm in client.vms.list(tenant=aws_tenant.name):
        remove_quietly(client, vm.id)


def through_endpoint(endpoint: str, ingress_listen: str, headers: dict[str, str], path: str) -> tuple[int, bytes]:
    """A GET of ``path`` on the microVM's endpoint (the ingress listener, the endpoint's Host)."""
    host, _, port = ingress_listen.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", path, headers={"Host": urlsplit(endpoint).netloc, **headers})
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def test_run_get_http_suspend_resume_terminate(
    daemon: DaemonProcess, base_image: str, tenant_vms: AwsTenant, aws_client: AwsClientFactory
) -> None:
    lam = aws_client(tenant_vms)
    token = secrets.token_hex(8)
    run: dict[str, Any] = {
        "imageIdentifier": DEBIAN, "ingressNetworkConnectors": ["ALL_INGRESS", "SHELL_INGRESS"],
        "idlePolicy": IDLE, "maximumDurationInSeconds": 3600, "clientToken": token,
        "executionRoleArn": "arn:aws:iam::123456789012:role/ignored", "logging": {"disabled": {}},
    }  # fmt: skip
    vm = lam.run_microvm(**run)
    vm_id = vm["microvmId"]
    assert vm["state"] == "RUNNING" and vm["imageArn"] == DEBIAN and vm["imageVersion"] == "1"
    assert vm["idlePolicy"] == IDLE and vm["maximumDurationInSeconds"] == 3600
    assert vm["ingressNetworkConnectors"] == ["ALL_INGRESS", "SHELL_INGRESS"] and vm["egressNetworkConnectors"] == []
    assert vm["executionRoleArn"] == run["executionRoleArn"]
    assert isinstance(vm["startedAt"], datetime) and abs(vm["startedAt"] - datetime.now(UTC)) < timedelta(minutes=5)
    assert lam.run_microvm(**run)["microvmId"] == vm_id  # the client token answers a retry with the same microVM
    with pytest.raises(lam.exceptions.ConflictException):
        lam.run_microvm(**{**run, "maximumDurationInSeconds": 60})  # the same token, another request
    got = lam.get_microvm(microvmIdentifier=vm_id)
    assert {k: got[k] for k in ("microvmId", "state", "endpoint", "idlePolicy")} == {
        k: vm[k] for k in ("microvmId", "state", "endpoint", "idlePolicy")
    }
    # the app, started through Ember's own API with the tenant's key; then HTTP through the endpoint
    with Client(api_key=tenant_vms.api_key, settings=daemon.settings) as own:
        start_app(own.vms.get(vm_id))
    listen = daemon.settings.ingress_listen
    assert through_endpoint(vm["endpoint"], listen, {}, "/headers")[0] == 401
    parts = lam.create_microvm_auth_token(
        microvmIdentifier=vm_id, expirationInMinutes=5, allowedPorts=[{"port": 8080}]
    )["authToken"]
    assert list(parts) == ["X-aws-proxy-auth"]
    status, body = through_endpoint(vm["endpoint"], listen, parts, "/headers")
    assert status == 200 and json.loads(body)["path"] == "/headers"
    # the token opens the ports it names only
    assert through_endpoint(vm["endpoint"], listen, {**parts, "X-aws-proxy-port": "8081"}, "/headers")[0] == 403
    shell = lam.create_microvm_shell_auth_token(microvmIdentifier=vm_id, expirationInMinutes=1)["authToken"]
    assert shell["X-aws-proxy-auth"] != parts["X-aws-proxy-auth"]
    # the shell on the endpoint, with the subprotocols AWS's clients offer: a command runs, its output comes back
    protocols = [f"lambda-microvms.authentication.{shell['X-aws-proxy-auth']}", "lambda-microvms",
                 "lambda-microvms.port.8022"]  # fmt: skip
    target = "/ember/shell?command=sh&command=-c&command=echo+ran-%24((40%2B2))%3B+exit+5"
    opened, proto = open_shell(daemon, "ingress", target, host=str(urlsplit(vm["endpoint"]).hostname),
                               subprotocols=protocols)  # fmt: skip
    with opened:
        out, code = run_in(opened)
    assert b"ran-42" in out and code == 5 and proto.subprotocol == "lambda-microvms", out

    lam.suspend_microvm(microvmIdentifier=vm_id)
    assert lam.get_microvm(microvmIdentifier=vm_id)["state"] == "SUSPENDED"
    lam.suspend_microvm(microvmIdentifier=vm_id)  # idempotent
    lam.resume_microvm(microvmIdentifier=vm_id)
    assert lam.get_microvm(microvmIdentifier=vm_id)["state"] == "RUNNING"
    assert through_endpoint(vm["endpoint"], listen, parts, "/headers")[0] == 200  # the app kept running
    lam.terminate_microvm(microvmIdentifier=vm_id)
    gone = lam.get_microvm(microvmIdentifier=vm_id)
    assert gone["state"] == "TERMINATED" and gone["terminatedAt"] >= gone["startedAt"]
    lam.terminate_microvm(microvmIdentifier=vm_id)  # idempotent
    with pytest.raises(lam.exceptions.ConflictException, match="TERMINATED"):
        lam.create_microvm_auth_token(microvmIdentifier=vm_id, expirationInMinutes=5, allowedPorts=[{"allPorts": {}}])


def test_list_pagination_connectors_and_other_tenants(
    client: Client, base_image: str, tenant_vms: AwsTenant, aws_client: AwsClientFactory
) -> None:
    lam = aws_client(tenant_vms)
    ids = [lam.run_microvm(imageIdentifier="debian")["microvmId"] for _ in range(3)]
    first = lam.list_microvms(maxResults=2)
    assert [i["microvmId"] for i in first["items"]] == ids[:2] and first["nextToken"]
    second = lam.list_microvms(maxResults=2, nextToken=first["nextToken"])
    assert [i["microvmId"] for i in second["items"]] == ids[2:] and "nextToken" not in second
    pages = lam.get_paginator("list_microvms").paginate(PaginationConfig={"PageSize": 1})
    assert [i["microvmId"] for page in pages for i in page["items"]] == ids
    assert [i["microvmId"] for i in lam.list_microvms(imageIdentifier=DEBIAN)["items"]] == ids
    assert lam.list_microvms(imageIdentifier="arn:aws:lambda:us-east-1:aws:microvm-image:python")["items"] == []
    with pytest.raises(lam.exceptions.ValidationException, match="nextToken"):
        lam.list_microvms(nextToken="not-a-token")
    # run without ALL_INGRESS: the endpoint takes no token
    with pytest.raises(lam.exceptions.ConflictException, match="ALL_INGRESS"):
        lam.create_microvm_auth_token(microvmIdentifier=ids[0], expirationInMinutes=5, allowedPorts=[{"port": 80}])
    with pytest.raises(lam.exceptions.ValidationException, match="one contiguous range"):
        lam.create_microvm_auth_token(
            microvmIdentifier=ids[0], expirationInMinutes=5, allowedPorts=[{"port": 80}, {"port": 90}]
        )
    # another tenant sees none of them, and its calls on them answer as for a missing microVM
    other = aws_client(new_aws_tenant(client))
    assert other.list_microvms()["items"] == []
    for call in (other.get_microvm, other.suspend_microvm, other.resume_microvm, other.terminate_microvm):
        with pytest.raises(other.exceptions.ResourceNotFoundException) as missing:
            call(microvmIdentifier=ids[0])
        assert missing.value.response["Error"]["Code"] == "ResourceNotFoundException"
        assert missing.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    assert lam.get_microvm(microvmIdentifier=ids[0])["state"] == "RUNNING"


def test_refusals_parse_as_the_models_exceptions(
    client: Client, base_image: str, daemon: DaemonProcess, aws_tenant: AwsTenant, aws_client: AwsClientFactory,
    aws_endpoint: str, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    lam = aws_client(aws_tenant)
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_microvm(microvmIdentifier="vm-0123")
    with pytest.raises(lam.exceptions.ResourceNotFoundException, match="does not exist"):
        lam.run_microvm(imageIdentifier="arn:aws:lambda:us-east-1:999999999999:microvm-image:debian-copy")
    with pytest.raises(lam.exceptions.ResourceNotFoundException, match="nothing-here"):
        lam.run_microvm(imageIdentifier="nothing-here", imageVersion="3")
    with pytest.raises(lam.exceptions.ValidationException, match="VPC connectors are not supported"):
        lam.run_microvm(imageIdentifier="debian", egressNetworkConnectors=["my-vpc"])
    with pytest.raises(lam.exceptions.ValidationException, match="EMBER_AWS_MAX_DURATION_S"):
        lam.run_microvm(imageIdentifier="debian", maximumDurationInSeconds=28801)
    with pytest.raises(lam.exceptions.ValidationException, match="at most 60 minutes"):
        lam.create_microvm_shell_auth_token(microvmIdentifier="vm-0123", expirationInMinutes=61)
    capped = aws_client(new_aws_tenant(client, max_running_vms=0))
    with pytest.raises(capped.exceptions.ServiceQuotaExceededException) as over:
        capped.run_microvm(imageIdentifier="debian")
    assert over.value.response["quotaCode"] == "max_running_vms"
    assert over.value.response["ResponseMetadata"]["HTTPStatusCode"] == 402

    # authentication: another secret, an unknown key, a revoked key, a stale date
    for bad in (aws_client(aws_tenant, secret="x" * 40),
                aws_client(AwsTenant("x", "0", "k", "", "AKIA" + "Z" * 16, "s" * 40))):  # fmt: skip
        with pytest.raises(bad.exceptions.AccessDeniedException) as denied:
            bad.list_microvms()
        assert denied.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    stale = datetime.now(UTC) - timedelta(minutes=10)
    with monkeypatch.context() as m:
        m.setattr(botocore.auth, "get_current_datetime", lambda: stale.replace(tzinfo=None))
        with pytest.raises(lam.exceptions.AccessDeniedException, match="expired"):
            lam.list_microvms()
    revoked = new_aws_tenant(client)
    gone = aws_client(revoked)
    gone.list_microvms()
    client.keys.revoke(revoked.key_id)
    with pytest.raises(gone.exceptions.AccessDeniedException, match="unknown or revoked"):
        gone.list_microvms()

    # temporary credentials: Ember has none
    temporary = boto3.client(
        "lambda-microvms", endpoint_url=aws_endpoint, region_name=REGION, aws_access_key_id=aws_tenant.access_key_id,
        aws_secret_access_key=aws_tenant.secret_access_key, aws_session_token="FwoGZXIvYXdzEXAMPLE",
        config=Config(retries={"total_max_attempts": 1, "mode": "standard"}),
    )  # fmt: skip
    with pytest.raises(temporary.exceptions.AccessDeniedException, match="no temporary credentials"):
        temporary.list_microvms()
    # an identifier with a '/' (boto3 sends %2F) is one that cannot exist, not another path
    for call in (lam.get_microvm, lam.terminate_microvm):
        with pytest.raises(lam.exceptions.ResourceNotFoundException, match="vm-0/x"):
            call(microvmIdentifier="vm-0/x")

    # a bearer key, no signature, an oversized body, an unknown path: AWS error shapes too
    with httpx.Client(base_url=aws_endpoint, timeout=30) as h:
        answer = h.get("/2025-09-09/microvms", headers={"Authorization": f"Bearer {aws_tenant.api_key}"})
        assert (answer.status_code, answer.headers["x-amzn-errortype"]) == (403, "AccessDeniedException")
        assert "Signature Version 4" in answer.json()["message"]
        big = b"{" + b" " * (daemon.settings.aws_max_body_bytes + 1) + b"}"
        answer = h.post("/2025-09-09/microvms", content=big)
        assert (
            answer.headers["x-amzn-errortype"] == "ValidationException"
            and "EMBER_AWS_MAX_BODY_BYTES" in (answer.json()["message"])
        )
        answer = h.get("/2025-09-09/nothing-here")
        assert (answer.status_code, answer.headers["x-amzn-errortype"]) == (404, "UnknownOperationException")
    # segments the signature's canonical path would collapse: refused before routing or verifying (sent as they
    # are: httpx would remove them)
    host, port = urlsplit(aws_endpoint).netloc.rsplit(":", 1)
    for path in ("/2025-09-09/microvm-images/MyApp/versions/..", "/2025-09-09/microvms//suspend"):
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request("DELETE", path)
            answer = conn.getresponse()
            assert (answer.status, answer.getheader("x-amzn-errortype")) == (400, "ValidationException"), path
            assert "'..' segment" in json.loads(answer.read())["message"]
        finally:
            conn.close()


def test_a_client_token_answers_its_retry_after_a_newer_version(
    daemon: DaemonProcess, base_image: str, tenant_vms: AwsTenant, aws_client: AwsClientFactory, tmp_path: Path
) -> None:
    """The token is checked first, over the request as given: a retry after the image got a newer version (built
    with Ember's own API) is the same request, not a ConflictException."""
    lam = aws_client(tenant_vms)
    token = secrets.token_hex(8)
    with Client(api_key=tenant_vms.api_key, settings=daemon.settings) as own:
        for version in (1, 2):
            (tmp_path / "Dockerfile").write_text(f"FROM debian\nENV VERSION={version}\n")
            assert build(own, tmp_path, "tokenapp")[0]["state"] == "CREATED"
            if version == 1:
                vm_id = lam.run_microvm(imageIdentifier="tokenapp", clientToken=token)["microvmId"]
        assert lam.run_microvm(imageIdentifier="tokenapp", clientToken=token)["microvmId"] == vm_id
        with pytest.raises(lam.exceptions.ConflictException, match="clientToken was used for a different request"):
            lam.run_microvm(imageIdentifier="tokenapp", imageVersion="2", clientToken=token)


@pytest.fixture
def tiny_daemon(settings: Settings, tmp_path: Path) -> Iterator[DaemonProcess]:
    """A daemon of its own (no VM: no pool, nothing built) with tiny limits: a key's rate (one request, then one
    every 2 s), refusals per peer (3), the shortest idle timeout (120 s) and the longest duration (100 s)."""
    data = tmp_path / "aws-tiny"
    own = dataclasses.replace(
        settings, data_dir=data, socket_path=data / "ember.sock", listen=f"127.0.0.1:{free_port()}",
        uid_base=settings.uid_base + TEST_UID_BLOCK, pool_size=0, database_url=daemon_database_url("awstiny"),
        rate_limit_per_s=0.5, rate_limit_burst=1, aws_denied_per_s=0.01, aws_denied_burst=3, min_idle_s=120,
        max_duration_limit_s=100,
    )  # fmt: skip
    d = DaemonProcess(own, tmp_path / "aws-tiny.log")
    d.start()
    yield d
    d.stop()
    if own.database_url:
        drop_database(own.database_url)


def test_throttling_is_waited_out_by_botocore_and_refusals_are_limited_per_peer(tiny_daemon: DaemonProcess) -> None:
    def lam(tenant: AwsTenant, attempts: int = 1, secret: str | None = None) -> Any:
        return boto3.client(
            "lambda-microvms", endpoint_url=f"http://{tiny_daemon.settings.listen}", region_name=REGION,
            aws_access_key_id=tenant.access_key_id, aws_secret_access_key=secret or tenant.secret_access_key,
            config=Config(retries={"total_max_attempts": attempts, "mode": "standard"}),  # botocore: the first one too
        )  # fmt: skip

    with Client(settings=tiny_daemon.settings) as admin:
        tenants = [new_aws_tenant(admin) for _ in range(4)]
    once = lam(tenants[0])
    once.list_microvms()
    with pytest.raises(once.exceptions.ThrottlingException) as throttled:
        once.list_microvms()
    headers = throttled.value.response["ResponseMetadata"]["HTTPHeaders"]
    assert int(headers["retry-after"]) == 2 and 1000 < int(headers["x-amz-retry-after"]) <= 2000
    # botocore's standard retries wait what x-amz-retry-after says: the second attempt passes
    patient = lam(tenants[1], attempts=2)
    patient.list_microvms()
    began = time.monotonic()
    assert patient.list_microvms()["items"] == []
    assert time.monotonic() - began >= 1.5
    # Ember's bounds, named by the API's members (checked before the image is looked for)
    idle, long = lam(tenants[2]), lam(tenants[3])
    with pytest.raises(idle.exceptions.ValidationException, match=r"idlePolicy\.maxIdleDurationSeconds=60"):
        idle.run_microvm(imageIdentifier="debian", idlePolicy={**IDLE, "maxIdleDurationSeconds": 60})
    with pytest.raises(long.exceptions.ValidationException, match="maximumDurationInSeconds=200: at most 100"):
        long.run_microvm(imageIdentifier="debian", maximumDurationInSeconds=200)

    # refusals of unknown access key ids: three from this address, then throttled before any lookup, whatever
    # X-Forwarded-For says (the listeners trust no proxy header)
    def unknown(forwarded: str = "") -> Any:
        client = lam(AwsTenant("x", "0", "k", "", "AKIA" + secrets.token_hex(8).upper(), "s" * 40))
        if forwarded:
            client.meta.events.register("before-sign.*.*", lambda request, **_: request.headers.add_header(
                "X-Forwarded-For", forwarded))  # fmt: skip
        return client

    for _ in range(3):
        with pytest.raises(botocore.exceptions.ClientError, match="AccessDenied"):
            unknown().list_microvms()
    for forwarded in ("", "198.51.100.1", "198.51.100.2"):
        with pytest.raises(botocore.exceptions.ClientError, match=r"ThrottlingException.*refused requests"):
            unknown(forwarded).list_microvms()
    # ... which slows down neither a live key's valid requests nor refusals of a live key's bad signatures,
    # counted for that key from this address: three, then throttled, its valid requests from here too
    assert lam(tenants[1], attempts=3).list_microvms()["items"] == []
    guess = lam(tenants[0], secret="wrong" * 8)
    for _ in range(3):
        with pytest.raises(guess.exceptions.AccessDeniedException):
            guess.list_microvms()
    for blocked in (guess, lam(tenants[0], attempts=1)):
        with pytest.raises(blocked.exceptions.ThrottlingException, match="refused requests"):
            blocked.list_microvms()
