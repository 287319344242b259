"""The SDK's exceptions, rebuilt from the daemon's answers.

EmberError                        anything the SDK raises on purpose
├── ConnectError                  the daemon cannot be reached (not started? wrong EMBER_URL / EMBER_SOCKET?)
├── ProtocolError                 the daemon's answer is not what the API promises (cut short, not JSON, too long)
├── ContextError                  a build context that cannot be sent (not a directory, bad .dockerignore)
└── ApiError(status, kind, message)   the daemon refused or failed a request; ``kind`` is its exact error name
    ├── InvalidRequest            400 malformed input
    │   ├── PayloadTooLarge       413 a body over its route's cap
    │   └── UnsupportedMediaType  415 a body of the wrong Content-Type
    ├── Unauthorized              401 no key, or an unknown or revoked one
    ├── Forbidden                 403 an admin-only request, or a foreign Host/Origin
    ├── NotFound                  404 no such VM, image, tenant, key, webhook... (or another tenant's)
    ├── Conflict                  409 the request does not fit the current state
    │   ├── InvalidState          e.g. exec on a suspended VM (kind InvalidStateTransition)
    │   ├── NameTaken             a name already in use
    │   └── IdempotencyConflict   a client_token reused with a different body
    ├── GuestError                422 the guest agent refused or failed a request
    ├── BuildFailed               422 an image build step failed
    ├── TooManyRequests           429
    │   ├── QuotaExceeded         a tenant quota (``quota``, ``limit``, ``current``)
    │   └── RateLimited           the key's request rate (``retry_after`` seconds)
    ├── ServerError               500 the daemon failed (the message quotes an id in its log)
    ├── Unavailable               503 the VM's agent cannot be reached or broke the protocol
    └── InsufficientStorage       507 host disk full, VMM uids used up

An error inside an NDJSON stream (a line ``{"error": KIND, "message": ...}``) raises the same
class its kind raises as a status: :func:`api_error` maps the kind first, then the status.
"""

from __future__ import annotations

from collections.abc import Mapping

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (2.5 ms of the CLI's start)
if TYPE_CHECKING:
    from typing import Any


class EmberError(Exception):
    """Root of every error the SDK raises on purpose; its message says what to do."""


class ConnectError(EmberError):
    """The daemon did not answer at the address the client was given."""


class ProtocolError(EmberError):
    """The daemon's answer broke the API's contract."""


class ContextError(EmberError):
    """A build context the SDK cannot send."""


class ApiError(EmberError):
    """The daemon answered with an error: ``status`` (HTTP), ``kind`` (its error name), the message."""

    status = 500

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


class InvalidRequest(ApiError):
    status = 400


class PayloadTooLarge(InvalidRequest):
    status = 413


class UnsupportedMediaType(InvalidRequest):
    status = 415


class Unauthorized(ApiError):
    status = 401


class Forbidden(ApiError):
    status = 403


class NotFound(ApiError):
    status = 404


class Conflict(ApiError):
    status = 409


class InvalidState(Conflict):
    pass


class NameTaken(Conflict):
    pass


class IdempotencyConflict(Conflict):
    pass


class GuestError(ApiError):
    status = 422


class BuildFailed(ApiError):
    status = 422


class TooManyRequests(ApiError):
    """429: ``retry_after`` is the seconds to wait (from ``Retry-After`` or the body), None if not said."""

    status = 429

    def __init__(self, status: int, kind: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(status, kind, message)
        self.retry_after = retry_after


class QuotaExceeded(TooManyRequests):
    def __init__(
        self, status: int, kind: str, message: str, *, retry_after: float | None = None, quota: str = "",
        limit: int | None = None, current: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__(status, kind, message, retry_after=retry_after)
        self.quota = quota
        self.limit = limit
        self.current = current


class RateLimited(TooManyRequests):
    pass


class ServerError(ApiError):
    status = 500


class Unavailable(ApiError):
    status = 503


class InsufficientStorage(ApiError):
    status = 507


# the daemon's error kinds (ember.errors class names) that have a class of their own here
KINDS: dict[str, type[ApiError]] = {
    "InvalidRequest": InvalidRequest,
    "PayloadTooLarge": PayloadTooLarge,
    "UnsupportedMediaType": UnsupportedMediaType,
    "Unauthorized": Unauthorized,
    "Forbidden": Forbidden,
    "InvalidStateTransition": InvalidState,
    "NameTaken": NameTaken,
    "IdempotencyConflict": IdempotencyConflict,
    "GuestError": GuestError,
    "BuildFailed": BuildFailed,
    "QuotaExceeded": QuotaExceeded,
    "RateLimited": RateLimited,
    "AgentUnavailable": Unavailable,
    "TokenRefused": Unavailable,
    "GuestProtocolError": Unavailable,
    "ResourceExhausted": InsufficientStorage,
    "InternalError": ServerError,
}
STATUSES: dict[int, type[ApiError]] = {
    400: InvalidRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict, 413: PayloadTooLarge,
    415: UnsupportedMediaType, 422: GuestError, 429: TooManyRequests, 503: Unavailable, 507: InsufficientStorage,
}  # fmt: skip


def _number(value: Any) -> float | None:
    try:
        return float(value) if value is not None and value != "" else None
    except (TypeError, ValueError):
        return None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def api_error(status: int | None, body: Mapping[str, Any], *, retry_after_header: str | None = None) -> ApiError:
    """The exception for an error answer (``status``; None inside a stream) with JSON ``body``
    ``{"error": KIND, "message": ...}``: the kind's class, else the status's, else ApiError
    (ServerError for 5xx)."""
    kind = str(body.get("error") or "Error")
    message = str(body.get("message") or body.get("detail") or kind)
    cls = KINDS.get(kind)
    if cls is None and kind.endswith("NotFound"):
        cls = NotFound
    if cls is None and status is not None:
        cls = STATUSES.get(status) or (ServerError if status >= 500 else ApiError)
    cls = cls or ApiError
    code = status if status is not None else cls.status
    if issubclass(cls, TooManyRequests):
        retry_after = _number(retry_after_header) if retry_after_header is not None else None
        retry_after = _number(body.get("retry_after")) if retry_after is None else retry_after
        if cls is QuotaExceeded:
            return QuotaExceeded(
                code, kind, message, retry_after=retry_after, quota=str(body.get("quota") or ""),
                limit=_int(body.get("limit")), current=_int(body.get("current")),
            )  # fmt: skip
        return cls(code, kind, message, retry_after=retry_after)
    return cls(code, kind, message)
