"""The request guard (body caps, TCP token/Host/Origin), the API token file and the client's side of them."""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request
from pydantic import BaseModel

from ember.api.auth import Authenticator
from ember.api.guard import BodyCaps, RequestGuard, TcpPolicy
from ember.config import Settings
from ember.daemon import api_token
from ember.db.store import connect
from ember.db.tenants import TenantStore
from ember.errors import HostSetupError
from ember.ingress.tokens import TokenSigner
from ember.sdk.core import build_request, endpoint
from ember.tenancy.keys import token_hash
from ember.tenancy.ratelimit import RateLimiter

TOKEN = "t" * 43


class Body(BaseModel):
    text: str


def authenticator(db: Path) -> Authenticator:
    """The real authenticator on a real store, with ``TOKEN`` as an admin key (the api-token file's)."""
    tenants = TenantStore(connect(db))
    tenants.put_admin_key("key-admin-file", token_hash(TOKEN))
    return Authenticator(tenants, RateLimiter(1000.0, 1000))


def guarded(tcp: TcpPolicy | None, db: Path) -> tuple[RequestGuard, list[int]]:
    """A small app behind the guard; ``seen`` records the body bytes each upload route read."""
    app = FastAPI()
    seen: list[int] = []

    @app.post("/v1/vms/{vm_id}/snapshot")
    async def json_route(vm_id: str, body: Body) -> dict[str, int]:
        return {"len": len(body.text)}

    @app.put("/v1/vms/{vm_id}/files")
    async def upload(vm_id: str, request: Request) -> dict[str, int]:
        n = 0
        async for chunk in request.stream():
            n += len(chunk)
        seen.append(n)
        return {"bytes": n}

    @app.get("/v1/vms")
    async def ps() -> list[str]:
        return []

    caps = BodyCaps.from_settings(
        Settings(max_json_body_bytes=1000, max_build_context_bytes=5000, max_file_upload_bytes=3000)
    )
    return RequestGuard(app, caps, tcp, authenticator(db), TokenSigner(b"k" * 32)), seen


def http(app: RequestGuard, host: str = "127.0.0.1:7070", *, key: bool = True) -> httpx.AsyncClient:
    headers = {"authorization": f"Bearer {TOKEN}"} if key else {}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=f"http://{host}", headers=headers)


async def chunks(n: int, size: int) -> AsyncIterator[bytes]:
    for _ in range(n):
        yield b"x" * size


async def test_content_length_over_the_route_cap_is_refused_before_the_body_is_read(tmp_path: Path) -> None:
    app, seen = guarded(None, tmp_path / "db")
    async with http(app) as c:
        r = await c.post("/v1/vms/x/snapshot", json={"text": "a" * 2000})
        assert r.status_code == 413
        assert r.json()["error"] == "PayloadTooLarge"
        assert "EMBER_MAX_JSON_BODY_BYTES" in r.json()["message"] and "ember cp" in r.json()["message"]
        assert r.headers["connection"] == "close"
        assert (await c.post("/v1/vms/x/snapshot", json={"text": "a" * 100})).json() == {"len": 100}
        r = await c.put("/v1/vms/x/files", content=b"x" * 3001)
        assert r.status_code == 413 and "EMBER_MAX_FILE_UPLOAD_BYTES" in r.json()["message"]
        assert seen == []  # the route never ran
        assert (await c.put("/v1/vms/x/files", content=b"x" * 3000)).json() == {"bytes": 3000}
    caps = app.caps
    assert caps.for_route("PUT", "/v1/vms/vm-1/exec/stdin/abc") is caps.file_upload  # streamed stdin
    assert caps.for_route("POST", "/v1/images/build") is caps.build_context
    assert caps.for_route("POST", "/v1/vms/vm-1/exec") is caps.json


async def test_a_streamed_body_is_cut_off_at_the_cap(tmp_path: Path) -> None:
    app, seen = guarded(None, tmp_path / "db")
    async with http(app) as c:
        r = await c.put("/v1/vms/x/files", content=chunks(10, 1000))  # chunked: no Content-Length
        assert r.status_code == 413
        assert "passed the cap while streaming" in r.json()["message"]
        assert seen == []
        r = await c.post("/v1/vms/x/snapshot", content=chunks(3, 1000), headers={"content-type": "application/json"})
        assert r.status_code == 413  # whatever the JSON route made of its cut body, the answer is ours


async def test_tcp_listener_wants_a_key_its_own_host_and_no_foreign_origin(tmp_path: Path) -> None:
    app, _ = guarded(TcpPolicy.for_listener("127.0.0.1:7070"), tmp_path / "db")
    ok = {"authorization": f"Bearer {TOKEN}"}
    async with http(app, key=False) as c:
        r = await c.get("/v1/vms")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert "ember key create" in r.json()["message"]
        assert (await c.get("/v1/vms", headers={"authorization": "Bearer " + "u" * 43})).status_code == 401
        assert (await c.get("/v1/vms", headers={"authorization": f"Basic {TOKEN}"})).status_code == 401
        assert (await c.get("/v1/vms", headers=ok)).status_code == 200
        assert (await c.get("/v1/vms", headers={**ok, "origin": "http://127.0.0.1:7070"})).status_code == 200
        for bad in ({"host": "evil.example:7070"}, {"host": "127.0.0.1:7071"}, {"host": "127.0.0.1"},
                    {"origin": "http://evil.example"}, {"origin": "null"}):  # fmt: skip
            r = await c.get("/v1/vms", headers={**ok, **bad})
            assert r.status_code == 403, bad
            assert r.json()["error"] == "Forbidden"
        # an unauthenticated client never learns the body cap
        assert (await c.put("/v1/vms/x/files", content=b"x" * 5000)).status_code == 401
    async with http(app, "localhost:7070", key=False) as c:
        assert (await c.get("/v1/vms", headers=ok)).status_code == 200
    async with http(app, "[::1]:7070", key=False) as c:
        assert (await c.get("/v1/vms", headers=ok)).status_code == 200


async def test_a_listener_on_every_address_takes_ip_literals_but_no_dns_name() -> None:
    policy = TcpPolicy.for_listener("0.0.0.0:7070")
    ok = [("authorization", f"Bearer {TOKEN}")]
    assert policy.refusal([("host", "10.1.2.3:7070"), *ok]) is None
    assert policy.refusal([("host", "[fd00::1]:7070"), *ok]) is None
    assert policy.refusal([("host", "rebind.evil.example:7070"), *ok]) is not None
    assert policy.refusal([("host", "10.1.2.3:7070"), ("host", "evil:7070"), *ok]) is not None


def test_api_token_file_is_root_only_made_once_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "run" / "api-token"
    token = api_token(path)
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid() == 0
    assert len(token) >= 32 and api_token(path) == token  # reused across restarts
    assert [p.name for p in path.parent.iterdir()] == ["api-token"]  # no temporary file left
    os.chmod(path, 0o644)
    with pytest.raises(HostSetupError, match="root-only"):
        api_token(path)
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(HostSetupError):
        api_token(path)


def test_client_sends_the_token_over_tcp_and_builds_as_tar(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, socket_path=tmp_path / "ember.sock")
    token = api_token(settings.api_token_path)
    assert endpoint("http://127.0.0.1:7070", settings=settings).headers == {"Authorization": f"Bearer {token}"}
    assert endpoint(None, settings=settings).headers == {}  # the Unix socket needs none
    given = endpoint("http://127.0.0.1:7070", api_key="given", settings=settings)
    assert given.headers == {"Authorization": "Bearer given"}
    assert build_request("app", b"tar").headers == {"Content-Type": "application/x-tar"}


def test_client_sends_the_token_file_only_to_a_loopback_address(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, socket_path=tmp_path / "ember.sock")
    bearer = {"Authorization": f"Bearer {api_token(settings.api_token_path)}"}
    for url in ("http://127.0.0.1:7070", "http://127.3.2.1:7070", "http://[::1]:7070", "http://LocalHost:7070"):
        assert endpoint(url, settings=settings).headers == bearer, url
    for url in (
        "http://10.1.2.3:7070", "http://[fd00::1]:7070", "http://0.0.0.0:7070", "http://ember.example:7070",
        "http://localhost.evil.example:7070", "http://127.0.0.1.evil.example:7070",
    ):  # fmt: skip
        assert endpoint(url, settings=settings).headers == {}, url  # the local root-only token stays local
    given = endpoint("http://10.1.2.3:7070", api_key="given", settings=settings)
    assert given.headers == {"Authorization": "Bearer given"}
