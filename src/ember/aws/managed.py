"""Managed images: Ember's built-in base, ``debian`` (Debian 12 with python3; ``ember run debian``), shown
under the account ``aws`` (``arn:aws:lambda:<region>:aws:microvm-image:debian``), read-only for everyone.

It is listed once built (the operator builds it: ``ember image ls``), with one version, ``1``, AVAILABLE on
X86_64. As a ``baseImageArn`` it is recorded (an image's root filesystem is its Dockerfile's ``FROM``:
:mod:`ember.aws.imagespec`); RunMicrovm may launch it by that ARN.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ember.aws.arns import MANAGED_ACCOUNT, image_arn, parse_image_arn
from ember.aws.errors import ResourceNotFoundException, ValidationException
from ember.aws.imagestore import page
from ember.aws.operations import Call, operation
from ember.images import BASE_IMAGE
from ember.models import ImageRecord, parse_time

if TYPE_CHECKING:
    from ember.daemon import Daemon

MANAGED = (BASE_IMAGE,)
VERSION = "1"
CPUS = [{"architecture": "X86_64"}]


def managed_name(identifier: str) -> str | None:
    """The managed image an identifier (its ARN, of any region, or its name) names, or None."""
    arn = parse_image_arn(identifier)
    name = arn.name if arn is not None and arn.managed else None if arn is not None else identifier
    return name if name in MANAGED else None


def check_base(arn: str, version: str | None) -> None:
    """A ``baseImageArn`` (and ``baseImageVersion``) must name a managed image's version."""
    parsed = parse_image_arn(arn)
    if parsed is None or not parsed.managed:
        raise ValidationException(
            f"baseImageArn {arn[:200]!r}: give a managed image's ARN (ListManagedMicrovmImages), e.g. "
            f"arn:aws:lambda:<region>:{MANAGED_ACCOUNT}:microvm-image:{BASE_IMAGE}"
        )
    if parsed.name not in MANAGED:
        raise ResourceNotFoundException(f"no managed image {parsed.name}: ListManagedMicrovmImages lists them")
    if version is not None and version != VERSION:
        raise ResourceNotFoundException(
            f"managed image {parsed.name} has no version {version[:40]!r}: it has {VERSION}"
        )


def _built(daemon: Daemon, name: str) -> ImageRecord | None:
    return daemon.engine.store.get_image(name)


@operation("ListManagedMicrovmImages")
async def list_managed(daemon: Daemon, call: Call) -> Mapping[str, Any]:
    items = []
    for name in MANAGED:
        built = _built(daemon, name)
        if built is not None:
            at = parse_time(built.created_at)
            items.append({"imageArn": image_arn(call.region, MANAGED_ACCOUNT, name), "createdAt": at, "updatedAt": at})
    shown, token = page(
        items, lambda i: str(i["imageArn"]), call.params.get("maxResults"), call.params.get("nextToken")
    )
    return {"items": shown, "nextToken": token}


@operation("ListManagedMicrovmImageVersions")
async def list_managed_versions(daemon: Daemon, call: Call) -> Mapping[str, Any]:
    identifier = str(call.params["imageIdentifier"])
    name = managed_name(identifier)
    built = _built(daemon, name) if name is not None else None
    if name is None or built is None:
        raise ResourceNotFoundException(f"no managed image {identifier[:200]}", resourceType="MicrovmImage")
    at = parse_time(built.created_at)
    items = [{"imageArn": image_arn(call.region, MANAGED_ACCOUNT, name), "imageVersion": VERSION,
              "status": "AVAILABLE", "supportedCpuConfigurations": CPUS, "createdAt": at, "updatedAt": at}]  # fmt: skip
    shown, token = page(
        items, lambda i: str(i["imageVersion"]), call.params.get("maxResults"), call.params.get("nextToken")
    )
    return {"items": shown, "nextToken": token}
