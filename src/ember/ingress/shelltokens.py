"""Shell tokens (as AWS's ``CreateMicrovmShellAuthToken``): how a shell's WebSocket carries one, and what it grants.

A shell token (:class:`~ember.ingress.tokens.TokenKind` ``SHELL``, from ``POST /v1/vms/{id}/shell-tokens``)
opens the shell of one VM, instead of an API key, in one of two places:

- the ``Sec-WebSocket-Protocol`` header, as the subprotocol ``ember.authentication.<token>`` (or AWS's
  ``lambda-microvms.authentication.<token>``). The server then selects the first non-secret subprotocol
  the client offered along with it (``ember`` or ``lambda-microvms``, as AWS does; none if it offered
  neither), so the token is never echoed back;
- the ``token`` query parameter (browsers cannot set headers, but can offer subprotocols).

One token in all, never with an ``Authorization`` header too. The header is bounded before it is split
(``MAX_PROTOCOL_CHARS``, ``MAX_PROTOCOLS``). The token leaves the request before the route sees it (the
query loses its ``token``), so it reaches neither the guest nor a log line.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote_plus

from ember.errors import InvalidRequest, Unauthorized
from ember.ingress.tokens import TokenKind, TokenSigner
from ember.tenancy.principal import Principal

AUTH_PREFIXES = ("ember.authentication.", "lambda-microvms.authentication.")
PLAIN = frozenset({"ember", "lambda-microvms"})  # the subprotocols the server may select (no secret in them)
MAX_PROTOCOL_CHARS = 4096  # of every Sec-WebSocket-Protocol value together (a token is at most 1024)
MAX_PROTOCOLS = 16  # subprotocols offered
SUBPROTOCOL = "ember.subprotocol"  # the scope's key: the subprotocol the shell selects (None: none)
ACTOR = "shell-token"  # who events name as the actor of what a shell token's shell does
SHELL_PATH = re.compile(r"^/v1/vms/([^/]+)/shell$")


@dataclass(frozen=True)
class ShellCredential:
    """What a shell's handshake offers: a shell token (or None), the subprotocol to select, and the query
    without the token."""

    token: str | None
    subprotocol: str | None
    query_string: bytes


def shell_credential(offered: Sequence[str], query_string: bytes, *, authorization: bool) -> ShellCredential:
    """The shell token a handshake offers, if any: ``offered`` its subprotocols (the ASGI scope's, split from
    Sec-WebSocket-Protocol), ``authorization`` whether it has that header too. InvalidRequest (400) for too
    many or too long subprotocols, Unauthorized (401) for more than one token, or a token and a key."""
    if sum(len(p) for p in offered) > MAX_PROTOCOL_CHARS:
        raise InvalidRequest(f"the WebSocket subprotocols are over {MAX_PROTOCOL_CHARS} characters in all")
    if len(offered) > MAX_PROTOCOLS:
        raise InvalidRequest(f"more than {MAX_PROTOCOLS} WebSocket subprotocols offered")
    tokens = [p[len(prefix) :] for p in offered for prefix in AUTH_PREFIXES if p.startswith(prefix)]
    kept: list[bytes] = []
    for part in query_string.split(b"&"):
        name, _, value = part.partition(b"=")
        if unquote_plus(name.decode("latin-1")) == "token":
            tokens.append(unquote_plus(value.decode("latin-1")))
        elif part:
            kept.append(part)
    if len(tokens) > 1:
        raise Unauthorized("send one shell token: in the Sec-WebSocket-Protocol header or the token query parameter")
    if tokens and authorization:
        raise Unauthorized("send a shell token or an Authorization header, not both")
    selected = next((p for p in offered if p in PLAIN), None)
    return ShellCredential(tokens[0] if tokens else None, selected, b"&".join(kept))


def shell_principal(signer: TokenSigner, token: str, path: str) -> Principal:
    """Who a shell token acts as on the shell route ``path``: its VM's tenant, never an admin. Refused
    (401/403) when it is malformed, forged, expired, of another kind (a proxy token), or for another VM."""
    grant = signer.verify(token, kind=TokenKind.SHELL)
    found = SHELL_PATH.match(path)
    if found is None or found[1] != grant.vm_id:
        raise Unauthorized("the shell token is for another VM")
    return Principal(grant.tenant, admin=False, key_id=ACTOR)
