"""The members of CreateMicrovmImage / UpdateMicrovmImage, checked and mapped onto Ember's build (pure).

The router has already checked them against the model (types, enums, lengths, patterns); what Ember adds:

- ``baseImageArn`` must be a managed image (:mod:`ember.aws.managed`: Ember's built-in bases), of any region;
  ``baseImageVersion`` one of its versions. The image's root filesystem is what its Dockerfile's ``FROM``
  names (any base Ember builds from: its built-in Debian bases, a registry, an OCI layout); the base image
  stands for the VM around it (Ember's guest kernel and agent) and is recorded.
- ``cpuConfigurations``: ``X86_64`` only (Ember runs x86-64 guests); ``ARM_64`` is a ValidationException.
- ``egressNetworkConnectors`` (the build's network): absent or ``[INTERNET_EGRESS]`` (by name, or the ARN of
  the managed connector) builds with Ember's filtered build egress; ``[]`` builds without a network.
- ``resources``: ``minimumMemoryInMiB`` up to the memory Ember gives every VM (EMBER_MEMORY_MIB); more is refused.
- ``environmentVariables``: set over the Dockerfile's ENV, for the app and every exec; names without ``=``.
- ``hooks``: the app's hooks at ``/aws/lambda-microvms/runtime/v1/<hook>`` on ``hooks.port`` (9000 when not
  given), each called only when ENABLED, with its timeout (ready: the readiness deadline, default 120 s).
- Accepted, recorded, shown back and otherwise ignored: ``buildRoleArn`` (no IAM: Ember reads the code with
  its own S3 credentials), ``kmsKeyIdentifier`` (no KMS: Ember's files are the host's), ``logging`` (no
  CloudWatch: the build log is ``ember image logs``, the app's output ``ember logs``), and
  ``additionalOsCapabilities`` (the app already runs with what its Dockerfile's USER has, in its own VM).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ember.aws.arns import connector_name
from ember.aws.errors import ValidationException
from ember.config import Settings
from ember.hooks import AWS_PREFIX, Hook, HookConfig

SPEC_MEMBERS = (
    "baseImageArn", "baseImageVersion", "buildRoleArn", "description", "codeArtifact", "logging",
    "egressNetworkConnectors", "cpuConfigurations", "resources", "additionalOsCapabilities", "hooks",
    "environmentVariables", "kmsKeyIdentifier",
)  # fmt: skip
DEFAULT_HOOK_PORT = 9000  # AWS's, when hooks.port is not given
DEFAULT_READY_TIMEOUT_S = 120.0  # Ember's build default
MAX_DESCRIPTION = 1024  # characters (the model sets no limit)
INTERNET_EGRESS = "INTERNET_EGRESS"
_RUNTIME = {Hook.RUN: "run", Hook.RESUME: "resume", Hook.SUSPEND: "suspend", Hook.TERMINATE: "terminate"}
_BUILD = {Hook.READY: "ready", Hook.VALIDATE: "validate"}


def spec_of(params: Mapping[str, Any], settings: Settings) -> dict[str, Any]:
    """The request's image members, checked (ValidationException says what to change)."""
    spec = {k: params[k] for k in SPEC_MEMBERS if params.get(k) is not None}
    if len(spec.get("description", "")) > MAX_DESCRIPTION:
        raise ValidationException(f"description is at most {MAX_DESCRIPTION} characters")
    for cpu in spec.get("cpuConfigurations", []):
        if cpu.get("architecture") != "X86_64":
            raise ValidationException(
                f"architecture {cpu.get('architecture')}: Ember runs X86_64 guests only; omit cpuConfigurations "
                "or ask for X86_64"
            )
    build_network(spec)
    for res in spec.get("resources", []):
        wanted = res.get("minimumMemoryInMiB")
        if not isinstance(wanted, int) or not 0 < wanted <= settings.memory_mib:
            raise ValidationException(
                f"resources.minimumMemoryInMiB={wanted}: Ember's VMs have {settings.memory_mib} MiB "
                "(EMBER_MEMORY_MIB, the operator's setting); ask for 1 to that"
            )
    for key, value in spec.get("environmentVariables", {}).items():
        if "=" in key or "\0" in key or "\0" in value:
            raise ValidationException(f"environment variable {key[:64]!r}: a name has no '=' and no value a NUL")
    hook_settings(spec)
    return spec


def build_network(spec: Mapping[str, Any]) -> bool:
    """Whether the build's RUN steps reach the network (Ember's filtered build egress)."""
    connectors = spec.get("egressNetworkConnectors")
    if connectors is None:
        return True
    for connector in connectors:
        if connector_name(connector) != INTERNET_EGRESS:
            raise ValidationException(
                f"egress network connector {connector[:100]!r}: Ember has the managed {INTERNET_EGRESS} "
                "connector only (none: build without a network)"
            )
    return bool(connectors)


def hook_settings(spec: Mapping[str, Any]) -> tuple[HookConfig, float]:
    """The image's hooks (at AWS's paths) and its readiness deadline in seconds."""
    given = spec.get("hooks") or {}
    runtime, build = given.get("microvmHooks") or {}, given.get("microvmImageHooks") or {}
    enabled: set[Hook] = set()
    timeouts: dict[Hook, float] = {}
    for members, table in ((runtime, _RUNTIME), (build, _BUILD)):
        for hook, key in table.items():
            if members.get(key) == "ENABLED":
                enabled.add(hook)
            seconds = members.get(f"{key}TimeoutInSeconds")
            if seconds is not None and hook is not Hook.READY:
                timeouts[hook] = float(seconds)
    ready = build.get("readyTimeoutInSeconds")
    config = HookConfig(port=given.get("port") or DEFAULT_HOOK_PORT, hooks=frozenset(enabled), timeouts=timeouts,
                        prefix=AWS_PREFIX)  # fmt: skip
    return config, float(ready) if ready is not None else DEFAULT_READY_TIMEOUT_S


def environment(spec: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((str(k), str(v)) for k, v in (spec.get("environmentVariables") or {}).items()))
