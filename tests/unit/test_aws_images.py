"""The AWS image operations' pure rules: names <-> repos, states, pagination tokens, the request's members."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from ember.aws import imagestore
from ember.aws.errors import ResourceNotFoundException, ValidationException
from ember.aws.imagespec import build_network, environment, hook_settings, spec_of
from ember.aws.imagestore import AwsImage, AwsVersion, image_state, page, repo_for, version_state
from ember.aws.managed import check_base, managed_name
from ember.config import Settings
from ember.hooks import AWS_PREFIX, Hook
from ember.models import BuildRecord, BuildState
from ember.tenancy import names

BASE = "arn:aws:lambda:eu-west-1:aws:microvm-image:debian"


def test_names_that_are_ember_repos_keep_their_name_and_others_get_a_distinct_hashed_one() -> None:
    assert repo_for("myapp") == "myapp" and repo_for("my_app-2") == "my_app-2"
    upper, lower = repo_for("MyApp"), repo_for("myapp")
    assert upper != lower and upper.startswith("aws-myapp-") and names.REPO.match(upper)
    assert repo_for("MYAPP") not in (upper, lower)  # case matters, as on AWS
    for odd in ("debian", "python", "_x", "-x", "aws-x", "A" * 64, "_" * 64, "ember"):
        repo = repo_for(odd)
        assert names.REPO.match(repo) and repo != odd and repo.startswith("aws-"), (odd, repo)
    assert repo_for("_" * 64) == "aws-" + repo_for("_" * 64)[4:] and len(repo_for("Z" * 64)) <= 63


def _version(number: int, **kw: Any) -> AwsVersion:
    return AwsVersion("t", "img", number, f"b-{number}", "ACTIVE", {}, "2026-01-01T00:00:00+00:00", "x", **kw)


def _build(state: BuildState) -> BuildRecord:
    return BuildRecord(name="r:1", repo="r", version=1, state=state)


def test_version_and_build_states_follow_embers_build() -> None:
    v = _version(1)
    assert version_state(v, None) == "FAILED"  # its build record is gone: removed through Ember's own API
    assert version_state(v, _build(BuildState.BUILDING)) == "IN_PROGRESS"
    assert version_state(v, _build(BuildState.CREATED)) == "SUCCESSFUL"
    assert version_state(v, _build(BuildState.CREATE_FAILED)) == "FAILED"
    assert version_state(_version(1, deleted_at="now"), _build(BuildState.CREATED)) == "DELETED"
    assert imagestore.build_state(_version(1, deleted_at="now"), _build(BuildState.CREATED)) == "SUCCESSFUL"


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        ([(1, "IN_PROGRESS")], "CREATING"),
        ([(1, "SUCCESSFUL")], "CREATED"),
        ([(1, "FAILED")], "CREATE_FAILED"),
        ([(1, "SUCCESSFUL"), (2, "IN_PROGRESS")], "UPDATING"),
        ([(1, "SUCCESSFUL"), (2, "SUCCESSFUL")], "UPDATED"),
        ([(1, "SUCCESSFUL"), (2, "FAILED")], "UPDATE_FAILED"),
        ([(1, "SUCCESSFUL"), (2, "DELETED")], "CREATED"),  # its newest live version is its first again
        ([(1, "DELETED"), (2, "SUCCESSFUL")], "UPDATED"),
    ],
)
def test_the_image_state_follows_its_newest_live_version(states: list[tuple[int, str]], expected: str) -> None:
    image = AwsImage("t", "img", "img", {}, "a", "b")
    versions = [(_version(n, deleted_at="x" if s == "DELETED" else ""), s) for n, s in states]
    assert image_state(image, versions) == expected
    assert image_state(AwsImage("t", "img", "img", {}, "a", "b", deleted_at="c"), versions) == "DELETED"


def test_pages_end_where_their_token_says_and_foreign_tokens_are_refused() -> None:
    items = [f"n{i:02d}" for i in range(7)]
    seen, token = [], None
    while True:
        shown, token = page(items, str, 3, token)
        seen += shown
        if token is None:
            break
    assert seen == items
    assert page(items, str, None, None) == (items, None)
    for bad in ("%%%", base64.urlsafe_b64encode(b"zz").decode(), base64.urlsafe_b64encode(b"\xff\xfe").decode()):
        with pytest.raises(ValidationException, match="nextToken"):
            page(items, str, 3, bad)


def _params(**kw: Any) -> dict[str, Any]:
    return {"name": "img", "baseImageArn": BASE, "buildRoleArn": "arn:aws:iam::123456789012:role/b",
            "codeArtifact": {"uri": "s3://b/k.zip"}, **kw}  # fmt: skip


def test_the_request_members_are_kept_and_what_ember_cannot_do_is_refused() -> None:
    settings = Settings()
    spec = spec_of(_params(kmsKeyIdentifier="alias/x", logging={"disabled": {}}, additionalOsCapabilities=["ALL"],
                           cpuConfigurations=[{"architecture": "X86_64"}], clientToken="t"), settings)  # fmt: skip
    assert spec["kmsKeyIdentifier"] == "alias/x" and spec["logging"] == {"disabled": {}} and "name" not in spec
    assert "clientToken" not in spec
    refused = [
        ({"cpuConfigurations": [{"architecture": "ARM_64"}]}, "X86_64 guests only"),
        ({"egressNetworkConnectors": ["arn:aws:lambda:us-east-1:123456789012:network-connector:vpc"]}, "INTERNET"),
        ({"resources": [{"minimumMemoryInMiB": settings.memory_mib + 1}]}, "EMBER_MEMORY_MIB"),
        ({"environmentVariables": {"A=B": "1"}}, "no '='"),
        ({"environmentVariables": {"A": "x\0y"}}, "NUL"),
        ({"description": "d" * 1025}, "at most 1024"),
    ]
    for extra, message in refused:
        with pytest.raises(ValidationException, match=message):
            spec_of(_params(**extra), settings)


def test_the_build_network_and_environment() -> None:
    assert build_network({}) is True
    assert build_network({"egressNetworkConnectors": ["INTERNET_EGRESS"]}) is True
    assert build_network(
        {"egressNetworkConnectors": ["arn:aws:lambda:eu-west-1:aws:network-connector:INTERNET_EGRESS"]}
    )
    documented = "arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:INTERNET_EGRESS"  # AWS's docs
    assert build_network({"egressNetworkConnectors": [documented]})
    assert build_network({"egressNetworkConnectors": []}) is False
    assert environment({"environmentVariables": {"B": "2", "A": "1"}}) == (("A", "1"), ("B", "2"))


def test_hooks_come_from_the_request_at_aws_paths() -> None:
    config, ready = hook_settings({})
    assert config.hooks == frozenset() and config.port == 9000 and config.prefix == AWS_PREFIX and ready == 120
    given = {"port": 8080, "microvmHooks": {"run": "ENABLED", "runTimeoutInSeconds": 7, "suspend": "DISABLED",
                                            "suspendTimeoutInSeconds": 3},
             "microvmImageHooks": {"ready": "ENABLED", "readyTimeoutInSeconds": 600, "validate": "ENABLED",
                                   "validateTimeoutInSeconds": 900}}  # fmt: skip
    config, ready = hook_settings({"hooks": given})
    assert config.port == 8080 and config.hooks == {Hook.RUN, Hook.READY, Hook.VALIDATE} and ready == 600
    assert config.timeouts == {Hook.RUN: 7.0, Hook.SUSPEND: 3.0, Hook.VALIDATE: 900.0}


def test_a_base_image_must_be_a_managed_image() -> None:
    check_base(BASE, None)
    check_base(BASE, "1")
    with pytest.raises(ValidationException, match="managed image's ARN"):
        check_base("arn:aws:lambda:eu-west-1:123456789012:microvm-image:debian", None)
    with pytest.raises(ValidationException):
        check_base("debian", None)
    with pytest.raises(ResourceNotFoundException):
        check_base("arn:aws:lambda:eu-west-1:aws:microvm-image:al2023-1", None)
    with pytest.raises(ResourceNotFoundException, match="no version"):
        check_base(BASE, "2")
    assert managed_name(BASE) == "debian" and managed_name("debian") == "debian"
    assert managed_name("arn:aws:lambda:eu-west-1:123456789012:microvm-image:debian") is None
    assert managed_name("myapp") is None
