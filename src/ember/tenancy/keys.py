"""API keys: a bearer token for Ember's API and an AWS SigV4 key pair, made together and revoked together.

The bearer token (``ember_`` + 256 random bits) is stored only as its SHA-256: with that much entropy a plain
hash cannot be brute-forced, and a lookup costs one hash (a request must stay well under a millisecond).
The SigV4 secret must be read back to check signatures, so it is stored sealed (:mod:`ember.tenancy.secrets`).
"""

from __future__ import annotations

import hashlib
import secrets
import string
from dataclasses import dataclass

TOKEN_PREFIX = "ember_"
_ALNUM = string.ascii_uppercase + string.digits


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class NewKey:
    """A key's secrets as made: shown once, then only their hash and sealed form are kept."""

    key_id: str
    api_key: str
    access_key_id: str
    secret_access_key: str

    @classmethod
    def make(cls) -> NewKey:
        return cls(
            key_id=f"key-{secrets.token_hex(8)}",
            api_key=TOKEN_PREFIX + secrets.token_urlsafe(32),
            access_key_id="AKIA" + "".join(secrets.choice(_ALNUM) for _ in range(16)),
            secret_access_key=secrets.token_urlsafe(30)[:40],
        )
