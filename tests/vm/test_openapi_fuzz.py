"""The real daemon keeps to its OpenAPI document under fuzzing (schemathesis), and the document is complete.

The daemon is this module's own, on a TCP listener with its admin key (EMBER_LISTEN, the api-token file),
with a fresh data directory: it has no image, so no fuzzed call can start a VM (the test checks that
none did). Building the base image (minutes) is the one operation not fuzzed.

Each operation gets ``EXAMPLES`` positive cases (valid per the document) and as many negative ones
(invalid on purpose); every answer must be no 5xx, of a status the operation documents, of the
documented Content-Type and headers, with a body matching the documented (typed) schema; invalid input
must be refused, and valid input accepted: the document states every limit the daemon's validation
has, except the few rules in ``RULES_NOT_IN_THE_DOCUMENT`` and ``holds_nul``. Generation is
derandomized: a run is repeatable.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.core.failures import FailureGroup
from schemathesis.generation import GenerationMode

from ember.config import Settings
from tests.conftest import TEST_UID_BLOCK, TEST_UID_BLOCK_BASE, DaemonProcess, vm_tests_possible

pytestmark = pytest.mark.vm

EXAMPLES = 80  # per operation and mode
NOT_FUZZED = {"POST /v1/images/debian/prepare"}  # builds the base image: minutes, and then VMs could run
CHECK_NAMES = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "positive_data_acceptance",
)
# a build context is bytes on the wire: random bytes are never a tar, so a valid request is still refused
NOT_ACCEPTANCE_CHECKED = {"POST /v1/images/build"}
# valid per the document, refused (400) by a rule no schema can state: the message says which
RULES_NOT_IN_THE_DOCUMENT = {
    # a webhook's URL must parse, have a host and port, and resolve to public addresses (DNS)
    "POST /v1/webhooks": re.compile(r"^the webhook url "),
    # since must not be after until (or now): a rule between two parameters
    "GET /v1/usage": re.compile(r"^since \(.*\) is after until"),
}
ERROR_REF = "#/components/schemas/ErrorBody"
# a build context is bytes on the wire (random bytes: not a tar, a 400)
schemathesis.serializer.alias("application/x-tar", "application/octet-stream")


@dataclass(frozen=True)
class Api:
    base: str
    headers: dict[str, str]  # the admin key
    daemon: DaemonProcess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def api() -> Iterator[Api]:
    reason = vm_tests_possible()
    if reason:
        pytest.fail(reason)
    data = Path(tempfile.mkdtemp(prefix="ember-fuzz-"))
    port = free_port()
    settings_env = {
        "EMBER_DATA_DIR": str(data),
        "EMBER_SOCKET": str(data / "ember.sock"),
        "EMBER_CACHE_DIR": os.environ.get("EMBER_TEST_CACHE", "/var/cache/ember-test"),
        "EMBER_LISTEN": f"127.0.0.1:{port}",
        # the second half of this run's id block: the session daemon has the first
        "EMBER_UID_BASE": str(TEST_UID_BLOCK_BASE + (os.getpid() % 200) * 2 * TEST_UID_BLOCK + TEST_UID_BLOCK),
        "EMBER_UID_COUNT": str(TEST_UID_BLOCK),
        # the fuzzer is one key sending as fast as it can: its rate is not what this test is about
        "EMBER_RATE_LIMIT_PER_S": "1000000",
        "EMBER_RATE_LIMIT_BURST": "1000000",
    }
    d = DaemonProcess(Settings.from_env(settings_env), data.parent / f"{data.name}-daemon.log")
    d.start()
    try:
        token = d.settings.api_token_path.read_text().strip()
        yield Api(f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}, d)
    finally:
        d.stop()
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="module")
def document(api: Api) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        try:
            answer = requests.get(f"{api.base}/openapi.json", headers=api.headers, timeout=10)
            break
        except requests.ConnectionError:
            assert time.monotonic() < deadline, "the TCP listener did not start"
            time.sleep(0.1)
    assert answer.status_code == 200, answer.text
    doc: dict[str, Any] = answer.json()
    return doc


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for path, methods in doc["paths"].items():
        for method, operation in methods.items():
            yield f"{method.upper()} {path}", operation


def untyped(schema: dict[str, Any]) -> bool:
    """A JSON body schema that says nothing of its fields: none, or any object or list of them."""
    if schema.get("type") == "array":
        return untyped(schema.get("items", {}))
    return "$ref" not in schema


def test_the_document_is_complete(document: dict[str, Any]) -> None:
    """Every operation documents its success (a typed model for every JSON answer), its errors as
    ErrorBody (never FastAPI's unused 422 model), and typed parameters; every route that reads a body
    documents it, and every streaming route its media type."""
    assert "HTTPValidationError" not in document["components"]["schemas"]
    gaps = []
    for name, operation in operations(document):
        responses = operation["responses"]
        if not any(code.startswith("2") for code in responses):
            gaps.append(f"{name}: no success response")
        for code, response in responses.items():
            json_body = response.get("content", {}).get("application/json")
            if code.startswith("2") and json_body is not None and untyped(json_body.get("schema", {})):
                gaps.append(f"{name}: its {code} answer has no typed schema")
        for code, response in responses.items():
            if code.startswith(("4", "5")):
                schema = response.get("content", {}).get("application/json", {}).get("schema", {})
                if schema.get("$ref") != ERROR_REF:
                    gaps.append(f"{name}: {code} is not an ErrorBody")
        for needed in ("401", "403", "429"):
            if needed not in responses:
                gaps.append(f"{name}: {needed} not documented")
        for parameter in operation.get("parameters", []):
            if not parameter.get("schema"):
                gaps.append(f"{name}: parameter {parameter['name']} has no schema")
        if name.startswith(("POST ", "PUT ", "PATCH ")) and "requestBody" not in operation:
            bodiless = {"POST /v1/images/debian/prepare", "POST /v1/vms/{vm_id}/suspend", "POST /v1/vms/{vm_id}/resume"}
            if name not in bodiless:
                gaps.append(f"{name}: its request body is not documented")
    prepare = document["paths"]["/v1/images/debian/prepare"]["post"]["responses"]["200"]
    assert list(prepare["content"]) == ["application/x-ndjson"], prepare
    assert not gaps, "\n".join(gaps)


def test_the_document_states_the_input_limits(document: dict[str, Any]) -> None:
    """The limits the daemon enforces are in the document (so clients and the fuzzer know them)."""
    schemas = document["components"]["schemas"]

    def param(path: str, method: str, name: str) -> dict[str, Any]:
        found = [p for p in document["paths"][path][method]["parameters"] if p["name"] == name]
        schema: dict[str, Any] = found[0]["schema"]
        return schema

    def string(schema: dict[str, Any]) -> dict[str, Any]:  # the string of an optional string
        return next((s for s in schema.get("anyOf", [schema]) if s.get("type") == "string"), {})

    token = r"^[ -~]{1,64}$"  # 1 to 64 printable characters
    for body in ("RunBody", "SnapshotBody", "TenantBody", "KeyBody", "WebhookBody"):
        assert string(schemas[body]["properties"]["client_token"])["pattern"] == token, body
    assert string(param("/v1/images/build", "post", "client_token"))["pattern"] == token
    assert schemas["TenantBody"]["properties"]["name"]["pattern"] == "^[a-z0-9][a-z0-9-]{0,62}$"
    quota = schemas["TenantBody"]["properties"]["quotas"]["additionalProperties"]
    assert (quota["minimum"], quota["maximum"]) == (0, 2**53)
    run = schemas["RunBody"]["properties"]
    for field, key, most in (
        ("env", "^[A-Za-z_][A-Za-z0-9_]{0,255}$", 128),
        ("tags", "^[A-Za-z0-9_.:/=+@-]{1,128}$", 50),
    ):
        assert run[field]["propertyNames"] == {"pattern": key}, field
        assert run[field]["maxProperties"] == most, field
        assert run[field]["additionalProperties"]["maxLength"] == 4096, field
    assert schemas["ExecBody"]["properties"]["env"]["propertyNames"] == {"pattern": "^[^=]+$"}
    assert param("/v1/vms", "get", "tag")["items"]["pattern"] == "^[^=]+="
    for name in ("since", "until"):
        assert param("/v1/usage", "get", name)["format"] == "date-time", name


def test_the_daemon_keeps_to_its_document_under_fuzzing(api: Api, document: dict[str, Any]) -> None:
    load_all_checks()
    checks = [CHECKS.get_one(name) for name in CHECK_NAMES]
    schema = schemathesis.openapi.from_dict(document)
    failures: list[str] = []
    fuzzed: dict[str, dict[int, int]] = {}
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()
            label = f"{operation.method.upper()} {operation.path}"
            if label in NOT_FUZZED:
                continue
            statuses = fuzzed.setdefault(label, {})
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                failure = fuzz_one(operation, mode, api, session, checks, statuses)
                if failure:
                    failures.append(failure)
    summary = "\n".join(f"{label}: {dict(sorted(s.items()))}" for label, s in fuzzed.items())
    print(f"fuzzed {len(fuzzed)} operations, {sum(sum(s.values()) for s in fuzzed.values())} calls:\n{summary}")
    assert not failures, "\n\n".join(failures)
    # nothing the fuzzer did started a VM
    vms = requests.get(f"{api.base}/v1/vms", headers=api.headers, params={"all": "true"}, timeout=10)
    assert vms.status_code == 200 and vms.json() == [], vms.text


def holds_nul(case: Any) -> bool:
    """A NUL character in the case's path, query or JSON body: every route refuses one (ember.api.guard:
    no name or id holds one; PostgreSQL stores none), a rule the document does not state."""
    body = case.body if isinstance(case.body, (dict, list, str)) else None
    return "\\u0000" in json.dumps((case.path_parameters, case.query, body), default=str)


def fuzz_one(
    operation: Any,
    mode: GenerationMode,
    api: Api,
    session: requests.Session,
    checks: list[Any],
    statuses: dict[int, int],
) -> str:
    """The first failure of ``EXAMPLES`` cases of ``operation`` in ``mode`` (not shrunk), or ""."""

    @hypothesis.settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )
    # acting in tenant default: a generated X-Ember-Tenant names no tenant, and every call would be that 404
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode, headers={"X-Ember-Tenant": "default"}))
    def run(case: Any) -> None:
        response = case.call(base_url=api.base, session=session, headers=api.headers, timeout=30)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        case.validate_response(response, checks=checks_for(label, case, response), headers=api.headers)

    label = f"{operation.method.upper()} {operation.path}"
    acceptance = CHECKS.get_one("positive_data_acceptance")
    without_acceptance = [check for check in checks if check is not acceptance]

    def checks_for(label: str, case: Any, response: requests.Response) -> list[Any]:
        if label in NOT_ACCEPTANCE_CHECKED or (response.status_code == 400 and holds_nul(case)):
            return without_acceptance
        rule = RULES_NOT_IN_THE_DOCUMENT.get(label)
        if rule is not None and response.status_code == 400 and rule.search(response.json().get("message", "")):
            return without_acceptance
        return checks

    try:
        run()
    except hypothesis.errors.Unsatisfiable:
        return ""  # no case of this mode exists (e.g. nothing to make invalid)
    except (Exception, FailureGroup) as exc:  # FailureGroup: the checks' findings (a BaseExceptionGroup)
        return f"{operation.method.upper()} {operation.path} ({mode.value}): {exc}"
    return ""
