"""The image ARN and version the microVM operations show: what RunMicrovm named (recorded with the VM), else,
for a VM run through Ember's own API, its Ember image (a built-in base is a managed image, account ``aws``,
version ``1``; a tenant's image is its repo and version)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ember.aws.arns import MANAGED_ACCOUNT, image_arn, parse_image_arn
from ember.aws.managed import VERSION, managed_name
from ember.tenancy import names


def named(identifier: str, *, region: str, account: str) -> str:
    """The ARN an ``imageIdentifier`` (an ARN, or a name) stands for, as the microVMs show it."""
    managed = managed_name(identifier)
    if managed is not None:
        return image_arn(region, MANAGED_ACCOUNT, managed)
    arn = parse_image_arn(identifier)
    return image_arn(region, account, arn.name) if arn is not None else image_arn(region, account, identifier)


def shown(internal: str, aws: Mapping[str, Any], *, region: str, account: str) -> tuple[str, str]:
    """The image ARN and version shown for a VM of the Ember image ``internal`` run with ``aws`` (its record's)."""
    if "image" in aws:
        owner = MANAGED_ACCOUNT if aws.get("managed") else account
        return image_arn(region, owner, aws["image"]), str(aws["imageVersion"])
    repo, _, tag = names.public(internal).partition(":")
    if names.tenant_of(internal) == "":
        return image_arn(region, MANAGED_ACCOUNT, repo), VERSION
    return image_arn(region, account, repo), tag or VERSION
