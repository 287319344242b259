"""The AWS API's image operations through boto3 against the real daemon: managed images, and every refusal
before a build starts (its error shape as botocore parses it); another tenant's images answer as missing."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import ClientError

from ember.sdk import Client
from tests.awsfixtures import REGION, AwsClientFactory, AwsTenant, new_aws_tenant

pytestmark = pytest.mark.vm

ROLE = "arn:aws:iam::123456789012:role/build"


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


def test_missing_and_other_tenants_images_answer_resource_not_found(
    client: Client, aws_tenant: AwsTenant, aws_client: AwsClientFactory
) -> None:
    lam = aws_client(aws_tenant)
    other = new_aws_tenant(client, "aws-other")
    mine = f"arn:aws:lambda:{REGION}:{aws_tenant.account_id}:microvm-image:MyApp"
    theirs = f"arn:aws:lambda:{REGION}:{other.account_id}:microvm-image:MyApp"
    calls = [
        lambda: lam.get_microvm_image(imageIdentifier="MyApp"),
        lambda: lam.get_microvm_image(imageIdentifier=theirs),
        lambda: lam.get_microvm_image(imageIdentifier="not a name"),
        lambda: lam.list_microvm_image_versions(imageIdentifier=mine),
        lambda: lam.get_microvm_image_version(imageIdentifier="MyApp", imageVersion="1"),
        lambda: lam.get_microvm_image_build(imageIdentifier="MyApp", imageVersion="1", buildId="b-1"),
        lambda: lam.update_microvm_image_version(imageIdentifier="MyApp", imageVersion="1", status="INACTIVE"),
        lambda: lam.delete_microvm_image(imageIdentifier="MyApp"),
        lambda: lam.delete_microvm_image_version(imageIdentifier="MyApp", imageVersion="1"),
        lambda: lam.list_tags(Resource=mine),
        lambda: lam.list_tags(Resource=theirs),
        lambda: lam.tag_resource(Resource=theirs, Tags={"a": "b"}),
        lambda: lam.untag_resource(Resource=mine, TagKeys=["a"]),
        lambda: _update(lam),
    ]
    for call in calls:
        code, status, _ = _error(call)
        assert (code, status) == ("ResourceNotFoundException", 404)
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_microvm_image(imageIdentifier="MyApp")
    assert _error(lambda: lam.list_microvm_images(nextToken="bm90IG91cnM="))[:2] == ("ValidationException", 400)


def _update(lam: Any) -> Any:
    base = f"arn:aws:lambda:{REGION}:aws:microvm-image:debian"
    return lam.update_microvm_image(
        imageIdentifier="MyApp", baseImageArn=base, buildRoleArn=ROLE, codeArtifact={"uri": "s3://bucket/app.zip"}
    )
