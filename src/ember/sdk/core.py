"""The SDK's pure request core: every verb's request and how its answer is read, once.

:class:`~ember.sdk.client.Client` and :class:`~ember.sdk.aio.AsyncClient` only send what is
built here (an :class:`Op`: a :class:`Request` and the function that turns the answer's JSON
into a typed result) and read NDJSON streams with :func:`stream_line`. Nothing here does I/O
except :func:`endpoint`, which reads the configuration (and, for a loopback URL, the daemon's
token file).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote, urlencode, urlsplit

from ember.config import Settings
from ember.sdk import types as t
from ember.sdk.errors import ProtocolError, api_error
from ember.sdk.types import decode, decode_list

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (2.5 ms of the CLI's start)
if TYPE_CHECKING:
    from typing import Any, Generic, TypeVar

    from ember.sdk.types import (
        ApiKey,
        AuthToken,
        CreatedKey,
        CreatedWebhook,
        Delivery,
        Event,
        ExecEvent,
        Image,
        Info,
        Listing,
        LogEvent,
        Process,
        Tenant,
        Transition,
        Usage,
        Webhook,
        Whoami,
    )

    T = TypeVar("T")
else:

    class Generic:
        """Op is generic for type checkers only: at run time, typing is not imported."""

        def __class_getitem__(cls, _: object) -> type:
            return cls

    T = None
Body = bytes | Iterable[bytes] | AsyncIterable[bytes]
MAX_LINE = 16 << 20  # longest NDJSON line the SDK reads (an exec output chunk, base64, is far shorter)
STDIN_CHUNK = 256 * 1024  # largest piece of an exec's stdin sent at once
STDIN_JOIN_S = 5.0  # after an exec ends, how long its stdin upload may take to finish
CONNECT_TIMEOUT_S = 30.0
TAR = "application/x-tar"


@dataclass(frozen=True)
class Request:
    """One API request: ``json`` or ``body`` (bytes, or chunks sent as they come), never both."""

    method: str
    path: str
    params: Mapping[str, Any] = field(default_factory=dict)
    json: Any = None
    body: Body | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def target(self) -> str:
        """The path with its query string."""
        qs = query(self.params)
        return f"{self.path}?{qs}" if qs else self.path

    def encoded(self) -> tuple[Body | None, dict[str, str]]:
        """(the body to send, the headers to send with it)."""
        if self.json is not None:
            return json.dumps(self.json).encode(), {"Content-Type": "application/json", **self.headers}
        return self.body, dict(self.headers)


@dataclass(frozen=True)
class Op(Generic[T]):
    """A verb: its request and the reader of its answer's JSON."""

    request: Request
    read: Callable[[Any], T]


def _nothing(_: Any) -> None:
    return None


def query(params: Mapping[str, Any]) -> str:
    """A query string: None is left out, booleans are true/false, lists repeat their key."""
    items: list[tuple[str, str]] = []
    for key, value in params.items():
        for v in value if isinstance(value, list | tuple) else [value]:
            if v is None:
                continue
            items.append((key, ("true" if v else "false") if isinstance(v, bool) else str(v)))
    return urlencode(items)


def seg(value: str) -> str:
    """One path segment from a caller's string: its '/', '?', '#' or a '..' cannot make another path."""
    return quote(value, safe="") if value not in (".", "..") else value.replace(".", "%2E")


# ---- answers ---------------------------------------------------------------------------------


def check(status: int, body: bytes, retry_after: str | None = None) -> None:
    """Raise the typed error of an error answer; nothing for a success."""
    if status < 400:
        return
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        data = {"error": "Error", "message": body.decode(errors="replace")[:2000] or f"HTTP {status}"}
    raise api_error(status, data, retry_after_header=retry_after)


def parse(body: bytes) -> Any:
    """A success's JSON (None for an empty body)."""
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        raise ProtocolError("the daemon's answer is not JSON") from None


def stream_line(line: bytes) -> dict[str, Any] | None:
    """One NDJSON event (None for a blank line); an error event raises its typed exception."""
    if len(line) > MAX_LINE:
        raise ProtocolError(f"the daemon sent a stream line over {MAX_LINE} bytes")
    if not line.strip():
        return None
    try:
        event = json.loads(line)
    except ValueError:
        raise ProtocolError("the daemon sent a stream line that is not JSON") from None
    if not isinstance(event, dict):
        raise ProtocolError("the daemon sent a stream line that is not a JSON object")
    if "error" in event:
        raise api_error(None, event)
    return event


def exec_event(event: Mapping[str, Any]) -> ExecEvent | None:
    """An exec stream's event as a typed one (None for one this SDK does not know)."""
    if "stream" in event:
        import base64  # only exec streams carry base64 (importing it costs ~0.7 ms of every start)

        return t.ExecOutput(str(event["stream"]), base64.b64decode(event.get("data", "")))
    if "exit_code" in event:
        return decode(t.ExecExit, event)
    return None


def log_event(event: Mapping[str, Any]) -> LogEvent | None:
    """An app log stream's event as a typed one (None for one this SDK does not know)."""
    if "data" in event:
        import base64

        return t.LogOutput(int(event.get("offset", 0)), base64.b64decode(event["data"]))
    if "skipped" in event:
        return t.LogSkipped(int(event.get("offset", 0)), int(event["skipped"]))
    return None


# ---- connection ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """Where the daemon is: ``socket`` (a Unix socket path) or ``scheme``://``host``:``port``, and the
    headers every request carries (the bearer key)."""

    scheme: str = "http"
    host: str = "ember"
    port: int = 80
    prefix: str = ""
    socket: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{self.prefix}"

    @property
    def where(self) -> str:
        return self.socket or self.base_url


def is_loopback(host: str) -> bool:
    """The host names this machine: localhost, 127.0.0.0/8 or ::1."""
    import ipaddress  # only for a TCP URL: the CLI's usual socket path never pays for it

    host = host.lower().strip("[]")
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_api_token(settings: Settings) -> str:
    """The daemon's admin token for its TCP listener (a root-only file); "" if unreadable here."""
    try:
        return settings.api_token_path.read_text().strip()
    except OSError:
        return ""


def endpoint(url: str | None = None, *, api_key: str | None = None, settings: Settings | None = None) -> Endpoint:
    """``url``, else Settings.url (EMBER_URL), else the Unix socket (EMBER_SOCKET); the key is ``api_key``,
    else Settings.api_key (EMBER_API_KEY), else for a loopback URL the daemon's token file (only sent there)."""
    settings = settings or Settings.from_env()
    url = url or settings.url
    key = api_key or settings.api_key
    if not url:
        return Endpoint(socket=str(settings.socket_path), headers=_auth(key))
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"EMBER_URL {url!r}: expected http://HOST:PORT or https://HOST[:PORT]")
    if not key and is_loopback(parts.hostname):
        key = read_api_token(settings)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return Endpoint(parts.scheme, host, port, parts.path.rstrip("/"), headers=_auth(key))


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def connect_hint(where: str, exc: BaseException) -> str:
    start = "start it with 'ember serve' (as root)" if where.startswith("/") else "is the daemon listening there?"
    return f"cannot reach the Ember daemon at {where} ({exc}); {start}, or point EMBER_URL / EMBER_SOCKET at it"


# ---- the verbs -------------------------------------------------------------------------------


def _vm_path(vm_id: str, *rest: str) -> str:
    return "/".join(["/v1/vms", seg(vm_id), *rest])


def _drop_none(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


@dataclass(frozen=True)
class IdlePolicy:
    """A VM's idle policy and lifetime (None: no limit). ``timeout_s``: suspend it once idle that long (at least
    60 s unless the daemon says less); ``auto_resume``: exec, file calls, shells and ingress requests resume it;
    ``suspended_ttl_s``: terminate it once suspended that long (0: terminate it instead of suspending it);
    ``max_duration_s``: terminate it that long after launch, suspended time included unless
    ``max_duration_running_only``."""

    timeout_s: int | None = None
    auto_resume: bool = False
    suspended_ttl_s: int | None = None
    max_duration_s: int | None = None
    max_duration_running_only: bool = False

    def fields(self) -> dict[str, Any]:
        """The run request's fields."""
        return _drop_none(
            idle_timeout_s=self.timeout_s, auto_resume=self.auto_resume or None, suspended_ttl_s=self.suspended_ttl_s,
            max_duration_s=self.max_duration_s, max_duration_running_only=self.max_duration_running_only or None,
        )  # fmt: skip


def vm_run(
    image: str, *, version: int | None = None, memory_mib: int | None = None, vcpus: int | None = None,
    env: Mapping[str, str] | None = None, tags: Mapping[str, str] | None = None, client_token: str | None = None,
    run_payload: str | None = None, idle: IdlePolicy | None = None, egress: str | None = None,
    allow: Sequence[str] | None = None,
) -> Request:  # fmt: skip
    body = _drop_none(
        image=image, version=version, memory_mib=memory_mib, vcpus=vcpus, env=dict(env) if env else None,
        tags=dict(tags) if tags else None, client_token=client_token, run_payload=run_payload,
        egress=egress, allow=list(allow) if allow else None, **(idle.fields() if idle else {}),
    )  # fmt: skip
    return Request("POST", "/v1/vms", json=body)


def vm_get(vm_id: str) -> Request:
    return Request("GET", _vm_path(vm_id))


def vm_list(
    *, state: str | None = None, image: str | None = None, tags: Mapping[str, str] | None = None, all: bool = False,
    tenant: str | None = None,
) -> Request:  # fmt: skip
    tag = [f"{k}={v}" for k, v in (tags or {}).items()]
    return Request("GET", "/v1/vms", _drop_none(state=state, image=image, tag=tag or None, all=all or None,
                                                tenant=tenant))  # fmt: skip


def vm_transition(vm_id: str, action: str) -> Op[Transition]:
    return Op(Request("POST", _vm_path(vm_id, action)), lambda data: decode(t.Transition, data))


def vm_snapshot(vm_id: str, name: str, *, client_token: str | None = None) -> Op[Image]:
    body = _drop_none(name=name, client_token=client_token)
    return Op(Request("POST", _vm_path(vm_id, "snapshot"), json=body), lambda data: decode(t.Image, data))


def vm_remove(vm_id: str) -> Op[None]:
    return Op(Request("DELETE", _vm_path(vm_id)), _nothing)


def vm_auth_token(vm_id: str, *, ports: int | str = 8080, minutes: int = 10) -> Op[AuthToken]:
    """A token for the VM's ingress: ``ports`` a port, a range ("8000-8100") or "all"; 1-60 minutes."""
    body = {"allowed_ports": ports, "expires_in_minutes": minutes}
    return Op(Request("POST", _vm_path(vm_id, "auth-tokens"), json=body), lambda data: decode(t.AuthToken, data))


def vm_events(vm_id: str) -> Op[list[Event]]:
    return Op(Request("GET", _vm_path(vm_id, "events")), lambda data: decode_list(t.Event, data))


def exec_request(
    vm_id: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str = "", user: str = "",
    timeout_s: float = 0, stdin: bool = False,
) -> Request:  # fmt: skip
    """Run a command; NDJSON events. With ``stdin`` the first event is ``{"stdin": ID}``: send the
    input as the body of :func:`exec_stdin_request` while reading the events (``exec`` does both)."""
    body: dict[str, Any] = {"argv": list(argv), "env": dict(env or {}), "cwd": cwd, "user": user,
                            "timeout_s": timeout_s}  # fmt: skip
    if stdin:
        body["stdin"] = True
    return Request("POST", _vm_path(vm_id, "exec"), json=body)


def process_start(
    vm_id: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str = "", user: str = ""
) -> Op[Process]:
    """Start ``argv`` in the background (its output goes to /dev/null: redirect it inside the command)."""
    body = {"argv": list(argv), "env": dict(env or {}), "cwd": cwd, "user": user}
    return Op(Request("POST", _vm_path(vm_id, "processes"), json=body), lambda data: decode(t.Process, data))


def process_list(vm_id: str) -> Op[list[Process]]:
    return Op(Request("GET", _vm_path(vm_id, "processes")), lambda data: decode_list(t.Process, data))


def process_kill(vm_id: str, pid: int, signal: str | int = "TERM") -> Op[None]:
    target = _vm_path(vm_id, "processes", str(int(pid)), "kill")
    return Op(Request("POST", target, json={"signal": signal}), _nothing)


def exec_stdin_request(vm_id: str, stdin_id: str, body: Body) -> Request:
    return Request("PUT", _vm_path(vm_id, "exec", "stdin", seg(stdin_id)), body=body)


def vm_logs(vm_id: str, *, follow: bool = False, tail: int | None = None) -> Request:
    """The app's output (NDJSON, read with :func:`log_event`); ``follow`` goes on with new output,
    ``tail`` starts at the last that many bytes."""
    return Request("GET", _vm_path(vm_id, "logs"), _drop_none(follow=follow or None, tail=tail))


def file_write(
    vm_id: str, path: str, data: Body, *, mode: int = 0o644, mkdirs: bool = False, user: str | None = None
) -> Op[int]:
    """Write ``data`` (bytes or chunks) to ``path`` in the VM; the answer is the bytes written. ``user``
    owns the file (None: the image's USER, else root); a relative ``path`` is under the image's WORKDIR."""
    params = {"path": path, "mode": mode, "mkdirs": mkdirs or None, "user": user}
    return Op(Request("PUT", _vm_path(vm_id, "files"), params, body=data), lambda data: int(data["bytes"]))


def file_read(vm_id: str, path: str) -> Request:
    return Request("GET", _vm_path(vm_id, "files"), {"path": path})


def file_ls(vm_id: str, path: str) -> Op[Listing]:
    def read(data: Any) -> Listing:
        entries = tuple(decode_list(t.FileEntry, data.get("entries") if isinstance(data, dict) else None))
        return decode(t.Listing, data, entries=entries)

    return Op(Request("GET", _vm_path(vm_id, "ls"), {"path": path}), read)


def image_list() -> Op[list[Image]]:
    return Op(Request("GET", "/v1/images"), lambda data: decode_list(t.Image, data))


def image_get(name: str) -> Op[Image]:
    return Op(Request("GET", f"/v1/images/{seg(name)}"), lambda data: decode(t.Image, data))


def image_prepare(name: str = "debian") -> Request:
    """Build a built-in base image if it is not built yet: NDJSON ``progress`` events, then ``image``."""
    return Request("POST", f"/v1/images/{seg(name)}/prepare")


def image_logs(name: str, *, tail: int | None = None) -> Request:
    return Request("GET", f"/v1/images/{seg(name)}/logs", _drop_none(tail=tail))


def image_remove(name: str, *, all_versions: bool = False) -> Op[None]:
    return Op(Request("DELETE", f"/v1/images/{seg(name)}", {"all": True} if all_versions else {}), _nothing)


def build_request(
    name: str, context: Body, *, dockerfile: str = "Dockerfile", build_args: Mapping[str, str] | None = None,
    target: str = "", ready_cmd: str = "", ready_timeout: float | None = None, no_cache: bool = False,
    network: bool = True, host_ca_certs: bool = False, client_token: str | None = None,
) -> Request:  # fmt: skip
    """Build image ``name`` (name or name:version) from ``context``, a tar (bytes or chunks): NDJSON
    ``log`` events, then ``build``."""
    params = _drop_none(
        name=name, dockerfile=dockerfile, build_arg=[f"{k}={v}" for k, v in (build_args or {}).items()] or None,
        target=target or None, ready_cmd=ready_cmd or None, ready_timeout=ready_timeout, no_cache=no_cache or None,
        network=None if network else False, host_ca_certs=host_ca_certs or None, client_token=client_token,
    )  # fmt: skip
    return Request("POST", "/v1/images/build", params, body=context, headers={"Content-Type": TAR})


def tenant_create(name: str, *, quotas: Mapping[str, int] | None = None) -> Op[Tenant]:
    body = _drop_none(name=name, quotas=dict(quotas) if quotas else None)
    return Op(Request("POST", "/v1/tenants", json=body), lambda data: decode(t.Tenant, data))


def tenant_list() -> Op[list[Tenant]]:
    return Op(Request("GET", "/v1/tenants"), lambda data: decode_list(t.Tenant, data))


def tenant_get(name: str) -> Op[Tenant]:
    return Op(Request("GET", f"/v1/tenants/{seg(name)}"), lambda data: decode(t.Tenant, data))


def tenant_set_quotas(name: str, quotas: Mapping[str, int]) -> Op[Tenant]:
    req = Request("PATCH", f"/v1/tenants/{seg(name)}", json={"quotas": dict(quotas)})
    return Op(req, lambda data: decode(t.Tenant, data))


def key_create(
    *, tenant: str | None = None, name: str | None = None, client_token: str | None = None
) -> Op[CreatedKey]:
    body = _drop_none(tenant=tenant, name=name, client_token=client_token)
    return Op(Request("POST", "/v1/keys", json=body), lambda data: decode(t.CreatedKey, data))


def key_list(*, tenant: str | None = None) -> Op[list[ApiKey]]:
    return Op(Request("GET", "/v1/keys", _drop_none(tenant=tenant)), lambda data: decode_list(t.ApiKey, data))


def key_revoke(key_id: str) -> Op[None]:
    return Op(Request("DELETE", f"/v1/keys/{seg(key_id)}"), _nothing)


def webhook_create(url: str, *, client_token: str | None = None) -> Op[CreatedWebhook]:
    body = _drop_none(url=url, client_token=client_token)
    return Op(Request("POST", "/v1/webhooks", json=body), lambda data: decode(t.CreatedWebhook, data))


def webhook_list() -> Op[list[Webhook]]:
    return Op(Request("GET", "/v1/webhooks"), lambda data: decode_list(t.Webhook, data))


def webhook_get(webhook_id: str) -> Op[Webhook]:
    return Op(Request("GET", f"/v1/webhooks/{seg(webhook_id)}"), lambda data: decode(t.Webhook, data))


def webhook_delete(webhook_id: str) -> Op[None]:
    return Op(Request("DELETE", f"/v1/webhooks/{seg(webhook_id)}"), _nothing)


def webhook_deliveries(webhook_id: str, *, limit: int | None = None) -> Op[list[Delivery]]:
    req = Request("GET", f"/v1/webhooks/{seg(webhook_id)}/deliveries", _drop_none(limit=limit))
    return Op(req, lambda data: decode_list(t.Delivery, data))


def event_list(*, vm: str | None = None, after: int | None = None, limit: int | None = None) -> Op[list[Event]]:
    req = Request("GET", "/v1/events", _drop_none(vm=vm, after=after, limit=limit))
    return Op(req, lambda data: decode_list(t.Event, data))


def usage(*, tenant: str | None = None, since: str | None = None, until: str | None = None) -> Op[Usage]:
    return Op(Request("GET", "/v1/usage", _drop_none(tenant=tenant, since=since, until=until)), t.Usage.from_json)


def whoami() -> Op[Whoami]:
    return Op(Request("GET", "/v1/whoami"), lambda data: decode(t.Whoami, data))


def info() -> Op[Info]:
    def read(data: Any) -> Info:
        accel = decode(t.Accelerator, data.get("accelerator") if isinstance(data, dict) else None)
        return decode(t.Info, data, accelerator=accel)

    return Op(Request("GET", "/v1/info"), read)


def stdin_chunks(data: bytes | Iterable[bytes]) -> Iterable[bytes]:
    """Input for an exec in pieces of at most STDIN_CHUNK bytes."""
    for chunk in [data] if isinstance(data, bytes) else data:
        for i in range(0, len(chunk), STDIN_CHUNK):
            yield chunk[i : i + STDIN_CHUNK]
