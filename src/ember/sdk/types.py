"""Typed results: frozen dataclasses made from the API's JSON by :func:`decode`.

Each keeps the JSON it came from in ``raw`` (not compared, not shown), which the CLI prints for
``--json``. Fields the daemon does not send (an older daemon) take their defaults; a missing
required field is a :class:`~ember.sdk.errors.ProtocolError`.

Every result type is importable from here; each resource's are defined in a module of their own
(:mod:`ember.sdk.results`) that loads when one of them is first used: making a dataclass costs
about half a millisecond, and ``ember ps`` needs 2 of the 22.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, field, fields
from importlib import import_module

from ember.sdk.errors import ProtocolError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (2.5 ms of the CLI's start)
if TYPE_CHECKING:
    from typing import Any, TypeVar

    from ember.sdk.results.account import ApiKey, CreatedKey, Info, Tenant, Whoami
    from ember.sdk.results.exec import ExecEvent, ExecExit, ExecOutput, ExecResult, Process
    from ember.sdk.results.files import FileEntry, Listing
    from ember.sdk.results.images import Build, Image
    from ember.sdk.results.lifecycle import Event, Transition
    from ember.sdk.results.logs import LogEvent, LogOutput, LogSkipped
    from ember.sdk.results.usage import TenantUsage, Usage, VmUsage
    from ember.sdk.results.vms import Accelerator, AuthToken, ShellToken, VmData
    from ember.sdk.results.webhooks import CreatedWebhook, Delivery, Webhook

    T = TypeVar("T")

__all__ = [
    "EMPTY", "Accelerator", "ApiKey", "AuthToken", "Build", "CreatedKey", "CreatedWebhook", "Delivery", "Event",
    "ExecEvent", "ExecExit", "ExecOutput", "ExecResult", "FileEntry", "Image", "Info", "Listing", "LogEvent",
    "LogOutput", "LogSkipped", "Process", "ShellToken", "Tenant", "TenantUsage",
    "Transition", "Usage", "VmData", "VmUsage", "Webhook", "Whoami", "decode", "decode_list", "raw_field",
]  # fmt: skip
# each result type: its module in ember.sdk.results
HOMES = {
    "Accelerator": "vms", "VmData": "vms", "AuthToken": "vms", "ShellToken": "vms",
    "Transition": "lifecycle", "Event": "lifecycle",
    "ExecOutput": "exec", "ExecExit": "exec", "ExecEvent": "exec", "ExecResult": "exec", "Process": "exec",
    "FileEntry": "files", "Listing": "files",
    "Image": "images", "Build": "images", "Tenant": "account", "ApiKey": "account", "CreatedKey": "account",
    "Whoami": "account", "Info": "account", "Webhook": "webhooks", "CreatedWebhook": "webhooks",
    "Delivery": "webhooks", "TenantUsage": "usage", "VmUsage": "usage", "Usage": "usage",
    "LogOutput": "logs", "LogSkipped": "logs", "LogEvent": "logs",
}  # fmt: skip
EMPTY: Mapping[str, Any] = {}


def __getattr__(name: str) -> Any:
    home = HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'ember.sdk.types' has no attribute {name!r}")
    value = getattr(import_module(f"ember.sdk.results.{home}"), name)
    globals()[name] = value
    return value


def raw_field() -> Any:
    """The ``raw`` field of a result: the JSON it was made from."""
    return field(default_factory=dict, repr=False, compare=False)


def decode(cls: type[T], data: Any, **nested: Any) -> T:
    """``cls`` from a JSON object: each field from the key of its name (its default if absent);
    ``nested`` gives a field's value already converted."""
    if not isinstance(data, Mapping):
        raise ProtocolError(f"the daemon sent {type(data).__name__} where a {cls.__name__} object was expected")
    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name == "raw":
            values["raw"] = data
        elif f.name in nested:
            values[f.name] = nested[f.name]
        elif f.name in data and data[f.name] is not None:
            values[f.name] = data[f.name]
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ProtocolError(f"the daemon's {cls.__name__} has no {f.name!r}")
    return cls(**values)


def decode_list(cls: type[T], data: Any) -> list[T]:
    if not isinstance(data, list):
        raise ProtocolError(f"the daemon sent {type(data).__name__} where a list of {cls.__name__} was expected")
    return [decode(cls, item) for item in data]
