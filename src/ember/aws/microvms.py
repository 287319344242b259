"""The microVM operations: RunMicrovm, GetMicrovm, ListMicrovms, Suspend/Resume/TerminateMicrovm,
CreateMicrovmAuthToken and CreateMicrovmShellAuthToken, on the same functions as ``/v1/vms`` (ember.api.vms:
quotas, idempotency, events, idle lifecycle; ember.api.ingress: tokens).

Mapping:
- ``imageIdentifier``/``imageVersion``: :func:`ember.aws.images.resolve_runnable`; shown back as named
  (:mod:`ember.aws.imageref`).
- ``idlePolicy``: ``maxIdleDurationSeconds`` -> idle timeout, ``suspendedDurationSeconds`` -> suspended TTL (0:
  terminate when idle), ``autoResumeEnabled`` -> auto-resume. ``maximumDurationInSeconds`` (default and limit
  EMBER_AWS_MAX_DURATION_S) counts suspended time, as AWS's does.
- connectors: ``INTERNET_EGRESS`` -> egress ``internet`` (none: no network); ``ALL_INGRESS`` -> the ingress
  endpoint takes auth tokens; ``SHELL_INGRESS`` -> shell tokens. Names or managed ARNs
  (:func:`ember.aws.arns.connector_name`); any other connector is refused.
- ``executionRoleArn``, ``kmsKeyIdentifier``, ``logging``: accepted, recorded and shown back, not used (no IAM,
  KMS or CloudWatch here: the app's output stays in Ember's log API).
- States: Ember's RESUMING shows as PENDING, FAILED as TERMINATED (``stateReason`` says FAILED: terminate it to
  free what it holds).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from ember.api import vms as v1
from ember.api.ingress import endpoint, issue_token
from ember.api.limits import Limits
from ember.api.vms import RunBody, ago, owned_by, suspend_asks
from ember.aws.arns import connector_name
from ember.aws.errors import ResourceNotFoundException, ValidationException, aws_words
from ember.aws.imageref import named, shown
from ember.aws.images import image_name, resolve_runnable
from ember.aws.managed import managed_name
from ember.aws.operations import Call, operation
from ember.errors import VmNotFound
from ember.ingress.tokens import MAX_MINUTES, NO_PORTS, Ports, TokenKind
from ember.metrics import Operation
from ember.models import VmRecord, VmState, parse_time
from ember.tenancy import names
from ember.tenancy.idempotency import MAX_TOKEN, Idempotency, Settle
from ember.tenancy.keys import token_hash

if TYPE_CHECKING:
    from ember.daemon import Daemon

INGRESS = frozenset({"ALL_INGRESS", "SHELL_INGRESS"})
EGRESS = frozenset({"INTERNET_EGRESS"})
_MICROVM_ARN = re.compile(r"^arn:aws:lambda:[a-z0-9-]*:([0-9]{12}):microvm:(vm-[0-9a-f]{1,64})$")
STATES = {
    VmState.PENDING: "PENDING", VmState.RUNNING: "RUNNING", VmState.SUSPENDING: "SUSPENDING",
    VmState.SUSPENDED: "SUSPENDED", VmState.RESUMING: "PENDING", VmState.TERMINATING: "TERMINATING",
    VmState.TERMINATED: "TERMINATED", VmState.FAILED: "TERMINATED",
}  # fmt: skip
NO_TTL = 2**31 - 1  # suspendedDurationSeconds shown for a VM (run through /v1) kept suspended without limit
PAGE = 50  # ListMicrovms' maxResults by default (the model's maximum)
TOKEN_HEADER = "X-aws-proxy-auth"  # the key of TokenParts: the header (shell: the subprotocol suffix) to send it in


def _connectors(where: str, given: list[str], allowed: frozenset[str]) -> list[str]:
    out: list[str] = []
    for item in given:
        name = connector_name(item)
        if name not in allowed:
            raise ValidationException(
                f"{where}: {item[:200]!r} is no connector of this Ember; it has {', '.join(sorted(allowed))} "
                "(VPC connectors are not supported)"
            )
        if name not in out:
            out.append(name)
    return out


def _client_token(token: str | None) -> str | None:
    """AWS's clientToken (up to 128 characters) as Ember's (up to 64): a longer one by its hash."""
    if token is None or len(token) <= MAX_TOKEN:
        return token
    return "sha256-" + token_hash(token)[: MAX_TOKEN - 7]


def _vm(daemon: Daemon, call: Call) -> VmRecord:
    """The caller's VM ``microvmIdentifier`` (an id or a microVM ARN of the caller's account); another tenant's
    answers exactly like a missing one."""
    identifier = str(call.params["microvmIdentifier"])
    found = _MICROVM_ARN.match(identifier)
    if found is not None and found[1] == call.account:
        identifier = found[2]
    try:
        return owned_by(daemon, identifier, call.principal)
    except VmNotFound:
        raise ResourceNotFoundException(
            f"no microVM '{identifier[:300]}': list them with ListMicrovms", resourceType="Microvm",
            resourceId=identifier[:300],
        ) from None  # fmt: skip


def _at(stamp: str) -> datetime | None:
    return parse_time(stamp) if stamp else None


def view(daemon: Daemon, vm: VmRecord, call: Call) -> dict[str, Any]:
    """GetMicrovm's (and RunMicrovm's) output of ``vm``."""
    aws = vm.aws
    arn, version = shown(vm.image, aws, region=call.region, account=call.account)
    idle = vm.idle
    policy = None
    if idle.idle_timeout_s is not None:
        kept = idle.suspended_ttl_s if idle.suspended_ttl_s is not None else NO_TTL
        policy = {"maxIdleDurationSeconds": idle.idle_timeout_s, "autoResumeEnabled": idle.auto_resume,
                  "suspendedDurationSeconds": kept}  # fmt: skip
    if aws:
        ingress, egress = list(aws.get("ingress", ())), list(aws.get("egress", ()))
    else:  # run through /v1: its tokens open the endpoint and the shell
        ingress, egress = sorted(INGRESS), (["INTERNET_EGRESS"] if vm.egress.needs_network else [])
    reason = vm.state_reason.value.upper() if vm.state is not VmState.FAILED else "FAILED"
    return {
        "microvmId": vm.id, "state": STATES[vm.state], "endpoint": endpoint(daemon.settings, vm.id) or "none",
        "imageArn": arn, "imageVersion": version, "executionRoleArn": aws.get("executionRoleArn"),
        "idlePolicy": policy, "maximumDurationInSeconds": idle.max_duration_s or 0,
        "startedAt": parse_time(vm.created_at), "terminatedAt": _at(vm.terminated_at), "stateReason": reason,
        "kmsKeyIdentifier": aws.get("kmsKeyIdentifier"), "ingressNetworkConnectors": ingress,
        "egressNetworkConnectors": egress,
    }  # fmt: skip


def _checked(daemon: Daemon, call: Call) -> tuple[list[str], list[str], int]:
    """RunMicrovm's input checked against this Ember's bounds (named by the API's members): its ingress and egress
    connectors and its maximum duration."""
    p, settings = call.params, daemon.settings
    ingress = _connectors("ingressNetworkConnectors", p.get("ingressNetworkConnectors", []), INGRESS)
    egress = _connectors("egressNetworkConnectors", p.get("egressNetworkConnectors", []), EGRESS)
    most = min(settings.aws_max_duration_s, settings.max_duration_limit_s)
    duration = p.get("maximumDurationInSeconds", most)
    if duration > most:
        raise ValidationException(
            f"maximumDurationInSeconds={duration}: at most {most} on this Ember "
            "(EMBER_AWS_MAX_DURATION_S, EMBER_MAX_DURATION_LIMIT)"
        )
    payload = p.get("runHookPayload")
    if payload is not None and len(payload.encode()) > settings.run_payload_max_bytes:
        raise ValidationException(
            f"runHookPayload is {len(payload.encode())} bytes: at most {settings.run_payload_max_bytes} "
            "(EMBER_RUN_PAYLOAD_MAX_BYTES)"
        )
    idle = p.get("idlePolicy") or {}
    if idle.get("maxIdleDurationSeconds", settings.min_idle_s) < settings.min_idle_s:
        raise ValidationException(
            f"idlePolicy.maxIdleDurationSeconds={idle['maxIdleDurationSeconds']}: at least {settings.min_idle_s} "
            "on this Ember (EMBER_MIN_IDLE_SECONDS)"
        )
    return ingress, egress, duration


@operation("RunMicrovm")
async def run(daemon: Daemon, call: Call) -> Mapping[str, Any]:
    """A microVM; a ``clientToken`` seen before answers with its microVM (checked before the image is resolved:
    a retry after a newer version became ACTIVE is the same request), or Conflict for other parameters."""
    p = call.params
    ingress, egress, duration = _checked(daemon, call)

    async def create(settle: Settle) -> VmRecord:
        identifier = p["imageIdentifier"]
        image = resolve_runnable(daemon, call, identifier, p.get("imageVersion"))
        managed = managed_name(identifier)
        _, version = shown(image.name, {}, region=call.region, account=call.account)
        idle = p.get("idlePolicy") or {}
        try:
            body = RunBody(
                image=names.public(image.name), egress="internet" if egress else "none",
                run_payload=p.get("runHookPayload"), idle_timeout_s=idle.get("maxIdleDurationSeconds"),
                auto_resume=bool(idle.get("autoResumeEnabled")), suspended_ttl_s=idle.get("suspendedDurationSeconds"),
                max_duration_s=duration,
            )  # fmt: skip
        except ValidationError as exc:
            problem = exc.errors()[0]
            raise ValidationException(aws_words(f"{'.'.join(map(str, problem['loc']))}: {problem['msg']}")) from None
        aws = {"image": managed or image_name(call, identifier), "managed": managed is not None,
               "imageVersion": version, "ingress": ingress, "egress": egress,
               "executionRoleArn": p.get("executionRoleArn"), "kmsKeyIdentifier": p.get("kmsKeyIdentifier"),
               "logging": p.get("logging")}  # fmt: skip
        shown_back = {k: v for k, v in aws.items() if v is not None}
        return await v1.start(daemon, Limits(daemon), call.principal, body, settle=settle, aws=shown_back)

    async def existing(vm_id: str) -> VmRecord:
        return owned_by(daemon, vm_id, call.principal)

    request = {k: v for k, v in p.items() if k != "clientToken"}  # as given: the same request hashes the same
    token = _client_token(p.get("clientToken"))
    vm = await Idempotency(daemon.tenants).create(call.principal, "vm", token, request, create, existing)
    return view(daemon, vm, call)


@operation("GetMicrovm")
async def get(daemon: Daemon, call: Call) -> Mapping[str, Any]:
    return view(daemon, _vm(daemon, call), call)


def _page_token(vm: VmRecord) -> str:
    return base64.urlsafe_b64encode(json.dumps([vm.created_at, vm.id]).encode()).decode()


def _after(token: str) -> tuple[str, str]:
    """The (created_at, id) a nextToken continues after; ValidationException for one this API did not give."""
    try:
        created, vm_id = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
        if isinstance(created, str) and isinstance(vm_id, str) and len(token) <= 512:
            return created, vm_id
    except (ValueError, TypeError, binascii.Error, UnicodeError):
        pass
    raise ValidationException("nextToken is not one ListMicrovms returned: start again without it")


@operation("ListMicrovms")
async def list_microvms(daemon: Daemon, call: Call) -> Mapping[str, Any]:
    """The tenant's microVMs, oldest first (TERMINATED ones for EMBER_TERMINATED_RETENTION), a page at a time."""
    p = call.params
    limit = p.get("maxResults", PAGE)
    after = _after(p["nextToken"]) if "nextToken" in p else None
    wanted = named(p["imageIdentifier"], region=call.region, account=call.account) if "imageIdentifier" in p else None
    records = await asyncio.to_thread(
        daemon.engine.store.list_vms, tenant=call.principal.tenant, terminated=True,
        terminated_since=ago(daemon.settings.terminated_retention_s),
    )  # fmt: skip
    records.sort(key=lambda v: (v.created_at, v.id))
    items: list[dict[str, Any]] = []
    last: VmRecord | None = None
    for vm in records:
        if after is not None and (vm.created_at, vm.id) <= after:
            continue
        arn, version = shown(vm.image, vm.aws, region=call.region, account=call.account)
        if wanted is not None and (arn != wanted or ("imageVersion" in p and version != p["imageVersion"])):
            continue
        if len(items) == limit:
            return {"items": items, "nextToken": _page_token(last) if last else None}
        items.append({"microvmId": vm.id, "state": STATES[vm.state], "imageArn": arn, "imageVersion": version,
                      "startedAt": parse_time(vm.created_at)})  # fmt: skip
        last = vm
    return {"items": items}


@operation("SuspendMicrovm")
async def suspend(daemon: Daemon, call: Call) -> Mapping[str, Any]:
    vm = _vm(daemon, call)
    if vm.state in (VmState.SUSPENDING, VmState.SUSPENDED):
        return {}  # idempotent, as the model says
    async with Limits(daemon).admit(vm.tenant, suspend_asks(vm), Operation.SUSPEND):
        await daemon.engine.suspend(vm.id)
    return {}


@operation("ResumeMicrovm")
async def resume(daemon: Daemon, call: Call) -> Mapping[str, Any]:
    vm = _vm(daemon, call)
    if vm.state in (VmState.RUNNING, VmState.RESUMING):
        return {}
    admit = daemon.engine.admit_resume
    assert admit is not None, "the /v1 routes set it (ember.api.vms)"
    async with admit(vm):
        await daemon.engine.resume(vm.id)
    return {}


@operation("TerminateMicrovm")
async def terminate(daemon: Daemon, call: Call) -> Mapping[str, Any]:
    vm = _vm(daemon, call)
    if vm.state not in (VmState.TERMINATING, VmState.TERMINATED):
        await daemon.engine.remove(vm.id)
    return {}


def _ports(specs: list[Mapping[str, Any]]) -> Ports:
    """The one range of guest ports ``allowedPorts`` opens (Ember's tokens open one range)."""
    ranges = []
    for spec in specs:
        if "allPorts" in spec:
            return Ports(1, 65535)
        if "port" in spec:
            ranges.append((spec["port"], spec["port"]))
        else:
            low, high = spec["range"]["startPort"], spec["range"]["endPort"]
            if low > high:
                raise ValidationException(f"allowedPorts: the range {low}-{high} ends before it starts")
            ranges.append((low, high))
    if not ranges:
        raise ValidationException("allowedPorts: give a port, a range or allPorts")
    ranges.sort()
    low, high = ranges[0]
    for start, end in ranges[1:]:
        if start > high + 1:
            raise ValidationException(
                "allowedPorts: the ports must form one contiguous range here (Ember's tokens open one range); "
                "make one token per range"
            )
        high = max(high, end)
    return Ports(low, high)


def _minutes(call: Call) -> int:
    minutes = int(call.params["expirationInMinutes"])
    if minutes > MAX_MINUTES:
        raise ValidationException(f"expirationInMinutes={minutes}: a token lives at most {MAX_MINUTES} minutes")
    return minutes


@operation("CreateMicrovmAuthToken")
async def auth_token(daemon: Daemon, call: Call) -> Mapping[str, Any]:
    """A token for the microVM's endpoint: send it as ``X-aws-proxy-auth`` (the guest port in X-aws-proxy-port)."""
    ports, minutes = _ports(call.params["allowedPorts"]), _minutes(call)  # the input first, then the microVM
    token, _ = issue_token(daemon, _vm(daemon, call), TokenKind.PROXY, ports, minutes)
    return {"authToken": {TOKEN_HEADER: token}}


@operation("CreateMicrovmShellAuthToken")
async def shell_auth_token(daemon: Daemon, call: Call) -> Mapping[str, Any]:
    """A token for the microVM's shell: offer the WebSocket subprotocol ``lambda-microvms.authentication.<token>``."""
    minutes = _minutes(call)
    token, _ = issue_token(daemon, _vm(daemon, call), TokenKind.SHELL, NO_PORTS, minutes)
    return {"authToken": {TOKEN_HEADER: token}}
