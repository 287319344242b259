"""The AWS API's image operations through boto3 against the real daemon: managed images, and every refusal
before a build starts (its error shape as botocore parses it); another tenant's images, built, answer as missing
ones (RunMicrovm too); an update that only enables a hook builds anew (the hook runs); an INACTIVE version is not
run through Ember's own API either.

One image is built (and updated once) for the module: builds cost ~15 s each here."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from ember.aws.imagestore import repo_for
from ember.sdk import ApiError, Client
from tests.awsfixtures import REGION, AwsClientFactory, AwsTenant, new_aws_tenant
from tests.conftest import DaemonProcess
from tests.zips import good_zip

pytestmark = pytest.mark.vm

ROLE = "arn:aws:iam::123456789012:role/build"
DEBIAN = f"arn:aws:lambda:{REGION}:aws:microvm-image:debian"
APP_ZIP = good_zip({"Dockerfile": b'FROM debian\nCMD ["sleep", "infinity"]\n'})  # no hooks: ready once started


def _create(lam: Any, **kw: Any) -> Any:
    args = {"name": "MyApp", "baseImageArn": f"arn:aws:lambda:{REGION}:aws:microvm-image:debian",
            "buildRoleArn": ROLE, "codeArtifact": {"uri": "s3://bucket/app.zip"}, **kw}  # fmt: skip
    return lam.create_microvm_image(**args)


def _error(call: Any) -> tuple[str, int, str]:
    with pytest.raises(ClientError) as err:
        call()
    e = err.value.response
    return e["Error"]["Code"], e["ResponseMetadata"]["HTTPStatusCode"], e["Error"]["Message"]


def test_managed_images_are_embers_built_in_base(
    aws_tenant: AwsTenant, aws_client: AwsClientFactory, base_image: str
) -> None:
    lam = aws_client(aws_tenant)
    items = lam.list_managed_microvm_images()["items"]
    assert [i["imageArn"] for i in items] == [f"arn:aws:lambda:{REGION}:aws:microvm-image:debian"]
    versions = lam.list_managed_microvm_image_versions(imageIdentifier=items[0]["imageArn"])["items"]
    assert [(v["imageVersion"], v["status"]) for v in versions] == [("1", "AVAILABLE")]
    assert versions[0]["supportedCpuConfigurations"] == [{"architecture": "X86_64"}]
    assert _error(lambda: lam.list_managed_microvm_image_versions(imageIdentifier="al2023"))[:2] == (
        "ResourceNotFoundException", 404)  # fmt: skip


def test_what_ember_cannot_build_is_refused_before_anything_is_recorded(
    aws_tenant: AwsTenant, aws_client: AwsClientFactory
) -> None:
    lam = aws_client(aws_tenant)
    cases = [
        ({"cpuConfigurations": [{"architecture": "ARM_64"}]}, "ValidationException", 400, "X86_64"),
        ({"baseImageArn": f"arn:aws:lambda:{REGION}:{aws_tenant.account_id}:microvm-image:x"},
         "ValidationException", 400, "managed image"),
        ({"baseImageArn": f"arn:aws:lambda:{REGION}:aws:microvm-image:al2023-1"}, "ResourceNotFoundException", 404,
         "ListManagedMicrovmImages"),
        ({"baseImageVersion": "7"}, "ResourceNotFoundException", 404, "no version"),
        ({"egressNetworkConnectors": ["vpc-1"]}, "ValidationException", 400, "INTERNET_EGRESS"),
        ({"resources": [{"minimumMemoryInMiB": 1 << 20}]}, "ValidationException", 400, "EMBER_MEMORY_MIB"),
        ({"environmentVariables": {"A=B": "x"}}, "ValidationException", 400, "'='"),
        ({"tags": {f"k{i}": "v" for i in range(51)}}, "ValidationException", 400, "at most 50 tags"),
    ]  # fmt: skip
    for extra, code, status, message in cases:
        got = _error(lambda extra=extra: _create(lam, **extra))  # type: ignore[misc]
        assert got[:2] == (code, status) and message in got[2], (extra, got)
    assert lam.list_microvm_images()["items"] == []


@pytest.fixture(scope="module")
def owner(client: Client, daemon: DaemonProcess, base_image: str) -> AwsTenant:
    """A tenant whose image ``MyApp`` (version 1) is built, from a file:// zip in its account's folder."""
    tenant = new_aws_tenant(client, "aws-owner")
    home = Path(daemon.settings.aws_file_artifact_root) / tenant.account_id
    home.mkdir()
    (home / "app.zip").write_bytes(APP_ZIP)
    return tenant


def _uri(daemon: DaemonProcess, tenant: AwsTenant) -> str:
    return f"file://{daemon.settings.aws_file_artifact_root}/{tenant.account_id}/app.zip"


def _wait(lam: Any, version: str) -> dict[str, Any]:
    """The version once its build has ended."""
    deadline = time.monotonic() + 300
    while True:
        got: dict[str, Any] = lam.get_microvm_image_version(imageIdentifier="MyApp", imageVersion=version)
        if got["state"] not in ("PENDING", "IN_PROGRESS") or time.monotonic() > deadline:
            return got
        time.sleep(1)


@pytest.fixture(scope="module")
def owners_image(daemon: DaemonProcess, owner: AwsTenant, aws_client: AwsClientFactory) -> str:
    """``MyApp`` of ``owner``, built: its ARN."""
    lam = aws_client(owner)
    made = lam.create_microvm_image(
        name="MyApp", baseImageArn=DEBIAN, buildRoleArn=ROLE, codeArtifact={"uri": _uri(daemon, owner)}
    )
    assert made["imageVersion"] == "1"
    built = _wait(lam, "1")
    assert built["state"] == "SUCCESSFUL", built.get("stateReason")
    return str(made["imageArn"])


def test_missing_and_other_tenants_images_answer_resource_not_found(
    client: Client, aws_tenant: AwsTenant, aws_client: AwsClientFactory, owners_image: str
) -> None:
    lam = aws_client(aws_tenant)
    mine = f"arn:aws:lambda:{REGION}:{aws_tenant.account_id}:microvm-image:MyApp"
    theirs = owners_image  # another tenant's MyApp, built: the same name, the same answers as a missing one
    calls = [
        lambda: lam.get_microvm_image(imageIdentifier="MyApp"),
        lambda: lam.get_microvm_image(imageIdentifier=theirs),
        lambda: lam.get_microvm_image(imageIdentifier="not a name"),
        lambda: lam.list_microvm_image_versions(imageIdentifier=mine),
        lambda: lam.list_microvm_image_versions(imageIdentifier=theirs),
        lambda: lam.get_microvm_image_version(imageIdentifier="MyApp", imageVersion="1"),
        lambda: lam.get_microvm_image_version(imageIdentifier=theirs, imageVersion="1"),
        lambda: lam.get_microvm_image_build(imageIdentifier="MyApp", imageVersion="1", buildId="b-1"),
        lambda: lam.list_microvm_image_builds(imageIdentifier=theirs, imageVersion="1"),
        lambda: lam.update_microvm_image_version(imageIdentifier="MyApp", imageVersion="1", status="INACTIVE"),
        lambda: lam.update_microvm_image_version(imageIdentifier=theirs, imageVersion="1", status="INACTIVE"),
        lambda: lam.delete_microvm_image(imageIdentifier="MyApp"),
        lambda: lam.delete_microvm_image(imageIdentifier=theirs),
        lambda: lam.delete_microvm_image_version(imageIdentifier="MyApp", imageVersion="1"),
        lambda: lam.list_tags(Resource=mine),
        lambda: lam.list_tags(Resource=theirs),
        lambda: lam.tag_resource(Resource=theirs, Tags={"a": "b"}),
        lambda: lam.untag_resource(Resource=mine, TagKeys=["a"]),
        lambda: lam.run_microvm(imageIdentifier=theirs),
        lambda: lam.run_microvm(imageIdentifier=theirs, imageVersion="1"),
        lambda: lam.run_microvm(imageIdentifier="MyApp"),
        lambda: _update(lam),
        lambda: _update(lam, theirs),
    ]
    for call in calls:
        code, status, _ = _error(call)
        assert (code, status) == ("ResourceNotFoundException", 404)
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_microvm_image(imageIdentifier="MyApp")
    assert lam.list_microvm_images()["items"] == [] and lam.list_microvms()["items"] == []
    assert _error(lambda: lam.list_microvm_images(nextToken="bm90IG91cnM="))[:2] == ("ValidationException", 400)


def test_another_accounts_code_artifact_answers_as_missing(
    daemon: DaemonProcess, aws_tenant: AwsTenant, aws_client: AwsClientFactory, owner: AwsTenant
) -> None:
    lam = aws_client(aws_tenant)
    code, status, message = _error(lambda: _create(lam, codeArtifact={"uri": _uri(daemon, owner)}))
    assert (code, status) == ("ResourceNotFoundException", 404)
    assert f"folder {aws_tenant.account_id}" in message and daemon.settings.aws_file_artifact_root not in message
    assert lam.list_microvm_images()["items"] == []


def test_an_update_that_only_enables_a_hook_runs_it(
    daemon: DaemonProcess, owner: AwsTenant, aws_client: AwsClientFactory, owners_image: str
) -> None:
    lam = aws_client(owner)
    hooks = {"microvmImageHooks": {"validate": "ENABLED", "validateTimeoutInSeconds": 30}}  # nothing answers it
    updated = lam.update_microvm_image(imageIdentifier="MyApp", baseImageArn=DEBIAN, hooks=hooks, buildRoleArn=ROLE,
                                       codeArtifact={"uri": _uri(daemon, owner)})  # fmt: skip
    assert (updated["imageVersion"], updated["hooks"]) == ("2", hooks) and "tags" not in updated
    # the same disk, config and readiness as version 1: its snapshot was taken, and validate never called
    version = _wait(lam, "2")
    assert version["state"] == "FAILED" and "validate hook did not pass" in version["stateReason"], version
    image = lam.get_microvm_image(imageIdentifier="MyApp")
    assert (image["state"], image["latestActiveImageVersion"], image["latestFailedImageVersion"]) == (
        "UPDATE_FAILED", "1", "2")  # fmt: skip
    (build,) = lam.list_microvm_image_builds(imageIdentifier="MyApp", imageVersion="2")["items"]
    assert (build["buildState"], build["stateReason"]) == ("FAILED", version["stateReason"])


def test_an_inactive_version_is_not_run_through_embers_own_api(
    daemon: DaemonProcess, owner: AwsTenant, aws_client: AwsClientFactory, owners_image: str
) -> None:
    lam = aws_client(owner)
    lam.update_microvm_image_version(imageIdentifier="MyApp", imageVersion="1", status="INACTIVE")
    try:
        with Client(api_key=owner.api_key, settings=daemon.settings) as own, pytest.raises(ApiError) as refused:
            own.vms.run(repo_for("MyApp"), version=1)  # 'ember run aws-myapp-...:1' ran it
        assert refused.value.status == 409 and "INACTIVE" in str(refused.value)
        assert lam.list_microvms()["items"] == []
    finally:
        lam.update_microvm_image_version(imageIdentifier="MyApp", imageVersion="1", status="ACTIVE")


def _update(lam: Any, image: str = "MyApp") -> Any:
    return lam.update_microvm_image(
        imageIdentifier=image, baseImageArn=DEBIAN, buildRoleArn=ROLE, codeArtifact={"uri": "s3://bucket/app.zip"}
    )
