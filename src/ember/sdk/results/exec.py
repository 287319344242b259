"""A command's output and exit status."""

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
