"""App hooks: the image's LABELs, the agent's answer (hostile), and each outcome of a call against a fake agent."""

from __future__ import annotations

import asyncio
import errno

import pytest

from ember import hooks
from ember.errors import BuildFailed, GuestProtocolError
from ember.guest.protocol import HOOK_ANSWER_MAX, Frame, Msg, Tag, decode_fields, encode_fields, encode_frame
from ember.hooks import Hook, HookCall, Outcome, hook_config, parse_answer
from tests.unit.test_agent_channel import Agents, FakeAgent, agents, send  # noqa: F401 (agents: a fixture)

ALL = "ember.hooks=ready,validate,run,resume,suspend,terminate"


def labels(*items: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in items)


def test_no_hook_port_means_no_hooks() -> None:
    assert hook_config({}) is None
    assert hook_config(labels("other=1")) is None


def test_the_ready_label_declares_the_hook_port_and_ready() -> None:
    config = hook_config(labels("ember.ready.http=8080"))
    assert config is not None and config.port == 8080 and config.hooks == {Hook.READY}
    config = hook_config(labels("ember.ready.http=8080", "ember.hooks.port=9000", "ember.hooks=run"))
    assert config is not None and config.port == 9000 and config.hooks == {Hook.READY, Hook.RUN}


def test_hooks_and_timeouts_from_labels() -> None:
    config = hook_config(labels("ember.hooks.port=1", ALL, "ember.hooks.validate.timeout=3600",
                                "ember.hooks.run.timeout=60"))  # fmt: skip
    assert config is not None and config.hooks == set(Hook)
    assert config.timeout_s(Hook.VALIDATE, 5) == 3600 and config.timeout_s(Hook.RUN, 5) == 60
    assert config.timeout_s(Hook.SUSPEND, 5) == 5  # the daemon's default
    assert hook_config(labels("ember.hooks.port=80", "ember.hooks= run , ,suspend")) == hooks.HookConfig(
        port=80, hooks=frozenset({Hook.RUN, Hook.SUSPEND})
    )


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (("ember.hooks.port=0",), "LABEL ember.hooks.port=0: expected a port number 1-65535"),
        (("ember.hooks.port=65536",), "expected a port number 1-65535"),
        (("ember.hooks.port=80x",), "expected a port number 1-65535"),
        (("ember.ready.http=-1",), "LABEL ember.ready.http=-1: expected a port number"),
        (("ember.hooks.port=80", "ember.hooks=run,boot"), "unknown hook 'boot'"),
        (("ember.hooks=run",), "hooks are declared but no port: add LABEL ember.hooks.port=PORT"),
        (("ember.hooks.run.timeout=5",), "no port"),
        (
            ("ember.hooks.port=80", "ember.hooks.run.timeout=61"),
            "ember.hooks.run.timeout=61: expected whole seconds 1-60",
        ),
        (("ember.hooks.port=80", "ember.hooks.run.timeout=0"), "expected whole seconds 1-60"),
        (("ember.hooks.port=80", "ember.hooks.run.timeout=1.5"), "expected whole seconds 1-60"),
        (("ember.hooks.port=80", "ember.hooks.validate.timeout=3601"), "expected whole seconds 1-3600"),
        (("ember.hooks.port=80", "ember.hooks.ready.timeout=5"), "no such hook timeout (ready's is the build's"),
        (("ember.hooks.port=80", "ember.hooks.boot.timeout=5"), "no such hook timeout"),
    ],
)
def test_bad_hook_labels_fail_the_build_naming_them(items: tuple[str, ...], message: str) -> None:
    with pytest.raises(BuildFailed) as err:
        hook_config(labels(*items))
    assert err.value.step == "hooks" and message in str(err.value)


def test_answers_are_parsed_as_hostile_input() -> None:
    answer = parse_answer(b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\nall \x1b[31mgood\x00\n")
    assert answer.status == 200 and answer.excerpt == "all  [31mgood"  # control characters become spaces
    assert parse_answer(b"HTTP/1.1 503\nRetry-After: 1\n\n").status == 503  # no reason phrase, bare LF
    assert parse_answer(b"HTTP/1.1 204 No Content\r\n").excerpt == ""  # headers cut off: no body
    assert len(parse_answer(b"HTTP/1.1 200 OK\r\n\r\n" + b"y" * 4000).excerpt) == hooks.EXCERPT_CHARS
    for bad in (b"", b"SSH-2.0-OpenSSH\r\n", b"HTTP/1.1 999 Odd\r\n", b"HTTP/2 200\r\n", b"HTTP/1.1 20\r\n",
                b"http/1.1 200 OK\r\n", b" HTTP/1.1 200 OK\r\n"):  # fmt: skip
        with pytest.raises(ValueError):
            parse_answer(bad)
    with pytest.raises(GuestProtocolError):  # beyond what the agent may return
        parse_answer(b"HTTP/1.1 200 OK\r\n\r\n" + b"y" * HOOK_ANSWER_MAX)


def test_a_call_describes_itself_for_its_event() -> None:
    call = HookCall(Hook.RUN, Outcome.FAILED, 500, 12.34, "the app says no")
    assert call.describe() == "hook run failed, HTTP 500 in 12 ms: the app says no"
    assert HookCall(Hook.SUSPEND, Outcome.TIMEOUT, 0, 1000.0).describe() == "hook suspend timeout in 1000 ms"
    assert not call.ok and HookCall(Hook.RUN, Outcome.OK, 204, 1.0).ok


def error(stream: int, code: int, message: str) -> bytes:
    return encode_frame(Msg.ERROR, stream, encode_fields([(Tag.ERRNO, code), (Tag.MESSAGE, message)]))


def answer(stream: int, raw: bytes) -> bytes:
    return encode_frame(Msg.OK, stream, encode_fields([(Tag.HOOK_ANSWER, raw)]))


REPLIES = {
    "ok": (lambda s: answer(s, b"HTTP/1.0 204 No Content\r\n\r\n"), Outcome.OK, 204),
    "500": (lambda s: answer(s, b"HTTP/1.0 500 Oops\r\n\r\nbroken"), Outcome.FAILED, 500),
    "not http": (lambda s: answer(s, b"hello"), Outcome.FAILED, 0),
    "refused": (lambda s: error(s, errno.ECONNREFUSED, "port 8080: Connection refused"), Outcome.UNREACHABLE, 0),
    "agent deadline": (lambda s: error(s, errno.ETIMEDOUT, "port 8080 did not answer"), Outcome.TIMEOUT, 0),
    "ok without answer": (lambda s: encode_frame(Msg.OK, s), Outcome.ERROR, 0),
    "oversized answer": (lambda s: answer(s, b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * HOOK_ANSWER_MAX), Outcome.ERROR, 0),
}


@pytest.mark.parametrize("reply", sorted(REPLIES))
async def test_each_agent_reply_is_one_outcome(agents: Agents, reply: str) -> None:  # noqa: F811
    make, outcome, status = REPLIES[reply]
    asked: list[dict[Tag, list[bytes]]] = []

    async def handler(fake: FakeAgent, frame: Frame, writer: asyncio.StreamWriter) -> None:
        if frame.type is Msg.HOOK:
            asked.append(decode_fields(frame.payload))
            await send(writer, make(frame.stream))

    conn, _ = await agents(handler)
    done = await hooks.call(conn, Hook.RUN, 8080, 2.5, b"payload")
    assert (done.outcome, done.status) == (outcome, status), done
    assert asked[0][Tag.HOOK_NAME] == [b"run"] and asked[0][Tag.HOOK_BODY] == [b"payload"]
    assert int.from_bytes(asked[0][Tag.TIMEOUT_MS][0], "little") == 2500


async def test_an_agent_that_never_ends_a_hook_times_out_on_the_host(
    agents: Agents,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hooks, "GRACE_S", 0.2)

    async def silent(fake: FakeAgent, frame: Frame, writer: asyncio.StreamWriter) -> None:
        pass

    conn, _ = await agents(silent)
    done = await asyncio.wait_for(hooks.call(conn, Hook.SUSPEND, 8080, 0.1), 5)
    assert done.outcome is Outcome.TIMEOUT and 250 <= done.duration_ms < 5000, done


async def test_validate_is_polled_while_it_answers_503(agents: Agents, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setattr(hooks, "POLL_INTERVAL_S", 0.01)
    answers = [b"HTTP/1.0 503 Busy\r\n\r\n"] * 3 + [b"HTTP/1.0 200 OK\r\n\r\n"]

    async def handler(fake: FakeAgent, frame: Frame, writer: asyncio.StreamWriter) -> None:
        await send(writer, answer(frame.stream, answers.pop(0) if answers else b"HTTP/1.0 503 Busy\r\n\r\n"))

    conn, fake = await agents(handler)
    done = await hooks.poll(conn, Hook.VALIDATE, 8080, 5)
    assert done.ok and len([f for f in fake.frames if f.type is Msg.HOOK]) == 4
    never = await hooks.poll(conn, Hook.VALIDATE, 8080, 0.3)  # 503 until the timeout
    assert never.outcome is Outcome.TIMEOUT and never.status == 503 and "still 503" in never.detail
