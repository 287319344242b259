"""The model's exceptions, as botocore parses them: ``x-amzn-ErrorType`` names the shape, the JSON body
carries ``message`` (and the shape's other members). Ember's own errors map onto them in :func:`from_ember`."""

from __future__ import annotations

import json
import math
from typing import Any, ClassVar

from ember.errors import (
    Conflict,
    EmberError,
    Forbidden,
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


def from_ember(exc: BaseException) -> AwsError:
    """The AWS error an exception answers as. Ember's own errors keep their message (written for the
    client); anything else is an InternalServerException that says only the id its details were logged under."""
    if isinstance(exc, AwsError):
        return exc
    if isinstance(exc, EmberError):
        message = str(exc)
        if isinstance(exc, NotFound):
            return ResourceNotFoundException(message)
        if isinstance(exc, Conflict | StaleSnapshot):
            return ConflictException(message)
        if isinstance(exc, QuotaExceeded):
            return ServiceQuotaExceededException(message, serviceCode="lambda", quotaCode=exc.quota)
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
        headers.append((b"retry-after", str(max(1, math.ceil(exc.retry_after))).encode()))
    return exc.status, headers, body
