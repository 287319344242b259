"""Build concurrency, ready_timeout bounds, the build log cap and layer claims (pure logic)."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from ember.build.layers import LayerCache
from ember.build.service import (
    BuildLog,
    BuildRequest,
    BuildService,
    BuildSlots,
    check_ready_timeout,
    concurrent_builds,
    split_name,
)
from ember.config import Settings
from ember.db.store import Store
from ember.errors import InvalidRequest, NameTaken
from ember.host.qemuimg import QemuImg
from ember.models import BuildState


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 0.0, -1.0, 3600.5])
def test_ready_timeout_outside_0_to_3600_is_refused(bad: float) -> None:
    with pytest.raises(InvalidRequest, match="ready_timeout"):
        check_ready_timeout(bad)


def test_ready_timeout_in_range_is_accepted() -> None:
    for good in (0.1, 120.0, 3600.0):
        check_ready_timeout(good)


def test_concurrent_builds_follow_setting_and_memory() -> None:
    s = Settings(max_builds=3, build_memory_mib=1024, vmm_overhead_mib=256)
    assert concurrent_builds(s, 64 * 1024) == 3
    assert concurrent_builds(s, 2 * 1280 + 10) == 2  # what memory holds
    assert concurrent_builds(s, 100) == 1  # always at least one
    assert concurrent_builds(s, 0) == 3  # unknown memory: the setting


async def test_slots_queue_in_order_and_say_how_many_are_ahead() -> None:
    slots = BuildSlots(2)
    order: list[str] = []
    ahead: dict[str, int] = {}
    gates = {name: asyncio.Event() for name in "abcd"}

    async def job(name: str) -> None:
        async with slots.slot(lambda n: ahead.__setitem__(name, n)):
            order.append(name)
            await gates[name].wait()

    tasks = {name: asyncio.create_task(job(name)) for name in "abcd"}
    await asyncio.sleep(0.01)
    assert order == ["a", "b"] and ahead == {"c": 2, "d": 3}
    tasks["c"].cancel()  # a queued build that goes away frees its place
    await asyncio.sleep(0.01)
    gates["a"].set()
    await asyncio.sleep(0.01)
    assert order == ["a", "b", "d"] and slots.running == 2
    gates["b"].set()
    gates["d"].set()
    await asyncio.gather(tasks["a"], tasks["b"], tasks["d"])
    assert slots.running == 0


def test_build_log_is_capped_but_keeps_streaming_and_the_verdict(tmp_path: Path) -> None:
    streamed: list[str] = []
    path = tmp_path / "b.log"
    with BuildLog(path, 1000, streamed.append) as say:
        for i in range(500):
            say(f"line {i:04d} " + "x" * 40)
        say.verdict("CREATED b:1 in 1.0 s")
    text = path.read_text()
    assert len(streamed) == 501
    assert len(text.encode()) < 1000 + 200
    assert text.count("log truncated") == 1 and text.endswith("CREATED b:1 in 1.0 s\n")


async def test_layer_claim_makes_a_second_maker_wait(tmp_path: Path) -> None:
    cache = LayerCache(tmp_path, QemuImg.of(Settings()), 4242)
    events: list[str] = []

    async def maker(name: str, hold: float) -> None:
        async with cache.claim("k"):
            events.append(f"{name} in")
            await asyncio.sleep(hold)
            events.append(f"{name} out")

    await asyncio.gather(maker("a", 0.05), maker("b", 0))
    assert events == ["a in", "a out", "b in", "b out"]
    assert not cache._claims


@pytest.mark.parametrize("exc", [RuntimeError("boom /var/lib/ember/secret"), KeyError("k"), RecursionError()])
async def test_a_build_failing_with_any_exception_ends_create_failed_without_internals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: Exception
) -> None:
    """Whatever a build raises, its record ends CREATE_FAILED with an id to look up, never the internals."""
    settings = Settings(data_dir=tmp_path / "data", cache_dir_override=str(tmp_path / "cache"))
    settings.data_dir.mkdir()
    images = SimpleNamespace(
        settings=settings,
        host=SimpleNamespace(settings=settings),
        accel=SimpleNamespace(accel=SimpleNamespace(value="tcg")),
    )
    uids = iter(range(700_000, 700_010))
    service = BuildService(
        Store(settings.db_path),
        images,  # type: ignore[arg-type]
        allocate_uid=lambda: next(uids),
        release_uid=lambda uid: None,
    )

    async def explode(*args: object) -> None:
        raise exc

    monkeypatch.setattr(service, "_run", explode)
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM scratch\n")
    lines: list[str] = []
    record = await service.build(BuildRequest(name="odd"), ctx, lines.append)
    assert record.state is BuildState.CREATE_FAILED and record.error.startswith("internal error (id ")
    assert "boom" not in record.error and "/var" not in record.error and lines[-1].startswith("CREATE_FAILED")
    assert service.store.get_build("odd:1").state is BuildState.CREATE_FAILED  # type: ignore[union-attr]


@pytest.mark.parametrize("name", ["debian", "debian:7", "python:3.11", "ember:x"])
def test_a_build_cannot_take_a_built_in_base_name(name: str) -> None:
    with pytest.raises(NameTaken, match="built-in base"):
        split_name(name)
