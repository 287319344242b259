"""ARNs in AWS's format, with the tenant's account id: what the API returns and what it accepts back.

- a tenant's image: ``arn:aws:lambda:<region>:<account>:microvm-image:<name>``
- a managed image (Ember's built-in bases): ``arn:aws:lambda:<region>:aws:microvm-image:<name>``
- a managed network connector, accepted as AWS's documentation writes it
  (``arn:aws:lambda:<region>:aws:network-connector:aws-network-connector:ALL_INGRESS``) or without the
  ``aws-network-connector:`` part

Any region is accepted in an ARN sent back (Ember has one); the account must be the caller's (or ``aws``
for a managed image), else the resource answers as missing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MANAGED_ACCOUNT = "aws"
_CONNECTOR = re.compile(r"^arn:aws:lambda:[a-z0-9-]*:aws:network-connector:(?:aws-network-connector:)?([A-Z_]{1,32})$")
_ARN = re.compile(r"^arn:aws:lambda:([a-z0-9-]*):([a-z0-9]*):microvm-image:([A-Za-z0-9_-]{1,64})$")


@dataclass(frozen=True)
class ImageArn:
    region: str
    account: str
    name: str

    @property
    def managed(self) -> bool:
        return self.account == MANAGED_ACCOUNT

    def __str__(self) -> str:
        return f"arn:aws:lambda:{self.region}:{self.account}:microvm-image:{self.name}"


def image_arn(region: str, account: str, name: str) -> str:
    return str(ImageArn(region, account, name))


def parse_image_arn(text: str) -> ImageArn | None:
    """The image ARN ``text`` is, or None (a plain name, or not an ARN of an image)."""
    m = _ARN.match(text)
    return ImageArn(m[1], m[2], m[3]) if m else None


def connector_name(text: str) -> str:
    """The managed connector a name or an ARN names (``INTERNET_EGRESS``...); anything else as given."""
    m = _CONNECTOR.match(text)
    return m[1] if m else text
