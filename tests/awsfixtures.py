"""boto3 against the test daemon (the AWS Lambda MicroVMs API, ember.aws): a tenant with a key, and a
``lambda-microvms`` client signing with that key's SigV4 pair on the daemon's TCP listener.

    def test_x(aws_tenant: AwsTenant, aws_client: AwsClientFactory) -> None:
        lam = aws_client(aws_tenant)
        lam.list_microvms()

tests/conftest.py imports these fixtures, so every test can ask for them.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from botocore.config import Config

from ember.sdk import Client

REGION = "us-east-1"


@dataclass(frozen=True)
class AwsTenant:
    """A tenant of the test daemon with one key: its bearer token and its SigV4 pair."""

    name: str
    account_id: str  # the 12 digits in its ARNs
    key_id: str
    api_key: str
    access_key_id: str
    secret_access_key: str


def new_aws_tenant(admin: Client, prefix: str = "aws", **quotas: int) -> AwsTenant:
    """A fresh tenant (with ``quotas`` over the defaults) and a key of it, made through Ember's API."""
    name = f"{prefix}-{secrets.token_hex(4)}"
    tenant = admin.tenants.create(name, quotas=quotas or None)
    key = admin.keys.create(tenant=name, name="boto3 test")
    assert key.access_key_id and key.secret_access_key
    return AwsTenant(name, tenant.account_id, key.key_id, key.api_key, key.access_key_id, key.secret_access_key)


AwsClientFactory = Callable[..., Any]


@pytest.fixture
def aws_tenant(client: Client) -> AwsTenant:
    """A new tenant for this test (its VMs are the test's to remove)."""
    return new_aws_tenant(client)


@pytest.fixture(scope="session")
def aws_endpoint(daemon: Any) -> str:
    """The test daemon's TCP listener, where boto3 sends its requests."""
    listen = daemon.settings.listen
    assert listen, "the session daemon listens on TCP (tests/conftest.py sets EMBER_LISTEN)"
    return f"http://{listen}"


@pytest.fixture(scope="session")
def aws_client(aws_endpoint: str) -> Iterator[AwsClientFactory]:
    """``aws_client(tenant, region=..., **config)`` -> ``boto3.client("lambda-microvms")`` signing as
    ``tenant`` (an :class:`AwsTenant`); botocore retries nothing unless ``config`` says so (its
    ``max_attempts`` counts retries, ``total_max_attempts`` attempts)."""
    made: list[Any] = []

    def factory(tenant: AwsTenant, *, region: str = REGION, secret: str | None = None, **config: Any) -> Any:
        options: dict[str, Any] = {"retries": {"total_max_attempts": 1, "mode": "standard"}, "read_timeout": 120}
        lam = boto3.client(
            "lambda-microvms", endpoint_url=aws_endpoint, region_name=region,
            aws_access_key_id=tenant.access_key_id,
            aws_secret_access_key=tenant.secret_access_key if secret is None else secret,
            config=Config(**{**options, **config}),
        )  # fmt: skip
        made.append(lam)
        return lam

    yield factory
    for lam in made:
        lam.close()
