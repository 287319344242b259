"""The model's exceptions, as botocore parses them: ``x-amzn-ErrorType`` names the shape, the JSON body
carries ``message`` (and the shape's other members). Ember's own errors map onto them in :func:`from_ember`."""

from __future__ import annotations

from typing import Any, ClassVar


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
