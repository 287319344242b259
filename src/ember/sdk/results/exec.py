"""A command's output and exit status; background processes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExecOutput:
    """Output of a running command: ``stream`` is "stdout" or "stderr"."""

    stream: str
    data: bytes


@dataclass(frozen=True)
class ExecExit:
    exit_code: int
    signal: int = 0
    timed_out: bool = False


ExecEvent = ExecOutput | ExecExit


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    signal: int
    timed_out: bool
    stdout: bytes
    stderr: bytes


@dataclass(frozen=True)
class Process:
    """A background process (started with ``start_process``): ``exit_code`` and ``signal`` once it exited."""

    pid: int
    command: str
    started_at: str
    running: bool
    exit_code: int | None = None
    signal: int | None = None
