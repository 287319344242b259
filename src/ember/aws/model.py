"""The service's model (botocore's ``lambda-microvms`` 2025-09-09), loaded once: requests parsed and validated
against an operation's input shape, answers written as its output shape.

Input: the URI's labels, the query string's members and the JSON body's members, each checked against its
shape: type, required members, string length, number range, enum, pattern (RE2, matched in full), list and map
sizes, exactly one member of a union, and no member the shape does not have. Anything else is a
ValidationException that names the member and says what it must be. The model's own bounds are AWS's; where
Ember has a setting instead (RELAXED), the operation checks that.

Output: members by model name; None dropped; ``datetime`` as epoch seconds (rest-json's default timestamp).
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

import re2
from botocore.loaders import create_loader
from botocore.model import OperationModel, ServiceModel, Shape

from ember.aws.errors import ValidationException

SERVICE = "lambda-microvms"
API_VERSION = "2025-09-09"
# shapes whose model maximum is AWS's limit, checked by the operation against an Ember setting instead
RELAXED = frozenset({"RunMicrovmRequestMaximumDurationInSecondsInteger", "RunHookPayload"})
MAX_QUERY_PAIRS = 64  # no operation has more than a handful of query members


@functools.cache
def service() -> ServiceModel:
    return ServiceModel(create_loader().load_service_model(SERVICE, "service-2", API_VERSION), SERVICE)


@functools.cache
def _pattern(text: str) -> Any:
    return re2.compile(text)


def _refuse(where: str, what: str) -> ValidationException:
    return ValidationException(f"{where}: {what}")


def _check_string(where: str, value: Any, shape: Shape) -> str:
    if not isinstance(value, str):
        raise _refuse(where, "must be a string")
    meta = shape.metadata
    if "min" in meta and len(value) < meta["min"]:
        raise _refuse(where, f"must be at least {meta['min']} characters long")
    if "max" in meta and len(value) > meta["max"] and shape.name not in RELAXED:
        raise _refuse(where, f"must be at most {meta['max']} characters long")
    if shape.enum and value not in shape.enum:
        raise _refuse(where, f"must be one of {', '.join(shape.enum)}")
    if "pattern" in meta and not _pattern(meta["pattern"]).fullmatch(value):
        raise _refuse(where, f"must match the pattern {meta['pattern']}")
    return value


def _check_number(where: str, value: Any, shape: Shape) -> int | float:
    integral = shape.type_name in ("integer", "long")
    if isinstance(value, bool) or not isinstance(value, int | float) or (integral and not isinstance(value, int)):
        raise _refuse(where, f"must be {'an integer' if integral else 'a number'}")
    if isinstance(value, float) and not math.isfinite(value):
        raise _refuse(where, "must be a finite number")
    meta = shape.metadata
    if "min" in meta and value < meta["min"]:
        raise _refuse(where, f"must be at least {meta['min']}")
    if "max" in meta and value > meta["max"] and shape.name not in RELAXED:
        raise _refuse(where, f"must be at most {meta['max']}")
    if shape.type_name == "integer" and not -(2**31) <= value < 2**31:
        raise _refuse(where, "must be a 32-bit integer")
    if shape.type_name == "long" and not -(2**63) <= value < 2**63:
        raise _refuse(where, "must be a 64-bit integer")
    return value


def _check_size(where: str, count: int, shape: Shape, unit: str) -> None:
    meta = shape.metadata
    if "min" in meta and count < meta["min"]:
        raise _refuse(where, f"must have at least {meta['min']} {unit}")
    if "max" in meta and count > meta["max"]:
        raise _refuse(where, f"must have at most {meta['max']} {unit}")


def check(where: str, value: Any, shape: Shape) -> Any:
    """``value`` (decoded JSON) checked against ``shape``: the value to hand the operation."""
    kind = shape.type_name
    if kind == "structure":
        return _check_structure(where, value, shape, {})
    if kind == "string":
        return _check_string(where, value, shape)
    if kind in ("integer", "long", "float", "double"):
        return _check_number(where, value, shape)
    if kind == "boolean":
        if not isinstance(value, bool):
            raise _refuse(where, "must be true or false")
        return value
    if kind == "timestamp":
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 2**33:
            raise _refuse(where, "must be a timestamp in epoch seconds")
        return datetime.fromtimestamp(value, UTC)
    if kind == "list":
        if not isinstance(value, list):
            raise _refuse(where, "must be a list")
        _check_size(where, len(value), shape, "items")
        return [check(f"{where}[{i}]", item, shape.member) for i, item in enumerate(value)]
    if kind == "map":
        if not isinstance(value, dict):
            raise _refuse(where, "must be an object")
        _check_size(where, len(value), shape, "entries")
        key_shape, value_shape = shape.key, shape.value
        return {check(f"{where} key", k, key_shape): check(f"{where}.{k}", v, value_shape) for k, v in value.items()}
    raise _refuse(where, f"has the unsupported type {kind}")


def _check_structure(where: str, value: Any, shape: Shape, located: Mapping[str, Any]) -> dict[str, Any]:
    """A structure's members: the JSON object ``value``'s plus those ``located`` (URI, query string)."""
    if not isinstance(value, dict):
        raise _refuse(where, "must be an object")
    members = shape.members
    prefix = f"{where}." if where else ""
    out: dict[str, Any] = {}
    for name, item in value.items():
        member = members.get(name)
        if member is None or "location" in member.serialization:
            raise _refuse(f"{prefix}{name}"[:300], f"is not a member of {shape.name}")
        if item is None:
            raise _refuse(f"{prefix}{name}", "must not be null: leave it out")
        out[name] = check(f"{prefix}{name}", item, member)
    out.update(located)
    if shape.metadata.get("union"):
        if len(out) != 1:
            raise _refuse(where or shape.name, f"set exactly one of {', '.join(members)}")
    else:
        missing = [name for name in shape.required_members if name not in out]
        if missing:
            raise _refuse(where or shape.name, f"missing the required member {', '.join(missing)}")
    return out


def _from_text(where: str, text: str, shape: Shape) -> Any:
    """A URI label's or query value's text as its shape's type."""
    if shape.type_name in ("integer", "long"):
        if not re.fullmatch(r"-?[0-9]{1,19}", text):  # ASCII digits: str.isdigit takes "²", int() does not
            raise _refuse(where, "must be an integer")
        return _check_number(where, int(text), shape)
    if shape.type_name == "boolean":
        if text not in ("true", "false"):
            raise _refuse(where, "must be true or false")
        return text == "true"
    return _check_string(where, text, shape)


def parse_query(query_string: str) -> list[tuple[str, str]]:
    """``name=value`` pairs, percent-decoded (a ``+`` is itself, as botocore encodes a space as %20)."""
    if not query_string:
        return []
    parts = query_string.split("&")
    if len(parts) > MAX_QUERY_PAIRS:
        raise ValidationException(f"the query string has more than {MAX_QUERY_PAIRS} parameters")
    pairs = []
    for part in parts:
        name, _, value = part.partition("=")
        try:
            pairs.append((unquote(name, errors="strict"), unquote(value, errors="strict")))
        except UnicodeDecodeError:
            raise ValidationException("the query string is not UTF-8") from None
    return pairs


def _label(name: str, raw: str) -> str:
    """A URI label as sent (percent-encoded: the API routes raw paths), decoded."""
    try:
        return unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise _refuse(name, "is not UTF-8") from None


def parse_input(operation: OperationModel, labels: Mapping[str, str], query_string: str, body: bytes) -> dict[str, Any]:
    """The operation's input members from a request: its URI ``labels`` (percent-encoded, as routed), query
    string and body."""
    shape = operation.input_shape
    if shape is None:
        return {}
    by_location: dict[str, str] = {}  # a located member's wire name -> model name
    located: dict[str, Any] = {}
    for name, member in shape.members.items():
        location = member.serialization.get("location")
        wire = member.serialization.get("name", name)
        if location == "uri":
            located[name] = _from_text(name, _label(name, labels[wire]), member)
        elif location == "querystring":
            by_location[wire] = name
    query: dict[str, list[str]] = {}
    for wire, value in parse_query(query_string):
        if wire not in by_location:
            raise ValidationException(f"the query parameter {wire[:100]!r} is not one {operation.name} takes")
        query.setdefault(wire, []).append(value)
    for wire, values in query.items():
        name = by_location[wire]
        member = shape.members[name]
        if member.type_name == "list":
            _check_size(name, len(values), member, "items")
            located[name] = [_from_text(f"{name}[{i}]", v, member.member) for i, v in enumerate(values)]
        elif len(values) > 1:
            raise ValidationException(f"{name}: give it once")
        else:
            located[name] = _from_text(name, values[0], member)
    document: Any = {}
    if body.strip():
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            raise ValidationException("the request body is not a JSON object") from None
    return _check_structure("", document, shape, located)


def _render(value: Any, shape: Shape) -> Any:
    kind = shape.type_name
    if kind == "structure":
        members = shape.members
        return {k: _render(v, members[k]) for k, v in value.items() if v is not None}
    if kind == "list":
        return [_render(v, shape.member) for v in value]
    if kind == "map":
        return {k: _render(v, shape.value) for k, v in value.items()}
    if kind == "timestamp":
        assert isinstance(value, datetime) and value.tzinfo is not None, "timestamps are aware datetimes"
        return round(value.timestamp(), 3)
    return value


def render_output(operation: OperationModel, result: Mapping[str, Any]) -> bytes:
    """The output shape's JSON body (b"" for an operation without output)."""
    shape = operation.output_shape
    if shape is None:
        return b""
    return json.dumps(_render(result, shape), separators=(",", ":")).encode()
