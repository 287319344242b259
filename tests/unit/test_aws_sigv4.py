"""SigV4 verification (ember.aws.sigv4) against botocore's own signer: what boto3 signs verifies; any change to
what was signed, another secret, a stale date, a signature that skips host or x-amz-date, a session token, or a
path with segments the canonical path collapses is refused."""

from __future__ import annotations

import time
from dataclasses import replace
from urllib.parse import urlsplit

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from starlette.requests import Request

from ember.api.auth import PEER_UID
from ember.aws.errors import AccessDeniedException, ValidationException
from ember.aws.router import peer
from ember.aws.sigv4 import SignedRequest, parse, routable_path, signed_at, verify

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
KEY = "AKIAEXAMPLE000000000"


def signed(
    method: str = "POST", url: str = "http://127.0.0.1:7070/2025-09-09/microvms", body: bytes = b'{"a": 1}',
    region: str = "eu-west-3", service: str = "lambda", secret: str = SECRET,
) -> SignedRequest:  # fmt: skip
    """A request as botocore signs it, as the server receives it."""
    request = AWSRequest(method=method, url=url, data=body, headers={"Content-Type": "application/json"})
    SigV4Auth(Credentials(KEY, secret), service, region).add_auth(request)
    parts = urlsplit(url)
    headers = [(k.lower(), v) for k, v in request.headers.items()]
    headers.append(("host", parts.netloc))
    return SignedRequest(method, parts.path or "/", parts.query, tuple(headers), body)


def check(request: SignedRequest, secret: str = SECRET) -> None:
    credential = parse(request)
    signed_at(request, credential, now=time.time(), skew_s=300)
    verify(request, credential, secret)


@pytest.mark.parametrize(
    "method,url,body",
    [
        ("POST", "http://127.0.0.1:7070/2025-09-09/microvms", b'{"imageIdentifier": "debian"}'),
        ("GET", "http://127.0.0.1:7070/2025-09-09/microvms?maxResults=2&nextToken=a%2Bb%3D%3D", b""),
        (
            "DELETE",
            "http://h:1/2017-03-31/tags/arn%3Aaws%3Alambda%3Aus-east-1%3A123456789012%3Amicrovm-image%3Ax"
            "?tagKeys=b%20c&tagKeys=a",
            b"",
        ),
        ("GET", "http://h:1/2025-09-09/microvms/vm-%C3%A9%2F..%2Fx", b""),
    ],
)
def test_what_botocore_signs_verifies(method: str, url: str, body: bytes) -> None:
    request = signed(method, url, body)
    check(request)
    assert parse(request).region == "eu-west-3"


def _header(request: SignedRequest, name: str, value: str) -> SignedRequest:
    return replace(request, headers=tuple((k, value if k == name else v) for k, v in request.headers))


def _flip_last(value: str) -> str:
    """The value with its last hex digit changed (always changed: a fixed digit equals it one time in 16)."""
    return value[:-1] + ("1" if value[-1] == "0" else "0")


@pytest.mark.parametrize(
    "tamper",
    [
        lambda r: replace(r, body=r.body + b" "),
        lambda r: replace(r, raw_path=r.raw_path + "x"),
        lambda r: replace(r, method="PUT"),
        lambda r: replace(r, query_string="maxResults=3"),
        lambda r: _header(r, "host", "127.0.0.1:7071"),
        lambda r: _header(r, "content-type", "text/plain"),
        lambda r: _header(r, "authorization", _flip_last(dict(r.headers)["authorization"])),
        lambda r: replace(r, headers=tuple(h for h in r.headers if h[0] != "content-type")),
    ],
)
def test_any_change_to_what_was_signed_is_refused(tamper: object) -> None:
    request = signed()
    with pytest.raises(AccessDeniedException):
        check(tamper(request))  # type: ignore[operator]


def test_another_secret_is_refused() -> None:
    with pytest.raises(AccessDeniedException, match="signature"):
        check(signed(secret=SECRET + "x"))


def test_stale_or_future_date_is_refused() -> None:
    request = signed()
    credential = parse(request)
    for offset in (-301, 301):
        with pytest.raises(AccessDeniedException, match="expired"):
            signed_at(request, credential, now=time.time() + offset, skew_s=300)


def test_other_service_and_unsigned_host_are_refused() -> None:
    with pytest.raises(AccessDeniedException, match="service"):
        parse(signed(service="s3"))
    request = signed()
    auth = dict(request.headers)["authorization"]
    assert "host;" in auth
    with pytest.raises(AccessDeniedException, match="host and x-amz-date"):
        parse(_header(request, "authorization", auth.replace("host;", "")))


@pytest.mark.parametrize(
    "value",
    ["Bearer ember_x", "AWS4-HMAC-SHA256 Credential=x", "AWS4-HMAC-SHA256 " + "a" * 5000, ""],
)
def test_malformed_authorization_is_refused(value: str) -> None:
    with pytest.raises(AccessDeniedException):
        parse(_header(signed(), "authorization", value))


def test_a_payload_hash_header_must_be_the_body_hash() -> None:
    request = signed()
    lying = replace(request, headers=(*request.headers, ("x-amz-content-sha256", "UNSIGNED-PAYLOAD")))
    with pytest.raises(AccessDeniedException, match="SHA-256"):
        verify(lying, parse(lying), SECRET)


def test_temporary_credentials_are_refused() -> None:
    """A session token (STS) signed along: Ember has none to check it against."""
    request = AWSRequest(method="GET", url="http://h:1/2025-09-09/microvms", data=b"")
    SigV4Auth(Credentials(KEY, SECRET, token="FwoGZXIvYXdzE"), "lambda", "us-east-1").add_auth(request)
    headers = (*((k.lower(), v) for k, v in request.headers.items()), ("host", "h:1"))
    assert "x-amz-security-token" in dict(request.headers.items()).get("Authorization", "")
    with pytest.raises(AccessDeniedException, match="no temporary credentials"):
        check(SignedRequest("GET", "/2025-09-09/microvms", "", headers, b""))


@pytest.mark.parametrize("path", ["/MyApp/versions/..", "/MyApp/versions/.", "/MyApp//", "/MyApp/", "/./MyApp",
                                  "/MyApp/versions/%2E%2E", "/MyApp/versions/%2e"])  # fmt: skip
def test_dot_and_empty_segments_are_refused_before_they_verify(path: str) -> None:
    """The canonical path collapses them and routing would not: DELETE .../MyApp/versions/.. would verify with
    the signature of DELETE .../MyApp (another operation)."""
    request = signed("DELETE", "http://h:1/2025-09-09/microvm-images/MyApp", b"")
    tampered = replace(request, raw_path="/2025-09-09/microvm-images" + path)
    with pytest.raises(ValidationException, match="'\\.\\.' segment"):
        check(tampered)
    with pytest.raises(ValidationException):
        routable_path(tampered.raw_path)
    assert routable_path("/2025-09-09/microvms/vm-1%2F..%2Fx") == "/2025-09-09/microvms/vm-1%2F..%2Fx"


def test_refusals_are_counted_per_address_and_ipv6_slash_64() -> None:
    def of(client: tuple[str, int] | None, uid: int | None = None) -> str:
        return peer(Request({"type": "http", "client": client, PEER_UID: uid, "headers": []}))

    assert of(("2001:db8::1", 1)) == of(("2001:db8::ffff:2", 2)) != of(("2001:db8:0:1::1", 1))
    assert of(("::ffff:192.0.2.1", 1)) == of(("192.0.2.1", 2)) != of(("192.0.2.2", 1))
    assert of(None, 1000) == "uid:1000" != of(None, 0)
