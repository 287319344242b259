"""What a build VM answers the builder is hostile: its passwd/group for --chown, and how long it takes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from ember.build.builder import _owner
from ember.build.buildvm import BuildVm, Deadlines
from ember.build.dockerfile import DockerfileError, Instruction
from ember.errors import BuildFailed

COPY = Instruction("COPY", 3, "COPY --chown=x f /f", (), ("f", "/f"), False)


def guest(files: dict[str, bytes], *, delay: float = 0.0) -> Any:
    async def read_file(path: str) -> tuple[int, AsyncIterator[bytes]]:
        data = files[path.rsplit("/", 1)[-1]]

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(data), 4096):
                await asyncio.sleep(delay)
                yield data[i : i + 4096]

        return len(data), chunks()

    return SimpleNamespace(agent=SimpleNamespace(read_file=read_file))


@pytest.mark.parametrize(
    ("spec", "files", "match"),
    [
        ("4294967296", {}, "ids above"),
        ("²", {"passwd": b"root:x:0:0::/root:/bin/sh\n"}, "no user '²'"),
        ("app", {"passwd": b"app:x:\xd9\xa3:0::/:/bin/sh\n"}, "not a number"),  # an Arabic-Indic digit
        ("app", {"passwd": b"x" * (2 << 20)}, "larger than 1048576 bytes"),
    ],
)
async def test_chown_ids_are_ascii_numbers_in_range_and_passwd_is_bounded(
    spec: str, files: dict[str, bytes], match: str
) -> None:
    with pytest.raises(DockerfileError, match=match):
        await _owner(guest(files), spec, COPY)


async def test_a_build_vm_that_stops_answering_is_killed_at_the_tool_deadline() -> None:
    """A hijacked PID 1 sending one byte every 29 s kept a build (and its slot) forever."""
    vm = BuildVm.__new__(BuildVm)
    vm.deadlines = Deadlines(boot_s=1, tool_s=0.2)
    stopped: list[bool] = []

    async def stop() -> None:
        stopped.append(True)

    vm.stop = stop  # type: ignore[method-assign]
    slow = guest({"passwd": b"app:x:7:7::/:/bin/sh\n" * 1000}, delay=0.1)
    with pytest.raises(BuildFailed, match="EMBER_BUILD_TOOL_TIMEOUT"):
        await vm.within("--chown=app", _owner(slow, "app", COPY))
    assert stopped == [True]
