"""VM auth tokens: what the ingress accepts in ``X-Ember-Proxy-Auth`` (or AWS's ``X-aws-proxy-auth``).

A token is checked without a database round trip: ``emt1.<payload>.<mac>`` (base64url), the payload a
compact JSON object ``{"vm", "tenant", "kind", "ports": [low, high], "exp"}`` and the MAC its
HMAC-SHA256 under a 32-byte key in a root-only file (``EMBER_INGRESS_KEY_FILE``, default
``<data_dir>/ingress.key``; replacing it revokes every token). ``kind`` says what a token opens
(:class:`TokenKind`); a token of one kind is refused where another is needed. Tokens live at most an
hour (``MAX_MINUTES``); removing the VM ends them too.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ember.errors import Forbidden, InvalidRequest, Unauthorized
from ember.tenancy.secrets import load_key

PREFIX = "emt1."
MAX_TOKEN_CHARS = 1024  # anything longer is no token of ours (checked before any decoding)
MIN_MINUTES, MAX_MINUTES = 1, 60
_DOMAIN = b"ember-ingress-token-v1\x00"  # MAC domain separation: the key signs nothing else
_RANGE = re.compile(r"^([0-9]{1,5})-([0-9]{1,5})$")
_PORT = re.compile(r"^[0-9]{1,5}$")
_VM_ID = re.compile(r"^vm-[0-9a-f]{1,64}$")


class TokenKind(enum.StrEnum):
    """What a token opens."""

    PROXY = "proxy"  # HTTP (and WebSocket) requests to the VM's ports through the ingress
    SHELL = "shell"  # the VM's shell WebSocket (ember.ingress.shelltokens), as AWS's CreateMicrovmShellAuthToken


@dataclass(frozen=True)
class Ports:
    """A closed range of guest ports."""

    low: int
    high: int

    @classmethod
    def parse(cls, spec: int | str) -> Ports:
        """A port (8080), a range ("8000-8100"), or "all"."""
        text = str(spec).strip().lower()
        if text == "all":
            return cls(1, 65535)
        found = _RANGE.match(text)
        low, high = (int(found[1]), int(found[2])) if found else (int(text), int(text)) if _PORT.match(text) else (0, 0)
        if not 1 <= low <= high <= 65535:
            raise InvalidRequest(
                f"allowed_ports {str(spec)[:40]!r}: give a port (8080), a range of ports 1-65535 (8000-8100), or 'all'"
            )
        return cls(low, high)

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.low <= port <= self.high

    def __str__(self) -> str:
        if (self.low, self.high) == (1, 65535):
            return "all"
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"


NO_PORTS = Ports(0, 0)  # a shell token's: it opens no port


@dataclass(frozen=True)
class Grant:
    """What a valid token allows."""

    vm_id: str
    tenant: str
    kind: TokenKind
    ports: Ports
    expires_at: int  # Unix seconds


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenSigner:
    """Issues and checks tokens; ``clock`` (Unix seconds) is the only notion of time it has."""

    def __init__(self, key: bytes, clock: Callable[[], float] = time.time) -> None:
        if len(key) < 32:
            raise ValueError("an ingress token key is at least 32 bytes")
        self._key = key
        self._clock = clock

    @classmethod
    def from_file(cls, path: Path) -> TokenSigner:
        return cls(load_key(path))

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, _DOMAIN + payload, hashlib.sha256).digest()

    def issue(self, *, vm_id: str, tenant: str, kind: TokenKind, ports: Ports, minutes: int) -> tuple[str, Grant]:
        if not MIN_MINUTES <= minutes <= MAX_MINUTES:
            raise InvalidRequest(f"expires_in_minutes is {MIN_MINUTES}-{MAX_MINUTES}")
        grant = Grant(vm_id, tenant, kind, ports, int(self._clock()) + minutes * 60)
        fields = {"vm": vm_id, "tenant": tenant, "kind": kind.value, "ports": [ports.low, ports.high],
                  "exp": grant.expires_at}  # fmt: skip
        payload = json.dumps(fields, separators=(",", ":"), sort_keys=True).encode()
        return f"{PREFIX}{_b64(payload)}.{_b64(self._mac(payload))}", grant

    def verify(self, token: str, *, kind: TokenKind) -> Grant:
        """The grant of a token this key made, of ``kind``, not expired; else Unauthorized (401)."""
        refused = Unauthorized(
            "the auth token is malformed or was not made by this Ember: make one with 'ember token create'"
        )
        if len(token) > MAX_TOKEN_CHARS or not token.startswith(PREFIX) or token.count(".") != 2:
            raise refused
        body, _, mac = token[len(PREFIX) :].partition(".")
        try:
            payload, tag = _unb64(body), _unb64(mac)
        except (binascii.Error, ValueError):
            raise refused from None
        if not hmac.compare_digest(tag, self._mac(payload)):
            raise refused
        # signed by us: the payload is our own JSON
        fields = json.loads(payload)
        grant = Grant(fields["vm"], fields["tenant"], TokenKind(fields["kind"]), Ports(*fields["ports"]), fields["exp"])
        if grant.kind is not kind:
            raise Forbidden(f"a {grant.kind.value} token cannot be used here: make a {kind.value} token")
        if grant.expires_at <= self._clock():
            raise Unauthorized("the auth token has expired: make a new one with 'ember token create'")
        return grant


def check_vm_id(vm_id: str) -> bool:
    return bool(_VM_ID.match(vm_id))
