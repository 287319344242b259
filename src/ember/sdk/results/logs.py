"""A VM's app log (its ENTRYPOINT/CMD's stdout and stderr, as the guest keeps them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LogOutput:
    """Bytes of the app's output; ``offset`` counts every byte the app wrote before them."""

    offset: int
    data: bytes


@dataclass(frozen=True)
class LogSkipped:
    """``skipped`` bytes before ``offset`` were overwritten (the log keeps its newest bytes) before they were read."""

    offset: int
    skipped: int


LogEvent = LogOutput | LogSkipped
