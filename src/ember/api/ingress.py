"""``POST /v1/vms/{id}/auth-tokens``: a VM auth token for the ingress (:mod:`ember.ingress.tokens`);
``POST /v1/vms/{id}/shell-tokens``: a shell token (:mod:`ember.ingress.shelltokens`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI
from pydantic import BaseModel, ConfigDict, Field

from ember.api.schema import errors
from ember.errors import InvalidStateTransition
from ember.ingress.tokens import MAX_MINUTES, MIN_MINUTES, NO_PORTS, Grant, Ports, TokenKind
from ember.models import VmRecord, VmState

if TYPE_CHECKING:
    from ember.config import Settings
    from ember.daemon import Daemon


class TokenBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expires_in_minutes: int = Field(default=10, ge=MIN_MINUTES, le=MAX_MINUTES, description="The token's lifetime")
    allowed_ports: int | str = Field(
        default=8080, description='The guest ports it opens: a port (8080), a range ("8000-8100"), or "all"'
    )


class AuthToken(BaseModel):
    token: str = Field(description="Send it as X-Ember-Proxy-Auth (or X-aws-proxy-auth) to the ingress")
    kind: str
    vm_id: str
    expires_at: str
    allowed_ports: str = Field(description='"8080", "8000-8100" or "all"')
    endpoint: str | None = Field(description="The VM's ingress address (null: the daemon has no ingress)")


class ShellTokenBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expires_in_minutes: int = Field(default=10, ge=MIN_MINUTES, le=MAX_MINUTES, description="The token's lifetime")


class ShellToken(BaseModel):
    token: str = Field(
        description="Offer it as the WebSocket subprotocol ember.authentication.<token> (with 'ember'), or send "
        "it as the token query parameter, to the VM's shell"
    )
    kind: str
    vm_id: str
    expires_at: str
    url: str | None = Field(description="The shell on the ingress (null: the daemon has no ingress)")


def shell_url(settings: Settings, vm_id: str) -> str | None:
    """``ws://<vm-id>.<EMBER_INGRESS_DOMAIN>:<port>/ember/shell``, or None without an ingress listener."""
    base = endpoint(settings, vm_id)
    return None if base is None else "ws" + base.removeprefix("http") + "ember/shell"


def endpoint(settings: Settings, vm_id: str) -> str | None:
    """``http://<vm-id>.<EMBER_INGRESS_DOMAIN>:<port>/``, or None without an ingress listener."""
    if not settings.ingress_listen:
        return None
    port = settings.ingress_listen.rpartition(":")[2]
    return f"http://{vm_id}.{settings.ingress_domain}:{port}/"


# the AWS API's ingress connectors (ember.aws.microvms): a VM it ran without one takes no token of that kind
CONNECTOR = {TokenKind.PROXY: "ALL_INGRESS", TokenKind.SHELL: "SHELL_INGRESS"}


def issue_token(daemon: Daemon, vm: VmRecord, kind: TokenKind, ports: Ports, minutes: int) -> tuple[str, Grant]:
    """A token of ``kind`` for ``vm`` (the /v1 routes' and the AWS API's): none for a TERMINATED VM, nor for a
    VM the AWS API ran without the ingress connector of that kind."""
    opens = "endpoint" if kind is TokenKind.PROXY else "shell"
    if vm.state is VmState.TERMINATED:
        raise InvalidStateTransition(f"VM {vm.id} is TERMINATED: it has no {opens}")
    if vm.aws and CONNECTOR[kind] not in vm.aws.get("ingress", ()):
        raise InvalidStateTransition(
            f"VM {vm.id} was run without the {CONNECTOR[kind]} ingress connector: its {opens} is closed "
            f"(run a microVM with ingressNetworkConnectors=['{CONNECTOR[kind]}'])"
        )
    return daemon.tokens.issue(vm_id=vm.id, tenant=vm.tenant, kind=kind, ports=ports, minutes=minutes)


def add_token_routes(app: FastAPI, daemon: Daemon, owned_vm: Any) -> None:
    @app.post("/v1/vms/{vm_id}/auth-tokens", status_code=201, response_model=AuthToken, responses=errors(409))
    async def create_auth_token(body: TokenBody, vm: VmRecord = Depends(owned_vm)) -> dict[str, Any]:
        """A token for the VM's ingress endpoint: the ports it allows, for 1-60 minutes. It is checked by
        its signature alone: it cannot be revoked, except by removing the VM (or EMBER_INGRESS_KEY_FILE)."""
        ports = Ports.parse(body.allowed_ports)
        token, grant = issue_token(daemon, vm, TokenKind.PROXY, ports, body.expires_in_minutes)
        expires = datetime.fromtimestamp(grant.expires_at, UTC).isoformat(timespec="seconds")
        return {"token": token, "kind": grant.kind.value, "vm_id": vm.id, "expires_at": expires,
                "allowed_ports": str(ports), "endpoint": endpoint(daemon.settings, vm.id)}  # fmt: skip

    @app.post("/v1/vms/{vm_id}/shell-tokens", status_code=201, response_model=ShellToken, responses=errors(409))
    async def create_shell_token(body: ShellTokenBody, vm: VmRecord = Depends(owned_vm)) -> dict[str, Any]:
        """A token that opens this VM's shell (and nothing else) for 1-60 minutes, as AWS's
        CreateMicrovmShellAuthToken: on the API's shell route or the ingress's, without an API key."""
        token, grant = issue_token(daemon, vm, TokenKind.SHELL, NO_PORTS, body.expires_in_minutes)
        expires = datetime.fromtimestamp(grant.expires_at, UTC).isoformat(timespec="seconds")
        return {"token": token, "kind": grant.kind.value, "vm_id": vm.id, "expires_at": expires,
                "url": shell_url(daemon.settings, vm.id)}  # fmt: skip
