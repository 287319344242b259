"""Which Ember image an AWS ``imageIdentifier`` (an image ARN or a plain name) and ``imageVersion`` name, and the
ARN and version the API shows for an Ember image.

A managed image (account ``aws``: Ember's built-in bases, e.g. ``debian``) has the one version ``1``. A tenant's
image is its Ember repo, its versions the repo's version numbers. Another account's ARN answers as a missing
image (ResourceNotFoundException), exactly like an image that does not exist.
"""

from __future__ import annotations

from dataclasses import dataclass

from ember.aws.arns import MANAGED_ACCOUNT, image_arn, parse_image_arn
from ember.aws.errors import ResourceNotFoundException, ValidationException
from ember.images import RESERVED_NAMES
from ember.tenancy import names

MANAGED_VERSION = "1"  # a built-in base's one version


@dataclass(frozen=True)
class ImageRef:
    """An Ember image as the AWS API names it."""

    public: str  # Ember's public name of the repo (no tag)
    version: int | None  # a version of a tenant's repo; None: its newest (or a managed image)
    managed: bool


def _missing(identifier: str) -> ResourceNotFoundException:
    return ResourceNotFoundException(
        f"no microVM image '{identifier[:300]}': list images with ListMicrovmImages (or ListManagedMicrovmImages)",
        resourceType="MicrovmImage", resourceId=identifier[:300],
    )  # fmt: skip


def resolve(identifier: str, version: str | None, *, account: str) -> ImageRef:
    """The image ``identifier`` names for the caller of ``account``."""
    arn = parse_image_arn(identifier)
    if arn is None and identifier.startswith("arn:"):
        raise _missing(identifier)
    name = arn.name if arn is not None else identifier
    managed = name in RESERVED_NAMES and (arn is None or arn.managed)
    if arn is not None and not managed and arn.account != account:
        raise _missing(identifier)
    if not names.REPO.match(name):
        raise _missing(identifier)
    if managed:
        if version not in (None, MANAGED_VERSION):
            raise _missing(f"{identifier}:{version}")
        return ImageRef(name, None, managed=True)
    if version is not None and not (version.isdigit() and 1 <= int(version) <= 2**31):
        raise ValidationException(
            f"imageVersion {version[:40]!r}: a version of a microVM image is a number (1, 2, ...)"
        )
    return ImageRef(name, int(version) if version is not None else None, managed=False)


def shown(internal: str, *, region: str, account: str) -> tuple[str, str]:
    """The image ARN and version the API shows for the Ember image ``internal`` (a store name, ``repo:tag``)."""
    repo, _, tag = names.public(internal).partition(":")
    if names.tenant_of(internal) == "":
        return image_arn(region, MANAGED_ACCOUNT, repo), MANAGED_VERSION
    return image_arn(region, account, repo), tag or MANAGED_VERSION
