"""The SDK's pure request core: requests as the API wants them, answers and errors rebuilt typed."""

from __future__ import annotations

import base64
import inspect
import json
from pathlib import Path

import pytest

from ember.config import Settings
from ember.sdk import core, errors
from ember.sdk.aio import AsyncClient
from ember.sdk.client import Client
from ember.sdk.types import ExecExit, ExecOutput, VmData


def test_requests_carry_every_run_option_and_filters_as_query() -> None:
    req = core.vm_run("app", version=2, memory_mib=512, vcpus=2, env={"K": "V"}, tags={"team": "a"},
                      client_token="t1")  # fmt: skip
    assert (req.method, req.path) == ("POST", "/v1/vms")
    assert req.json == {"image": "app", "version": 2, "memory_mib": 512, "vcpus": 2, "env": {"K": "V"},
                        "tags": {"team": "a"}, "client_token": "t1"}  # fmt: skip
    assert core.vm_run("app").json == {"image": "app"}  # nothing the caller did not choose
    listing = core.vm_list(state="RUNNING", tags={"team": "a", "env": "x=y"}, all=True, tenant="acme")
    assert listing.target == "/v1/vms?state=RUNNING&tag=team%3Da&tag=env%3Dx%3Dy&all=true&tenant=acme"
    assert core.vm_list().target == "/v1/vms"


def test_ids_and_names_cannot_leave_their_path_segment() -> None:
    assert core.vm_get("../images").path == "/v1/vms/..%2Fimages"
    assert core.vm_get("..").path == "/v1/vms/%2E%2E"
    assert core.vm_transition("a/b?c#d", "suspend").request.path == "/v1/vms/a%2Fb%3Fc%23d/suspend"
    assert core.image_get("app:2").request.path == "/v1/images/app%3A2"


def test_build_request_streams_a_tar_with_its_options() -> None:
    req = core.build_request("app", b"tar", build_args={"A": "1", "B": "x=y"}, no_cache=True, network=False,
                             host_ca_certs=True, ready_timeout=5)  # fmt: skip
    assert req.headers == {"Content-Type": "application/x-tar"} and req.body == b"tar"
    assert req.target == (
        "/v1/images/build?name=app&dockerfile=Dockerfile&build_arg=A%3D1&build_arg=B%3Dx%3Dy&ready_timeout=5"
        "&no_cache=true&network=false&host_ca_certs=true"
    )
    body, headers = core.exec_request("vm-1", ["cat"], stdin=True).encoded()
    assert json.loads(body) == {"argv": ["cat"], "env": {}, "cwd": "", "user": "", "timeout_s": 0, "stdin": True}
    assert headers == {"Content-Type": "application/json"}


@pytest.mark.parametrize(
    ("status", "body", "cls"),
    [
        (404, {"error": "VmNotFound", "message": "no VM"}, errors.NotFound),
        (404, {"error": "WebhookNotFound", "message": "no"}, errors.NotFound),
        (409, {"error": "InvalidStateTransition", "message": "suspended"}, errors.InvalidState),
        (409, {"error": "IdempotencyConflict", "message": "x"}, errors.IdempotencyConflict),
        (409, {"error": "StaleSnapshot", "message": "x"}, errors.Conflict),
        (400, {"error": "InvalidRequest", "message": "x"}, errors.InvalidRequest),
        (413, {"error": "PayloadTooLarge", "message": "x"}, errors.PayloadTooLarge),
        (401, {"error": "Unauthorized", "message": "x"}, errors.Unauthorized),
        (403, {"error": "Forbidden", "message": "x"}, errors.Forbidden),
        (422, {"error": "GuestError", "message": "x"}, errors.GuestError),
        (422, {"error": "BuildFailed", "message": "x"}, errors.BuildFailed),
        (503, {"error": "AgentUnavailable", "message": "x"}, errors.Unavailable),
        (507, {"error": "ResourceExhausted", "message": "x"}, errors.InsufficientStorage),
        (500, {"error": "InternalError", "message": "id 1"}, errors.ServerError),
        (502, {"error": "Whatever", "message": "x"}, errors.ServerError),
        (418, {"error": "Teapot", "message": "x"}, errors.ApiError),
        (404, {"detail": "Not Found"}, errors.NotFound),  # a route that does not exist
    ],
)
def test_errors_are_rebuilt_from_kind_then_status(status: int, body: dict[str, str], cls: type) -> None:
    with pytest.raises(errors.ApiError) as info:
        core.check(status, json.dumps(body).encode())
    assert type(info.value) is cls
    assert info.value.status == status and info.value.kind == body.get("error", "Error")
    assert str(info.value) == body.get("message", body.get("detail"))


def test_429s_carry_quota_figures_and_retry_after() -> None:
    body = {"error": "QuotaExceeded", "message": "max_running_vms 2 reached", "quota": "max_running_vms",
            "limit": 2, "current": 2}  # fmt: skip
    with pytest.raises(errors.QuotaExceeded) as quota:
        core.check(429, json.dumps(body).encode(), "7")
    assert (quota.value.quota, quota.value.limit, quota.value.current, quota.value.retry_after) == (
        "max_running_vms",
        2,
        2,
        7.0,
    )
    with pytest.raises(errors.RateLimited) as rate:
        core.check(429, json.dumps({"error": "RateLimited", "message": "slow", "retry_after": 3}).encode())
    assert rate.value.retry_after == 3.0 and isinstance(rate.value, errors.TooManyRequests)
    with pytest.raises(errors.TooManyRequests) as bare:
        core.check(429, b"not json", "x")
    assert bare.value.retry_after is None and str(bare.value) == "not json"


def test_an_error_inside_a_stream_keeps_its_kind() -> None:
    line = json.dumps({"error": "InvalidStateTransition", "message": "VM is SUSPENDED"}).encode()
    with pytest.raises(errors.InvalidState) as info:
        core.stream_line(line)
    assert (info.value.status, info.value.kind, str(info.value)) == (409, "InvalidStateTransition", "VM is SUSPENDED")
    with pytest.raises(errors.Unavailable):
        core.stream_line(b'{"error": "AgentUnavailable", "message": "gone"}\n')
    with pytest.raises(errors.ProtocolError):
        core.stream_line(b"[1, 2]\n")
    with pytest.raises(errors.ProtocolError):
        core.stream_line(b"{" + b" " * core.MAX_LINE + b"}")
    assert core.stream_line(b"\n") is None
    data = base64.b64encode(b"\x00hi").decode()
    assert core.exec_event({"stream": "stdout", "data": data}) == ExecOutput("stdout", b"\x00hi")
    assert core.exec_event({"exit_code": 3, "signal": 0, "timed_out": False}) == ExecExit(3, 0, False)


def test_typed_results_take_defaults_and_refuse_a_missing_required_field() -> None:
    vm = VmData(**VmData.fields_from({"id": "vm-1", "image": "debian", "state": "RUNNING",
                                      "accelerator": {"name": "tcg"}, "pid": None, "extra": 1}))  # fmt: skip
    assert (vm.id, vm.accelerator.name, vm.tenant, vm.tags, vm.pid, vm.raw["extra"]) == (
        "vm-1",
        "tcg",
        "default",
        {},
        None,
        1,
    )
    with pytest.raises(errors.ProtocolError, match="'state'"):
        VmData.fields_from({"id": "vm-1", "image": "debian", "accelerator": {"name": "kvm"}})
    with pytest.raises(errors.ProtocolError):
        core.tenant_list().read({"not": "a list"})
    usage = core.usage().read({"since": "a", "until": "b", "tenants": [{"tenant": "t", "builds": 2}], "vms": []})
    assert usage.tenants[0].builds == 2 and usage.tenants[0].running_vcpu_seconds == 0.0


def test_a_retried_key_creation_decodes_without_its_secrets() -> None:
    # the daemon shows a key's secrets once: a retry with the same client_token answers the key without them
    retried = {"key_id": "key-1", "tenant": "acme", "name": "", "access_key_id": "AKIA1", "created_at": "t",
               "revoked_at": None, "admin": False}  # fmt: skip
    key = core.key_create(tenant="acme", client_token="once").read(retried)
    assert (key.key_id, key.api_key, key.secret_access_key) == ("key-1", "", "")


def test_endpoint_comes_from_the_argument_then_settings(tmp_path: Path) -> None:
    base = Settings(data_dir=tmp_path, socket_path=tmp_path / "s.sock")
    assert core.endpoint(settings=base) == core.Endpoint(socket=str(tmp_path / "s.sock"))
    keyed = Settings(data_dir=tmp_path, url="http://10.0.0.5:7070/", api_key="ember_k")
    ep = core.endpoint(settings=keyed)
    assert (ep.base_url, ep.socket, ep.headers) == ("http://10.0.0.5:7070", "", {"Authorization": "Bearer ember_k"})
    assert core.endpoint("https://h.example", api_key="x", settings=keyed).base_url == "https://h.example:443"
    assert core.endpoint(settings=Settings(data_dir=tmp_path, api_key="k2")).headers == {"Authorization": "Bearer k2"}
    with pytest.raises(ValueError, match="EMBER_URL"):
        core.endpoint("ftp://h", settings=base)


def test_sync_and_async_clients_have_the_same_verbs() -> None:
    """Every verb of Client (and its groups and bound objects) is on AsyncClient with the same
    signature; the async one is a coroutine (or an async iterator for streams)."""
    from ember.sdk import aio, client

    pairs = [(client.Client, aio.AsyncClient), (client.Vm, aio.AsyncVm), (client.VmFiles, aio.AsyncVmFiles)]
    pairs += [(getattr(client, n), getattr(aio, "Async" + n)) for n in
              ("Vms", "Files", "Images", "Tenants", "Keys", "Webhooks", "Events")]  # fmt: skip
    checked = 0
    for sync_cls, async_cls in pairs:
        verbs = {n for n, v in vars(sync_cls).items() if callable(v) and not n.startswith("_")} - {"close"}
        assert verbs == {n for n, v in vars(async_cls).items() if callable(v) and not n.startswith("_")} - {"close"}
        for name in verbs:
            s, a = getattr(sync_cls, name), getattr(async_cls, name)
            assert inspect.signature(s).parameters.keys() == inspect.signature(a).parameters.keys(), name
            assert inspect.iscoroutinefunction(a) or inspect.isasyncgenfunction(a) or name in ("exec_events", "open"), (
                name
            )
            checked += 1
    assert checked > 40
    assert Client.__init__.__kwdefaults__ == AsyncClient.__init__.__kwdefaults__


def test_the_event_list_pages_with_the_daemons_parameter_name() -> None:
    """GET /v1/events takes ``after`` (an event id); the SDK sent ``since``, which the daemon ignored."""
    op = core.event_list(vm="vm-1", after=5, limit=10)
    assert (op.request.path, dict(op.request.params)) == ("/v1/events", {"vm": "vm-1", "after": 5, "limit": 10})
