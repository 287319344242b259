"""Ember's exceptions: one root, each message says what to do next.

EmberError
├── HostSetupError          the host lacks something Ember needs (install it)
├── NotFound                no such resource, or another tenant's (the same answer: HTTP 404)
│   ├── VmNotFound
│   ├── ImageNotFound
│   ├── TenantNotFound
│   ├── KeyNotFound
│   └── WebhookNotFound
├── Conflict                the request does not fit the current state (HTTP 409)
│   ├── InvalidStateTransition   e.g. exec on a suspended VM
│   ├── NameTaken               an image or tenant name already in use
│   └── IdempotencyConflict     a client_token reused with a different request
├── Unauthorized            no, unknown or revoked credentials (HTTP 401)
├── Forbidden               not allowed: an admin-only call, a read-only built-in image, a foreign Host (HTTP 403)
├── TooManyRequests         HTTP 429
│   ├── QuotaExceeded       a tenant quota would be passed (names the quota, its limit and current use)
│   └── RateLimited         the API key's request rate (with Retry-After)
├── InvalidRequest          malformed input (HTTP 400)
│   ├── PayloadTooLarge     a request body over its route's cap (HTTP 413)
│   └── UnsupportedMediaType  a body of the wrong Content-Type (HTTP 415)
├── GuestError              the guest agent refused or failed a request (HTTP 422)
│   ├── HookFailed          the app's run hook failed: the VM was removed (HTTP 422)
│   ├── AgentUnavailable    the agent cannot be reached (VM crashed or hung; HTTP 503)
│   └── GuestProtocolError  the agent's reply broke the wire protocol (hostile or broken guest; HTTP 503)
├── VmmError                QEMU failed (start, QMP, migration)
├── SnapshotError           a snapshot is missing, corrupt or incompatible
├── BuildFailed             an image build step failed (HTTP 422; the image is CREATE_FAILED)
└── ResourceExhausted       host disk full, VMM uids used up (HTTP 507)
"""

from __future__ import annotations

import logging
import secrets


def log_with_id(what: str, *, detail: str = "", exc: BaseException | None = None) -> str:
    """Log ``what`` with ``detail`` (host paths, tool output, exception text) and ``exc``'s
    traceback under a fresh error id, and return the id: the client is told the id, never these."""
    error_id = secrets.token_hex(4)
    logging.getLogger("ember").error("error id %s: %s%s", error_id, what, f"; {detail}" if detail else "", exc_info=exc)
    return error_id


def logged(message: str, detail: str) -> str:
    """``message`` for the client, with the id under which ``detail`` went to the daemon log."""
    return f"{message} (the daemon log has the details under id {log_with_id(message, detail=detail)})"


class EmberError(Exception):
    """Root of every error Ember raises on purpose; its message goes to the client."""

    http_status = 500


class HostSetupError(EmberError):
    http_status = 500


class NotFound(EmberError):
    http_status = 404


class VmNotFound(NotFound):
    def __init__(self, vm_id: str) -> None:
        super().__init__(f"no VM with id '{vm_id}': list VMs with 'ember ps'")
        self.vm_id = vm_id


class ImageNotFound(NotFound):
    def __init__(self, name: str) -> None:
        super().__init__(f"no image named '{name}': list images with 'ember image ls'")
        self.name = name


class TenantNotFound(NotFound):
    def __init__(self, name: str) -> None:
        super().__init__(f"no tenant named '{name}': list tenants with 'ember tenant ls'")


class KeyNotFound(NotFound):
    def __init__(self, key_id: str) -> None:
        super().__init__(f"no API key with id '{key_id}': list keys with 'ember key ls'")


class ProcessNotFound(NotFound):
    def __init__(self, pid: int) -> None:
        super().__init__(f"no background process {pid} is running in this VM: list them with 'ember ps-guest'")


class WebhookNotFound(NotFound):
    def __init__(self, webhook_id: str) -> None:
        super().__init__(f"no webhook with id '{webhook_id}': list webhooks with 'ember webhook ls'")


class Conflict(EmberError):
    http_status = 409


class InvalidStateTransition(Conflict):
    pass


class NameTaken(Conflict):
    pass


class IdempotencyConflict(Conflict):
    def __init__(self, token: str) -> None:
        super().__init__(
            f"client_token {token!r} was used for a different request: send the same request to get its result, "
            "or use a new token for a new request"
        )


class TooManyRequests(EmberError):
    http_status = 429
    retry_after: float | None = None

    def details(self) -> dict[str, object]:
        return {}


class QuotaExceeded(TooManyRequests):
    def __init__(self, quota: str, limit: int, current: int) -> None:
        flag = "--" + quota.replace("_", "-")
        super().__init__(
            f"quota {quota} would be exceeded: the limit is {limit} and {current} are in use; free some "
            f"(remove or suspend VMs, remove images) or ask the operator to raise it ('ember tenant set {flag}')"
        )
        self.quota, self.limit, self.current = quota, limit, current

    def details(self) -> dict[str, object]:
        return {"quota": self.quota, "limit": self.limit, "current": self.current}


class RateLimited(TooManyRequests):
    def __init__(self, retry_after: float) -> None:
        super().__init__(f"too many requests for this API key: retry in {retry_after:.1f} s")
        self.retry_after = retry_after

    def details(self) -> dict[str, object]:
        return {"retry_after": self.retry_after}


class Unauthorized(EmberError):
    http_status = 401


class Forbidden(EmberError):
    http_status = 403


class InvalidRequest(EmberError):
    http_status = 400


class PayloadTooLarge(InvalidRequest):
    http_status = 413


class UnsupportedMediaType(InvalidRequest):
    http_status = 415


class GuestError(EmberError):
    http_status = 422

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


class HookFailed(GuestError):
    """The app's run hook failed or timed out (ember.hooks); the VM was terminated."""


class AgentUnavailable(GuestError):
    http_status = 503

    def __init__(self, message: str) -> None:
        super().__init__(message)


class TokenRefused(AgentUnavailable):
    """The guest's agent answered and refused the token (as opposed to not answering in time)."""


class RelayUnavailable(AgentUnavailable):
    """A TCP relay into the guest (ingress) cannot be opened now: the VM's relays are all in use."""


class VmNotServing(EmberError):
    """The VM cannot take ingress traffic now (it is not RUNNING)."""

    http_status = 503


class GatewayTimeout(EmberError):
    """The app in the guest did not accept or answer in time (ingress)."""

    http_status = 504


class GuestProtocolError(GuestError):
    """The guest sent bytes that do not follow the wire protocol (a hostile or broken agent)."""

    http_status = 503

    def __init__(self, detail: str) -> None:
        super().__init__(f"the guest agent sent a malformed reply ({detail}); the VM's agent is broken or hostile")


class VmmError(EmberError):
    http_status = 500


class SnapshotError(EmberError):
    http_status = 500


class StaleSnapshot(EmberError):
    """A snapshot taken by a QEMU release that cannot restore on this host's (microvm has no
    versioned machine types: QEMU 7.2's state does not load into QEMU 10)."""

    http_status = 409


class ResourceExhausted(EmberError):
    http_status = 507


class BuildFailed(EmberError):
    """A build step failed; ``step`` names it, the message carries its output's tail."""

    http_status = 422

    def __init__(self, message: str, step: str = "") -> None:
        self.step = step
        super().__init__(f"{step}: {message}" if step else message)
