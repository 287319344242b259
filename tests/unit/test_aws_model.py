"""The AWS API's input validation and output and error shapes (ember.aws.model, ember.aws.errors): inputs
refused with a ValidationException that names the member; errors parsed by botocore's own rest-json parser
into the model's exception, with its message and members."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse, HeadersDict
from botocore.parsers import RestJSONParser
from botocore.retries.standard import ExponentialBackoff, RetryContext

from ember.aws.errors import (
    AccessDeniedException,
    ConflictException,
    InternalServerException,
    ResourceNotFoundException,
    ServiceQuotaExceededException,
    ThrottlingException,
    ValidationException,
    from_ember,
    render,
)
from ember.aws.model import parse_input, render_output, service
from ember.errors import (
    Conflict,
    Forbidden,
    IdempotencyConflict,
    InvalidRequest,
    InvalidStateTransition,
    QuotaExceeded,
    RateLimited,
    ResourceExhausted,
    Unauthorized,
    VmNotFound,
)


def run_input(body: dict[str, Any]) -> dict[str, Any]:
    return parse_input(service().operation_model("RunMicrovm"), {}, "", json.dumps(body).encode())


def token_input(body: dict[str, Any]) -> dict[str, Any]:
    operation = service().operation_model("CreateMicrovmAuthToken")
    return parse_input(operation, {"microvmIdentifier": "vm-1"}, "", json.dumps(body).encode())


def test_a_valid_run_is_parsed() -> None:
    params = run_input({"imageIdentifier": "debian", "clientToken": "t", "ingressNetworkConnectors": ["ALL_INGRESS"],
                        "idlePolicy": {"maxIdleDurationSeconds": 60, "suspendedDurationSeconds": 0,
                                       "autoResumeEnabled": True},
                        "logging": {"disabled": {}}})  # fmt: skip
    assert params["idlePolicy"]["autoResumeEnabled"] is True and params["logging"] == {"disabled": {}}


@pytest.mark.parametrize(
    "body,complaint",
    [
        ({}, "missing the required member imageIdentifier"),
        ({"imageIdentifier": "debian", "imageIdentifer": "x"}, "imageIdentifer: is not a member"),
        ({"imageIdentifier": ""}, "imageIdentifier: must be at least 1"),
        ({"imageIdentifier": 7}, "imageIdentifier: must be a string"),
        ({"imageIdentifier": "debian", "maximumDurationInSeconds": "60"}, "must be an integer"),
        ({"imageIdentifier": "debian", "maximumDurationInSeconds": 0}, "must be at least 1"),
        ({"imageIdentifier": "debian", "maximumDurationInSeconds": True}, "must be an integer"),
        (
            {
                "imageIdentifier": "debian",
                "idlePolicy": {"maxIdleDurationSeconds": 59, "suspendedDurationSeconds": 0, "autoResumeEnabled": True},
            },
            "must be at least 60",
        ),
        ({"imageIdentifier": "debian", "idlePolicy": {"maxIdleDurationSeconds": 60}}, "missing the required"),
        ({"imageIdentifier": "debian", "logging": {}}, "set exactly one of"),
        ({"imageIdentifier": "debian", "logging": {"disabled": {}, "cloudWatch": {}}}, "set exactly one of"),
        ({"imageIdentifier": "debian", "ingressNetworkConnectors": ["A"] * 11}, "at most 10 items"),
        ({"imageIdentifier": "debian", "kmsKeyIdentifier": "alias/a b"}, "must match the pattern"),
        ({"imageIdentifier": "debian", "executionRoleArn": "arn:aws:iam::12:role/x"}, "must match the pattern"),
        ({"imageIdentifier": "debian", "clientToken": "x" * 129}, "at most 128"),
        ({"imageIdentifier": "debian", "clientToken": None}, "must not be null"),
    ],
)
def test_bad_run_input_is_refused_naming_the_member(body: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ValidationException, match=complaint.replace("(", r"\(")):
        run_input(body)


def test_relaxed_limits_are_left_to_the_operation() -> None:
    # AWS's 8 hours and 4,096 characters: Ember's settings decide (EMBER_AWS_MAX_DURATION_S,
    # EMBER_RUN_PAYLOAD_MAX_BYTES)
    params = run_input({"imageIdentifier": "debian", "maximumDurationInSeconds": 86400, "runHookPayload": "x" * 5000})
    assert params["maximumDurationInSeconds"] == 86400


def test_port_unions_and_token_bounds() -> None:
    assert token_input({"expirationInMinutes": 5, "allowedPorts": [{"allPorts": {}}]})["allowedPorts"] == [
        {"allPorts": {}}
    ]
    with pytest.raises(ValidationException, match="at most 65535"):
        token_input({"expirationInMinutes": 5, "allowedPorts": [{"port": 70000}]})
    with pytest.raises(ValidationException, match="exactly one"):
        token_input({"expirationInMinutes": 5, "allowedPorts": [{"port": 80, "allPorts": {}}]})
    with pytest.raises(ValidationException, match="expirationInMinutes: must be at least 1"):
        token_input({"expirationInMinutes": 0, "allowedPorts": [{"port": 80}]})


def test_body_and_query_are_bounded() -> None:
    run = service().operation_model("RunMicrovm")
    with pytest.raises(ValidationException, match="not a JSON object"):
        parse_input(run, {}, "", b"[" * 100_000)
    with pytest.raises(ValidationException, match="must be an object"):
        parse_input(run, {}, "", b"[1]")
    listing = service().operation_model("ListMicrovms")
    assert parse_input(listing, {}, "maxResults=2&nextToken=a%2Bb", b"") == {"maxResults": 2, "nextToken": "a+b"}
    for query, complaint in [("maxResults=51", "at most 50"), ("maxResults=x", "an integer"),
                             ("maxResults=%C2%B2", "an integer"), ("maxResults=--5", "an integer"),
                             ("foo=1", "not one ListMicrovms takes"),
                             ("maxResults=1&maxResults=2", "give it once"),
                             ("&".join(["a=1"] * 65), "more than 64")]:  # fmt: skip
        with pytest.raises(ValidationException, match=complaint):
            parse_input(listing, {}, query, b"")
    untag = service().operation_model("UntagResource")
    arn = "arn:aws:lambda:us-east-1:123456789012:microvm-image:app"
    params = parse_input(untag, {"Resource": arn}, "tagKeys=a&tagKeys=b%20c", b"")
    assert params == {"Resource": arn, "TagKeys": ["a", "b c"]}


def test_output_timestamps_are_epoch_seconds_and_none_is_dropped() -> None:
    get = service().operation_model("GetMicrovm")
    at = datetime(2025, 9, 9, 12, 0, 0, 500000, tzinfo=UTC)
    out = json.loads(render_output(get, {"microvmId": "vm-1", "startedAt": at, "terminatedAt": None}))
    assert out == {"microvmId": "vm-1", "startedAt": at.timestamp()}
    assert render_output(service().operation_model("TagResource"), {}) == b""


def botocore_error(exc: BaseException, operation: str = "RunMicrovm") -> dict[str, Any]:
    """What botocore's rest-json parser makes of the answer: as boto3's client.exceptions sees it."""
    status, headers, body = render(from_ember(exc))
    model = service().operation_model(operation)
    fields = HeadersDict({k.decode(): v.decode() for k, v in headers})  # case-insensitive, as botocore's
    response = {"status_code": status, "headers": fields, "body": body}
    shapes = {e.name: e for e in model.error_shapes}
    parsed = RestJSONParser().parse(response, model.output_shape)
    code = parsed["Error"]["Code"]
    modeled = RestJSONParser().parse(response, shapes[code]) if code in shapes else {}
    return {"status": status, **parsed["Error"], **{k: v for k, v in modeled.items() if k != "ResponseMetadata"}}


@pytest.mark.parametrize(
    "exc,code,status",
    [
        (VmNotFound("vm-1"), ResourceNotFoundException.code, 404),
        (IdempotencyConflict("t"), ConflictException.code, 409),
        (QuotaExceeded("max_running_vms", 1, 1), ServiceQuotaExceededException.code, 402),
        (RateLimited(2.5), ThrottlingException.code, 429),
        (InvalidRequest("bad"), ValidationException.code, 400),
        (Unauthorized("who"), AccessDeniedException.code, 403),
        (Forbidden("no"), AccessDeniedException.code, 403),
        (ResourceExhausted("disk full"), "InsufficientCapacityException", 500),
        (RuntimeError("/var/lib/ember/secret path"), InternalServerException.code, 500),
    ],
)
def test_errors_parse_as_the_models_exceptions(exc: BaseException, code: str, status: int) -> None:
    parsed = botocore_error(exc)
    assert (parsed["Code"], parsed["status"]) == (code, status)
    assert parsed["Message"] and "/var/lib" not in parsed["Message"]


def test_error_members_and_retry_after_reach_botocore() -> None:
    quota = botocore_error(QuotaExceeded("max_running_vms", 1, 1))
    assert quota["quotaCode"] == "max_running_vms" and quota["serviceCode"] == "lambda"
    throttled = botocore_error(RateLimited(2.5))
    assert throttled["retryAfterSeconds"] == 3
    internal = botocore_error(RuntimeError("boom"))
    assert "under id" in internal["Message"] and "boom" not in internal["Message"]


@pytest.mark.parametrize(
    "exc,words",
    [
        (VmNotFound("vm-1"), "ListMicrovms"),
        (IdempotencyConflict("t"), "clientToken"),
        (QuotaExceeded("max_running_vms", 1, 1), "terminate or suspend microVMs"),
        (InvalidRequest("idle_timeout_s=5: the shortest idle timeout is 60 seconds"), "maxIdleDurationSeconds=5"),
        (InvalidRequest("max_duration_s=9: the longest"), "maximumDurationInSeconds=9"),
        (
            InvalidRequest("suspended_ttl_s=0 terminates the VM when it is idle: it needs idle_timeout_s"),
            "idlePolicy.suspendedDurationSeconds=0",
        ),
        (
            InvalidStateTransition(
                "cannot suspend VM vm-1 while it is FAILED: it has failed; inspect it with "
                "'ember inspect vm-1' and remove it with 'ember rm vm-1'"
            ),
            "TerminateMicrovm",
        ),
        (InvalidStateTransition("it was removed; launch a new one with 'ember run'"), "RunMicrovm"),
        (Conflict("ask for it with 'ember key create --tenant x'"), "the operator's tools"),
    ],
)
def test_errors_from_ember_name_the_apis_members_and_operations(exc: BaseException, words: str) -> None:
    message = botocore_error(exc)["Message"]
    assert words in message and "'ember" not in message, message
    assert not any(name in message for name in ("idle_timeout_s", "max_duration_s", "suspended_ttl_s", "client_token"))


def test_throttling_says_when_to_retry_as_botocore_reads_it() -> None:
    """botocore's standard retry mode waits what x-amz-retry-after says (milliseconds), never less."""
    _, headers, _ = render(from_ember(RateLimited(1.5)))
    fields = HeadersDict({k.decode(): v.decode() for k, v in headers})
    assert (fields["retry-after"], fields["x-amz-retry-after"]) == ("2", "1500")
    response = AWSResponse("http://x", 429, fields, None)
    context = RetryContext(attempt_number=1, http_response=response)
    backoff = ExponentialBackoff(random=lambda: 0.0)
    assert backoff.delay_amount(context) == 1.5
    endless = ThrottlingException("never")
    endless.retry_after = float("inf")  # a bucket that never refills
    assert dict(render(endless)[1])[b"retry-after"] == b"86400"


def test_uri_labels_are_decoded_from_the_raw_path() -> None:
    get = service().operation_model("GetMicrovm")
    assert parse_input(get, {"microvmIdentifier": "vm-1%2F..%2Fx"}, "", b"") == {"microvmIdentifier": "vm-1/../x"}
    with pytest.raises(ValidationException, match="microvmIdentifier: is not UTF-8"):
        parse_input(get, {"microvmIdentifier": "vm-%FF"}, "", b"")
