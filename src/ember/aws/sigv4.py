"""AWS Signature Version 4, verified: what AWS's SDKs and CLI sign, checked with the key's secret.

A request carries ``Authorization: AWS4-HMAC-SHA256 Credential=<key>/<yyyymmdd>/<region>/lambda/aws4_request,
SignedHeaders=<h1;h2;...>, Signature=<hex>`` and ``X-Amz-Date``. The signature is recomputed over the request
as it arrived (the canonical request of botocore's ``SigV4Auth``: its raw path re-encoded, its query sorted, the
signed headers, the body's SHA-256) and compared in constant time. Any region is accepted; the service must be
``lambda``; ``host`` and ``x-amz-date`` must be signed; the date must be within the allowed skew; the body's hash
is always computed here (``UNSIGNED-PAYLOAD`` is refused); temporary credentials (``X-Amz-Security-Token``) are
refused, as Ember has none. Every refusal is an AccessDeniedException.

A path with an empty, ``.`` or ``..`` segment is refused before it is routed or verified
(:func:`routable_path`): the canonical path collapses such segments and routing would not, so a signature for
one operation would verify for another.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from calendar import timegm
from dataclasses import dataclass
from time import strptime
from urllib.parse import quote, unquote

from botocore.utils import normalize_url_path

from ember.aws.errors import AccessDeniedException, ValidationException

ALGORITHM = "AWS4-HMAC-SHA256"
SERVICE = "lambda"
DATE_FORMAT = "%Y%m%dT%H%M%SZ"
MAX_AUTHORIZATION_CHARS = 4096  # longer is no signature of ours (checked before it is parsed)
_AUTH = re.compile(
    r"^AWS4-HMAC-SHA256 +Credential=([A-Za-z0-9]{1,128})/([0-9]{8})/([a-z0-9-]{1,32})/([a-z0-9-]{1,32})/aws4_request"
    r", *SignedHeaders=([a-z0-9;._-]{1,1024}), *Signature=([0-9a-f]{64})$"
)
_AMZ_DATE = re.compile(r"^[0-9]{8}T[0-9]{6}Z$")


@dataclass(frozen=True)
class Credential:
    """What the Authorization header claims: checked against the key's secret by :func:`verify`."""

    access_key_id: str
    date: str  # yyyymmdd of the credential scope
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str

    @property
    def scope(self) -> str:
        return f"{self.date}/{self.region}/{self.service}/aws4_request"


@dataclass(frozen=True)
class SignedRequest:
    """A request as it arrived: ``raw_path`` percent-encoded as sent, ``headers`` with lowercase names."""

    method: str
    raw_path: str
    query_string: str
    headers: tuple[tuple[str, str], ...]
    body: bytes


def is_signed(headers: tuple[tuple[str, str], ...] | list[tuple[str, str]]) -> bool:
    """The request claims a SigV4 signature (its Authorization names the algorithm)."""
    return any(k == "authorization" and v.startswith(ALGORITHM) for k, v in headers)


def _one(request: SignedRequest, name: str) -> str | None:
    values = [v for k, v in request.headers if k == name]
    if len(values) > 1:
        raise AccessDeniedException(f"send one {name} header")
    return values[0] if values else None


def routable_path(raw_path: str) -> str:
    """``raw_path`` (percent-encoded, as sent) if no segment of it is empty, ``.`` or ``..`` (encoded or not);
    else ValidationException. The API's routes match this raw form: a label keeps its ``%2F``."""
    segments = raw_path.split("/")[1:]
    if not raw_path.startswith("/") or any(unquote(s) in ("", ".", "..") for s in segments):
        raise ValidationException(
            "the request path has an empty, '.' or '..' segment: no operation's path has one (send each "
            "identifier as one segment, '/' encoded as %2F)"
        )
    return raw_path


def parse(request: SignedRequest) -> Credential:
    """The credential the request claims; AccessDenied for a missing or malformed signature, or one made with
    temporary credentials (a session token)."""
    if _one(request, "x-amz-security-token") is not None:
        raise AccessDeniedException(
            "The security token included in the request is invalid: Ember has no temporary credentials (no STS "
            "session tokens); sign with a key's access key id and secret access key, without a session token"
        )
    value = _one(request, "authorization")
    if value is None or not value.startswith(ALGORITHM):
        raise AccessDeniedException(
            "sign the request with AWS Signature Version 4 (AWS4-HMAC-SHA256), with the access key id and secret "
            "access key that 'ember key create' prints"
        )
    found = _AUTH.match(value) if len(value) <= MAX_AUTHORIZATION_CHARS else None
    if found is None:
        raise AccessDeniedException("the Authorization header is not a well-formed AWS4-HMAC-SHA256 signature")
    signed = tuple(found[5].split(";"))
    if "host" not in signed or "x-amz-date" not in signed:
        raise AccessDeniedException("the signature must cover the host and x-amz-date headers")
    if found[4] != SERVICE:
        raise AccessDeniedException(f"the credential scope names the service '{found[4]}': sign for '{SERVICE}'")
    return Credential(found[1], found[2], found[3], found[4], signed, found[6])


def signed_at(request: SignedRequest, credential: Credential, *, now: float, skew_s: float) -> float:
    """The request's X-Amz-Date (Unix seconds), which must match the credential's date and be within ``skew_s``
    of ``now``; else AccessDenied."""
    stamp = _one(request, "x-amz-date")
    if stamp is None or not _AMZ_DATE.match(stamp) or stamp[:8] != credential.date:
        raise AccessDeniedException("X-Amz-Date must be yyyymmddThhmmssZ, on the credential scope's date")
    try:
        at = float(timegm(strptime(stamp, DATE_FORMAT)))
    except ValueError:
        raise AccessDeniedException(f"X-Amz-Date {stamp} is not a valid time") from None
    if abs(at - now) > skew_s:
        raise AccessDeniedException(
            f"Signature expired: X-Amz-Date {stamp} is more than {skew_s:g} seconds from the server's time: "
            "check the client's clock"
        )
    return at


def canonical_query(query_string: str) -> str:
    """Each name and value decoded, re-encoded (RFC 3986 unreserved characters kept), sorted."""
    if not query_string:
        return ""
    pairs = []
    for part in query_string.split("&"):
        name, _, value = part.partition("=")
        pairs.append((quote(unquote(name), safe="-_.~"), quote(unquote(value), safe="-_.~")))
    return "&".join(f"{k}={v}" for k, v in sorted(pairs))


def canonical_request(request: SignedRequest, credential: Credential, payload_hash: str) -> str:
    path = routable_path(request.raw_path)  # no segment that normalisation would collapse
    lines = [request.method.upper(), quote(normalize_url_path(path), safe="/~"),
             canonical_query(request.query_string)]  # fmt: skip
    for name in sorted(set(credential.signed_headers)):
        values = [v for k, v in request.headers if k == name]
        if not values:
            raise AccessDeniedException(f"the signed header '{name}' is not in the request")
        lines.append(f"{name}:{','.join(' '.join(v.split()) for v in values)}")
    return "\n".join([*lines, "", ";".join(credential.signed_headers), payload_hash])


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    key = f"AWS4{secret}".encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def verify(request: SignedRequest, credential: Credential, secret: str) -> None:
    """Check the signature with the key's ``secret`` (constant-time); AccessDenied if it does not match."""
    payload_hash = hashlib.sha256(request.body).hexdigest()
    claimed = _one(request, "x-amz-content-sha256")
    if claimed is not None and claimed != payload_hash:
        raise AccessDeniedException("X-Amz-Content-SHA256 is not the SHA-256 of the body: sign the payload")
    amz_date = _one(request, "x-amz-date") or ""
    canonical = canonical_request(request, credential, payload_hash)
    to_sign = "\n".join([ALGORITHM, amz_date, credential.scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = signing_key(secret, credential.date, credential.region, credential.service)
    expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, credential.signature):
        raise AccessDeniedException(
            "The request signature we calculated does not match the signature you provided: check the secret "
            "access key and the signing method"
        )
