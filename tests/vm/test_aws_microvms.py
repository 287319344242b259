"""The AWS Lambda MicroVMs API's microVM operations, driven by boto3 against the real test daemon: run (the
managed base by ARN, connectors, idle policy, client token), get, HTTP through the endpoint with the auth token
in X-aws-proxy-auth, suspend, resume, terminate, list with pagination, another tenant's microVMs answering
ResourceNotFound, and every refusal parsed by botocore as the model's exception."""

from __future__ import annotations

import http.client
import json
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import botocore.auth
import httpx
import pytest

from ember.sdk import Client
from tests.awsfixtures import AwsClientFactory, AwsTenant, new_aws_tenant
from tests.conftest import DaemonProcess, remove_quietly
from tests.vm.test_ingress import start_app

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
