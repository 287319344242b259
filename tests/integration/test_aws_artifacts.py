"""Code artifacts from a real S3-compatible store (SeaweedFS, tests/s3store.py), uploaded with boto3's S3 client.

No VM and no daemon: these run outside the VM lock. The zips' own checks are unit-tested through file://
(tests/unit/test_aws_artifacts.py); here, what only a real store shows: signatures, missing objects and buckets,
sizes, deadlines, each tenant's scope, and hostile zips arriving through s3:// too."""

from __future__ import annotations

import dataclasses
import os
import secrets
from pathlib import Path

import pytest

from ember.aws.artifacts import fetch_context
from ember.aws.errors import AwsError, InternalServerException, ResourceNotFoundException, ValidationException
from ember.config import Settings
from tests.s3store import S3Store, _free_ports
from tests.zips import DOCKER, DOCKERFILE, HOSTILE, Raw, good_zip, raw_zip

pytestmark = pytest.mark.store_agnostic  # no database: the SQLite pass runs them once

ACCOUNT = "123456789012"  # the tenant's: its objects' keys start with "123456789012/"
OTHER = "210987654321"


@pytest.fixture
def settings(s3_store: S3Store, tmp_path: Path) -> Settings:
    return Settings.from_env(s3_store.env(), data_dir=tmp_path, max_build_context_bytes=64 << 20)


@pytest.fixture
def bucket(s3_store: S3Store) -> str:
    return s3_store.bucket("code")


def upload(s3_store: S3Store, bucket: str, data: bytes, account: str = ACCOUNT) -> str:
    key = f"{account}/apps/{secrets.token_hex(4)}/code.zip"
    s3_store.client().put_object(Bucket=bucket, Key=key, Body=data)
    return f"s3://{bucket}/{key}"


async def fetch(settings: Settings, uri: str) -> Path:
    into = settings.data_dir / "context"
    into.mkdir(exist_ok=True)
    await fetch_context(uri, into=into, settings=settings, account=ACCOUNT)
    return into


async def test_a_zip_from_the_store_becomes_a_build_context(s3_store: S3Store, bucket: str, settings: Settings) -> None:
    into = await fetch(settings, upload(s3_store, bucket, good_zip()))
    assert (into / "Dockerfile").read_bytes() == DOCKERFILE
    assert (into / "lib/run.sh").stat().st_mode & 0o777 == 0o755


async def test_missing_objects_and_buckets_are_not_found(s3_store: S3Store, bucket: str, settings: Settings) -> None:
    for uri in (f"s3://{bucket}/{ACCOUNT}/no/such.zip", f"s3://no-such-bucket/{ACCOUNT}/code.zip"):
        with pytest.raises(ResourceNotFoundException, match="upload it there first"):
            await fetch(settings, uri)


async def test_another_accounts_object_answers_exactly_like_a_missing_one(
    s3_store: S3Store, bucket: str, settings: Settings
) -> None:
    theirs = upload(s3_store, bucket, good_zip(), account=OTHER)
    key = theirs.removeprefix(f"s3://{bucket}/{OTHER}/")
    s3_store.client().put_object(Bucket=bucket, Key=key, Body=good_zip())  # outside every account's folder
    mine_missing = f"s3://{bucket}/{ACCOUNT}/{key}"
    answers = []
    for uri in (mine_missing, theirs, f"s3://{bucket}/{key}"):
        with pytest.raises(ResourceNotFoundException) as caught:
            await fetch(settings, uri)
        answers.append(caught.value.message.replace(uri, "URI"))
    assert answers[0] == answers[1] == answers[2]
    assert answers[0].endswith(f"this account's code artifacts go under s3://{bucket}/{ACCOUNT}/")
    shared = dataclasses.replace(settings, aws_artifact_scope="shared")  # one tenant: the whole store is its
    await fetch(shared, theirs)
    assert (settings.data_dir / "context" / "Dockerfile").read_bytes() == DOCKERFILE


async def test_bad_credentials_are_refused_without_showing_them(
    s3_store: S3Store, bucket: str, settings: Settings
) -> None:
    uri = upload(s3_store, bucket, good_zip())
    for wrong in ({"s3_secret_access_key": "not-the-secret"}, {"s3_access_key_id": "AKIDUNKNOWN"}):
        with pytest.raises(ValidationException, match="refused to hand out") as caught:
            await fetch(dataclasses.replace(settings, **wrong), uri)
        assert "not-the-secret" not in caught.value.message and "AKIDUNKNOWN" not in caught.value.message
        assert s3_store.secret_access_key not in caught.value.message


async def test_without_credentials_ember_never_uses_the_hosts(
    s3_store: S3Store, bucket: str, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = upload(s3_store, bucket, good_zip())
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_store.access_key_id)  # valid, but not Ember's configuration
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_store.secret_access_key)
    anonymous = dataclasses.replace(settings, s3_access_key_id="", s3_secret_access_key="")
    with pytest.raises(ValidationException, match="refused to hand out"):
        await fetch(anonymous, uri)


async def test_an_object_over_the_context_limit_is_refused(s3_store: S3Store, bucket: str, settings: Settings) -> None:
    uri = upload(s3_store, bucket, raw_zip([DOCKER, Raw(b"blob", os.urandom(2 << 20))]))
    with pytest.raises(ValidationException, match="larger than the 1048576 bytes"):
        await fetch(dataclasses.replace(settings, max_build_context_bytes=1 << 20), uri)
    assert os.listdir(settings.data_dir / "context") == []


async def test_a_download_past_its_deadline_is_cut(s3_store: S3Store, bucket: str, settings: Settings) -> None:
    uri = upload(s3_store, bucket, good_zip())
    with pytest.raises(InternalServerException, match="EMBER_S3_TIMEOUT"):
        await fetch(dataclasses.replace(settings, s3_timeout_s=0.0), uri)


async def test_a_store_that_does_not_answer_is_a_server_error(settings: Settings) -> None:
    (port,) = _free_ports(1)
    down = dataclasses.replace(settings, s3_endpoint=f"http://127.0.0.1:{port}")
    with pytest.raises(InternalServerException, match="did not answer") as caught:
        await fetch(down, f"s3://code/{ACCOUNT}/app.zip")
    assert str(port) not in caught.value.message  # the store's address is the operator's business


@pytest.mark.parametrize("case", ["traversal", "symlink", "overlap", "ratio", "zip64-size", "not-a-zip"])
async def test_hostile_zips_from_the_store_are_refused(
    s3_store: S3Store, bucket: str, settings: Settings, case: str
) -> None:
    make, words = HOSTILE[case]
    with pytest.raises(AwsError, match=words) as caught:
        await fetch(settings, upload(s3_store, bucket, make()))
    assert isinstance(caught.value, ValidationException)
    assert os.listdir(settings.data_dir / "context") == []
