"""Shell tokens without a VM: what a handshake offers (ember.ingress.shelltokens), the request guard taking one
instead of a key on the shell's WebSocket alone, and the ingress's routing of /ember/shell."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from ember.api.auth import PEER_UID, Authenticator
from ember.api.guard import BodyCaps, RequestGuard, TcpPolicy
from ember.config import Settings
from ember.db.store import connect
from ember.db.tenants import TenantStore
from ember.errors import Forbidden, InvalidRequest, Unauthorized
from ember.ingress.http import HeadError, route
from ember.ingress.shell import is_shell, refuse_token_on_proxy, shell_scope
from ember.ingress.shelltokens import (
    ACTOR,
    MAX_PROTOCOLS,
    SUBPROTOCOL,
    shell_credential,
    shell_principal,
)
from ember.ingress.tokens import NO_PORTS, Ports, TokenKind, TokenSigner
from ember.tenancy.principal import Principal
from ember.tenancy.ratelimit import RateLimiter

KEY = b"k" * 32
VM = "vm-0123abcd"


def token(*, vm: str = VM, kind: TokenKind = TokenKind.SHELL, offset_s: float = 0.0) -> str:
    ports = NO_PORTS if kind is TokenKind.SHELL else Ports(1, 65535)
    signer = TokenSigner(KEY, clock=lambda: time.time() + offset_s)
    return signer.issue(vm_id=vm, tenant="acme", kind=kind, ports=ports, minutes=5)[0]


def test_the_credential_in_a_subprotocol_or_the_query() -> None:
    t = token()
    offered = shell_credential(["lambda-microvms.authentication." + t, "lambda-microvms"], b"", authorization=False)
    assert (offered.token, offered.subprotocol) == (t, "lambda-microvms")
    offered = shell_credential(["x", "ember", "ember.authentication." + t], b"", authorization=False)
    assert (offered.token, offered.subprotocol) == (t, "ember")
    offered = shell_credential(["ember.authentication." + t], b"", authorization=False)
    assert offered.subprotocol is None  # never the token itself echoed back
    # the query form: the token leaves the query, the rest stays byte for byte
    query = b"command=sh&token=" + t.encode() + b"&rows=3&command=a%26b"
    offered = shell_credential([], query, authorization=False)
    assert offered.token == t and offered.query_string == b"command=sh&rows=3&command=a%26b"
    assert shell_credential(["ember"], b"rows=3", authorization=True) == (
        shell_credential(["ember"], b"rows=3", authorization=False)
    )  # no token: the key decides (the guard)
    assert shell_credential([], b"rows=3", authorization=True).token is None


@pytest.mark.parametrize(
    ("offered", "query", "key", "error", "words"),
    [
        (["ember.authentication.a", "lambda-microvms.authentication.b"], b"", False, Unauthorized, "one shell token"),
        (["ember.authentication.a"], b"token=b", False, Unauthorized, "one shell token"),
        ([], b"token=a&token=a", False, Unauthorized, "one shell token"),
        ([], b"%74oken=a&token=b", False, Unauthorized, "one shell token"),  # an encoded name is the same name
        (["ember.authentication.a"], b"", True, Unauthorized, "not both"),
        ([], b"token=a", True, Unauthorized, "not both"),
        (["ember", "x" * 5000], b"", False, InvalidRequest, "characters"),
        ([f"p{i}" for i in range(MAX_PROTOCOLS + 1)], b"", False, InvalidRequest, "subprotocols"),
    ],
)
def test_hostile_credentials(offered: list[str], query: bytes, key: bool, error: type, words: str) -> None:
    with pytest.raises(error, match=words):
        shell_credential(offered, query, authorization=key)


def test_a_shell_token_acts_as_its_vms_tenant_on_its_vms_shell_alone() -> None:
    signer = TokenSigner(KEY)
    assert shell_principal(signer, token(), f"/v1/vms/{VM}/shell") == Principal("acme", admin=False, key_id=ACTOR)
    refusals = [
        (token(vm="vm-ffff"), f"/v1/vms/{VM}/shell", Unauthorized, "another VM"),
        (token(), "/v1/vms/vm-ffff/shell", Unauthorized, "another VM"),
        (token(), f"/v1/vms/{VM}/exec", Unauthorized, "another VM"),
        (token(kind=TokenKind.PROXY), f"/v1/vms/{VM}/shell", Forbidden, "proxy token"),
        (token(offset_s=-3600), f"/v1/vms/{VM}/shell", Unauthorized, "expired"),
        (token()[:-3] + "AAA", f"/v1/vms/{VM}/shell", Unauthorized, "malformed"),
        ("emt1." + "A" * 2000, f"/v1/vms/{VM}/shell", Unauthorized, "malformed"),
        ("", f"/v1/vms/{VM}/shell", Unauthorized, "malformed"),
    ]
    for t, path, error, words in refusals:
        with pytest.raises(error, match=words):
            shell_principal(signer, t, path)
    # a proxy token is refused where a shell token is needed, and the other way round
    with pytest.raises(Forbidden, match="shell token cannot"):
        signer.verify(token(), kind=TokenKind.PROXY)


def guard(tmp_path: Path) -> tuple[RequestGuard, list[Any]]:
    seen: list[Any] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append((scope["type"], scope.get("ember.principal"), scope["query_string"], scope.get(SUBPROTOCOL)))
        if scope["type"] == "websocket":
            await send({"type": "websocket.accept"})
        else:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

    tenants = TenantStore(connect(tmp_path / "db"))
    auth = Authenticator(tenants, RateLimiter(1000.0, 1000))
    return RequestGuard(app, BodyCaps.from_settings(Settings()), TcpPolicy.for_listener("127.0.0.1:7070"), auth,
                        TokenSigner(KEY)), seen  # fmt: skip


async def handshake(g: RequestGuard, path: str, query: bytes, offered: list[str], uid: int | None) -> list[Any]:
    sent: list[Any] = []

    async def receive() -> dict[str, str]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "websocket", "path": path, "query_string": query, "headers": [(b"host", b"127.0.0.1:7070")],
             "subprotocols": offered, PEER_UID: uid, "extensions": {"websocket.http.response": {}}}  # fmt: skip
    await g(scope, receive, send)
    return sent


async def test_the_guard_takes_a_shell_token_on_the_shell_websocket_alone(tmp_path: Path) -> None:
    g, seen = guard(tmp_path)
    shell = f"/v1/vms/{VM}/shell"
    t = token()
    # a token and no key (not root): the shell opens as the VM's tenant, the token gone from the query
    assert await handshake(g, shell, b"rows=5&token=" + t.encode(), [], 1000) == [{"type": "websocket.accept"}]
    assert seen.pop() == ("websocket", Principal("acme", admin=False, key_id=ACTOR), b"rows=5", None)
    assert await handshake(g, shell, b"", ["ember.authentication." + t, "ember"], None)
    assert seen.pop()[3] == "ember"
    # root on the socket offering a bad token is refused all the same (the token decides)
    for bad, status in ((token(kind=TokenKind.PROXY), 403), (token(vm="vm-ffff"), 401), ("junk", 401)):
        sent = await handshake(g, shell, b"", ["ember.authentication." + bad], 0)
        assert sent[0]["type"] == "websocket.http.response.start" and sent[0]["status"] == status
        assert bad.encode() not in sent[1]["body"]
    sent = await handshake(g, shell, b"", ["ember", "y" * 5000], 0)
    assert sent[0]["status"] == 400
    # another WebSocket path is closed unanswered, token or not
    assert await handshake(g, f"/v1/vms/{VM}/exec", b"token=" + t.encode(), [], 1000) == [
        {"type": "websocket.close", "code": 1008}
    ]
    assert not seen
    # HTTP routes take no shell token: not as a bearer key, not in the query
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=g), base_url="http://127.0.0.1:7070") as c:
        assert (await c.get(f"/v1/vms/{VM}", headers={"authorization": f"Bearer {t}"})).status_code == 401
        assert (await c.get(f"/v1/vms/{VM}", params={"token": t})).status_code == 401
    assert not seen


def test_the_ingress_routes_ember_shell_and_keeps_tokens_from_apps() -> None:
    host_form = route(b"vm-0abc.localhost:7080", b"/ember/shell?token=x", [], "localhost")
    path_form = route(None, b"/vm/vm-0abc/ember/shell", [], "localhost")
    assert is_shell(host_form) and is_shell(path_form)
    assert not is_shell(route(None, b"/vm/vm-0abc/shell", [], "localhost"))
    assert not is_shell(route(None, b"/vm/vm-0abc/ember/shell/x", [], "localhost"))
    refuse_token_on_proxy([(b"sec-websocket-protocol", b"chat, v2.ember")])
    for value in (b"chat, ember.authentication.abc", b"lambda-microvms.authentication.abc"):
        with pytest.raises(Forbidden, match="only the VM's shell"):
            refuse_token_on_proxy([(b"sec-websocket-protocol", value)])
    upgrade = [(b"host", b"x"), (b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
               (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="), (b"sec-websocket-version", b"13")]  # fmt: skip

    def head(headers: list[tuple[bytes, bytes]]) -> bytes:
        return b"GET /ember/shell HTTP/1.1\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n"

    offered = [*upgrade, (b"sec-websocket-protocol", b"ember.authentication.abc, ember")]
    scope, _ = shell_scope(head(offered), offered, path_form, None)
    assert scope["path"] == "/v1/vms/vm-0abc/shell" and scope["subprotocols"] == ["ember.authentication.abc", "ember"]
    assert not [k for k, _ in scope["headers"] if k == b"sec-websocket-protocol"] and PEER_UID not in scope
    with pytest.raises(Unauthorized, match="takes a shell token"):
        with_key = [*upgrade, (b"authorization", b"Bearer k")]
        shell_scope(head(with_key), with_key, path_form, None)
    with pytest.raises(HeadError, match="a WebSocket"):
        shell_scope(head(upgrade[:1]), upgrade[:1], path_form, None)
    broken = [*upgrade[:4], (b"sec-websocket-version", b"8"), (b"sec-websocket-protocol", b"ember.authentication.a")]
    with pytest.raises(HeadError, match="malformed WebSocket handshake"):
        shell_scope(head(broken), broken, path_form, None)
