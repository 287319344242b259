"""The model's exceptions, as botocore parses them: ``x-amzn-ErrorType`` names the shape, the JSON body
carries ``message`` (and the shape's other members); a throttling answer says when to retry in ``Retry-After``
(seconds) and ``x-amz-retry-after`` (milliseconds: botocore's standard retry mode waits that long). Ember's own
errors map onto them in :func:`from_ember`, their messages in the AWS API's words (:func:`aws_words`)."""

from __future__ import annotations

import json
import math
import re
from typing import Any, ClassVar

from ember.errors import (
    Conflict,
    EmberError,
    Forbidden,
    IdempotencyConflict,
    InvalidRequest,
    NotFound,
    QuotaExceeded,
    ResourceExhausted,
    StaleSnapshot,
    TooManyRequests,
    Unauthorized,
    log_with_id,
)


class AwsError(Exception):
    """An error answer of the AWS API: ``code`` is the model's exception shape, ``status`` its HTTP status."""

    code: ClassVar[str] = "InternalServerException"
    status: ClassVar[int] = 500

    def __init__(self, message: str, **members: Any) -> None:
        super().__init__(message)
        self.message = message
        self.members = members  # the shape's other members (resourceId, resourceType, quotaCode, ...)
        self.retry_after: float | None = None  # seconds; sent as Retry-After where the shape has it


class ValidationException(AwsError):
    code = "ValidationException"
    status = 400


class AccessDeniedException(AwsError):
    code = "AccessDeniedException"
    status = 403


class ResourceNotFoundException(AwsError):
    code = "ResourceNotFoundException"
    status = 404


class ConflictException(AwsError):
    code = "ConflictException"
    status = 409


class ServiceQuotaExceededException(AwsError):
    code = "ServiceQuotaExceededException"
    status = 402  # the model's status for it (not 429)


class ThrottlingException(AwsError):
    code = "ThrottlingException"
    status = 429


class InternalServerException(AwsError):
    code = "InternalServerException"
    status = 500


class InsufficientCapacityException(AwsError):
    code = "InsufficientCapacityException"
    status = 500


MAX_RETRY_AFTER_S = 86400.0  # the longest wait a throttling answer names

# Ember's request fields -> the AWS API's members, and Ember's CLI commands -> the operation doing the same
FIELDS = {
    "client_token": "clientToken", "idle_timeout_s": "idlePolicy.maxIdleDurationSeconds",
    "suspended_ttl_s": "idlePolicy.suspendedDurationSeconds", "auto_resume": "idlePolicy.autoResumeEnabled",
    "max_duration_s": "maximumDurationInSeconds", "run_payload": "runHookPayload",
    "expires_in_minutes": "expirationInMinutes", "allowed_ports": "allowedPorts",
}  # fmt: skip
COMMANDS = {
    "rm": "TerminateMicrovm", "resume": "ResumeMicrovm", "inspect": "GetMicrovm", "run": "RunMicrovm",
    "ps": "ListMicrovms", "token create": "CreateMicrovmAuthToken",
    "image ls": "ListMicrovmImages", "image rm": "DeleteMicrovmImageVersion", "image build": "CreateMicrovmImage",
    "image logs": "GetMicrovmImageBuild",
}  # fmt: skip
_FIELD = re.compile(r"\b(" + "|".join(FIELDS) + r")\b")
_COMMAND = re.compile(r"'ember ([^']*)'")


def _operation(found: re.Match[str]) -> str:
    words = found[1].split()
    for count in (2, 1):
        name = COMMANDS.get(" ".join(words[:count]))
        if name is not None:
            return name
    return "the operator's tools"


def aws_words(message: str) -> str:
    """An Ember error's ``message`` for an AWS API caller: the members it names are the API's, and each Ember
    CLI command it suggests is the operation that does the same."""
    return _COMMAND.sub(_operation, _FIELD.sub(lambda found: FIELDS[found[1]], message))


def from_ember(exc: BaseException) -> AwsError:
    """The AWS error an exception answers as. Ember's own errors keep their message (written for the
    client), in the API's words; anything else is an InternalServerException that says only the id its details
    were logged under."""
    if isinstance(exc, AwsError):
        return exc
    if isinstance(exc, EmberError):
        message = aws_words(str(exc))
        if isinstance(exc, NotFound):
            return ResourceNotFoundException(message)
        if isinstance(exc, IdempotencyConflict):
            return ConflictException(
                "clientToken was used for a different request: send the same request to get its result, or use a "
                "new clientToken for a new request"
            )
        if isinstance(exc, Conflict | StaleSnapshot):
            return ConflictException(message)
        if isinstance(exc, QuotaExceeded):
            return ServiceQuotaExceededException(
                f"quota {exc.quota} would be exceeded: the limit is {exc.limit} and {exc.current} are in use; free "
                "some (terminate or suspend microVMs, delete images) or ask the operator to raise it",
                serviceCode="lambda", quotaCode=exc.quota,
            )  # fmt: skip
        if isinstance(exc, TooManyRequests):
            throttled = ThrottlingException(message, serviceCode="lambda")
            throttled.retry_after = exc.retry_after
            return throttled
        if isinstance(exc, InvalidRequest):
            return ValidationException(message)
        if isinstance(exc, Unauthorized | Forbidden):
            return AccessDeniedException(message)
        if isinstance(exc, ResourceExhausted):
            return InsufficientCapacityException(message)
        return InternalServerException(message)
    error_id = log_with_id("internal error in the AWS API", exc=exc)
    return InternalServerException(f"internal error; the daemon log has the details under id {error_id}")


def render(exc: AwsError) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """The HTTP answer of ``exc`` as botocore's rest-json parser reads it: status, headers, body."""
    body = json.dumps({"message": exc.message, **exc.members}).encode()
    headers = [
        (b"x-amzn-errortype", exc.code.encode()),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if exc.retry_after is not None:
        wait = min(exc.retry_after, MAX_RETRY_AFTER_S)  # a bucket that never refills says inf
        headers.append((b"retry-after", str(max(1, math.ceil(wait))).encode()))
        headers.append((b"x-amz-retry-after", str(max(1, math.ceil(wait * 1000))).encode()))
    return exc.status, headers, body
