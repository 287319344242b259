"""Background processes: ``POST /v1/vms/{id}/processes`` starts one (stdio on /dev/null: redirect
inside the command to keep its output), ``GET`` lists them, ``POST .../processes/{pid}/kill`` signals
one. The agent tracks at most 64 (an exited one gives its place to a new one) and signals only
those: another process of the guest is a 404, as is a process that already exited.
"""

from __future__ import annotations

import errno
import signal as signals
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, Path, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from ember.agent import ExecRequest
from ember.agentproc import GuestProcess, kill_process, list_processes, start_detached
from ember.api.schema import errors
from ember.errors import GuestError, InvalidRequest, ProcessNotFound
from ember.imagecfg import exec_settings
from ember.models import VmRecord

if TYPE_CHECKING:
    from ember.daemon import Daemon

EnvName = Annotated[str, StringConstraints(pattern=r"^[^=]+$")]


class StartBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    argv: list[str] = Field(min_length=1, max_length=1000)
    env: dict[EnvName, str] = Field(default_factory=dict)
    cwd: str = ""
    user: str = ""


class KillBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    signal: str | int = Field(default="TERM", description="A name (TERM, KILL, INT, HUP, SIGUSR1...) or 1-64")


class Process(BaseModel):
    pid: int
    command: str = Field(description="The command line (arguments joined by spaces, at most 255 bytes)")
    started_at: str
    running: bool
    exit_code: int | None = Field(description="None while it runs; -1 when a signal ended it")
    signal: int | None = Field(description="The signal that ended it (0: none); None while it runs")


def parse_signal(value: str | int) -> int:
    """A signal by name (TERM, SIGTERM, any case) or number (1-64)."""
    if isinstance(value, int) or (value.isascii() and value.isdigit()):  # "²" is a digit int() refuses
        number = int(value)
        if not 1 <= number <= 64:
            raise InvalidRequest(f"signal {number}: signals are 1-64")
        return number
    name = value.upper().removeprefix("SIG")
    found = getattr(signals.Signals, f"SIG{name}", None) if name.isalnum() else None
    if found is None:
        raise InvalidRequest(f"unknown signal {value[:20]!r}: use a name such as TERM, KILL, INT, HUP, or a number")
    return int(found)


def process_view(p: GuestProcess) -> dict[str, Any]:
    started = datetime.fromtimestamp(p.started_ns / 1e9, UTC).isoformat(timespec="milliseconds")
    return {"pid": p.pid, "command": p.command, "started_at": started, "running": p.running,
            "exit_code": p.exit_code, "signal": p.signal}  # fmt: skip


def add_process_routes(app: FastAPI, daemon: Daemon, owned_vm: Any) -> None:
    engine = daemon.engine

    @app.post("/v1/vms/{vm_id}/processes", status_code=201, response_model=Process, responses=errors(409, 422, 503))
    async def start_process(body: StartBody, vm: VmRecord = Depends(owned_vm)) -> dict[str, Any]:
        """Start a command in the background (the image's ENV, then the VM's ``env``, then the request's; the image's
        WORKDIR and USER unless given)."""
        run = exec_settings(engine.image_defaults(vm), vm.env, body.env, cwd=body.cwd, user=body.user)
        req = ExecRequest(argv=body.argv, env=list(run.env), cwd=run.cwd, user=run.user)
        async with engine.using(vm.id, "start processes in") as agent:
            pid = await start_detached(agent, req)
        started = datetime.now(UTC).isoformat(timespec="milliseconds")  # as it started (GET: how it is now)
        return {"pid": pid, "command": " ".join(body.argv)[:255], "started_at": started, "running": True,
                "exit_code": None, "signal": None}  # fmt: skip

    @app.get("/v1/vms/{vm_id}/processes", response_model=list[Process], responses=errors(409, 503))
    async def get_processes(vm: VmRecord = Depends(owned_vm)) -> list[dict[str, Any]]:
        """The background processes, oldest first: running ones, and exited ones with their status."""
        async with engine.using(vm.id, "list processes in") as agent:
            return [process_view(p) for p in await list_processes(agent)]

    @app.post("/v1/vms/{vm_id}/processes/{pid}/kill", status_code=204, responses=errors(409, 503))
    async def kill(body: KillBody, vm: VmRecord = Depends(owned_vm), pid: int = Path(ge=1, le=2**31 - 1)) -> Response:
        """Signal a running background process and its process group (default TERM)."""
        number = parse_signal(body.signal)
        try:
            async with engine.using(vm.id, "signal processes in") as agent:
                await kill_process(agent, pid, number)
        except GuestError as exc:
            if exc.errno == errno.ESRCH:
                raise ProcessNotFound(pid) from None
            raise
        return Response(status_code=204)
