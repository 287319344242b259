"""Hooks of images created through the AWS API: AWS's paths, the config kept in the build record, readiness."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from ember import hooks
from ember.build import app as app_mod
from ember.build.dockerfile import Healthcheck, ImageConfig
from ember.config import Settings
from ember.db.store import Store
from ember.guest.protocol import Frame, Tag, decode_fields
from ember.hooks import AWS_PREFIX, EMBER_PREFIX, AppHooks, Hook, HookConfig
from ember.models import BuildRecord, BuildState
from tests.unit.test_agent_channel import Agents, FakeAgent, agents, send  # noqa: F401 (agents: a fixture)
from tests.unit.test_hooks import answer


async def test_an_aws_hook_is_sent_with_its_path_and_an_ember_one_without(agents: Agents) -> None:  # noqa: F811
    asked: list[dict[Tag, list[bytes]]] = []

    async def handler(fake: FakeAgent, frame: Frame, writer: asyncio.StreamWriter) -> None:
        asked.append(decode_fields(frame.payload))
        await send(writer, answer(frame.stream, b"HTTP/1.0 200 OK\r\n\r\n"))

    conn, _ = await agents(handler)
    assert (await hooks.call(conn, Hook.RUN, 9000, 1, b"x", prefix=AWS_PREFIX)).ok
    assert (await hooks.call(conn, Hook.RUN, 9000, 1, b"x")).ok
    assert asked[0][Tag.PATH] == [b"/aws/lambda-microvms/runtime/v1/run"] and asked[0][Tag.HOOK_NAME] == [b"run"]
    assert Tag.PATH not in asked[1]  # Ember's own path is the agent's default
    done = await hooks.call(conn, Hook.RUN, 9000, 1, prefix="/etc/")  # only the two known prefixes
    assert done.outcome is hooks.Outcome.FAILED and "no such hook path prefix" in done.detail and len(asked) == 2


def test_a_hook_config_round_trips_through_json_and_refuses_anything_else() -> None:
    config = HookConfig(9000, frozenset({Hook.READY, Hook.RUN}), {Hook.RUN: 5.0}, AWS_PREFIX)
    assert HookConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    for bad in ({**config.to_json(), "prefix": "/x/"}, {**config.to_json(), "port": 0},
                {**config.to_json(), "hooks": ["boot"]}, {**config.to_json(), "timeouts": []}):  # fmt: skip
        with pytest.raises(ValueError):
            HookConfig.from_json(bad)


def _build(store: Store, name: str, config: dict[str, object]) -> None:
    store.put_build(BuildRecord(name=name, repo=name.partition(":")[0], version=1, state=BuildState.CREATED,
                                config=json.dumps(config)))  # fmt: skip


def test_the_build_records_hooks_replace_its_labels(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    labels = {"ember.hooks.port": "8080", "ember.hooks": "run"}
    _build(store, "plain:1", {"labels": labels})
    aws = HookConfig(9000, frozenset({Hook.SUSPEND}), {}, AWS_PREFIX)
    _build(store, "aws:1", {"labels": labels, "hooks": aws.to_json()})
    _build(store, "broken:1", {"hooks": {"port": 1}})  # never written by the daemon: ignored, not a crash
    app = AppHooks(Settings(), store)
    plain = app.config("plain:1")
    assert plain is not None and plain.prefix == EMBER_PREFIX and plain.hooks == {Hook.RUN}
    assert app.config("aws:1") == aws
    assert app.config("broken:1") is None


def test_an_enabled_aws_ready_hook_is_the_readiness_even_with_a_healthcheck() -> None:
    config = ImageConfig(healthcheck=Healthcheck(argv=("true",)), labels=(("ember.ready.http", "8080"),))
    aws = HookConfig(9000, frozenset({Hook.READY}), {}, AWS_PREFIX)
    ready = app_mod.choose(config, (), aws)
    assert (ready.kind, ready.ports, ready.prefix) == (app_mod.ReadyKind.HTTP, (9000,), AWS_PREFIX)
    assert ready.describe() == "POST /aws/lambda-microvms/runtime/v1/ready on port 9000 answers 2xx"
    assert repr(ready) == repr(app_mod.Readiness(app_mod.ReadyKind.HTTP, ports=(9000,)))  # cache keys unchanged
    # without the ready hook the AWS image's LABELs are not hooks: its HEALTHCHECK, else its ports
    assert app_mod.choose(config, (), HookConfig(9000, prefix=AWS_PREFIX)).kind is app_mod.ReadyKind.HEALTHCHECK
    assert app_mod.choose(ImageConfig(labels=config.labels), (), HookConfig(9000)).kind is app_mod.ReadyKind.STARTED
    assert app_mod.choose(ImageConfig(labels=config.labels), ()).kind is app_mod.ReadyKind.HTTP  # Ember's LABEL
