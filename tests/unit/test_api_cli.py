"""The CLI never lets a name or a log line chosen by a tenant or a guest drive the terminal."""

from __future__ import annotations

from typing import Any

import pytest
from click.testing import CliRunner

from ember import cli
from ember.client import Call, Client

HOSTILE = "evil\x1b]0;owned\x07\x1b[2J\rname\u202etxt.exe\x9b31m"


def test_control_and_format_characters_are_shown_escaped() -> None:
    out = cli.shown(HOSTILE)
    assert not any(c in out for c in "\x1b\x07\r\u202e\x9b")
    assert out == "evil\\x1b]0;owned\\x07\\x1b[2J\\rname\\u202etxt.exe\\x9b31m"
    assert cli.shown("line 1\n\tline 2\x1b", lines=True) == "line 1\n\tline 2\\x1b"
    assert cli.shown("plain ünïcode name") == "plain ünïcode name"


def test_ls_ps_and_build_logs_print_guest_names_escaped(monkeypatch: pytest.MonkeyPatch) -> None:
    answers: dict[str, Any] = {
        "/v1/vms/vm-1/ls": {
            "entries": [{"name": HOSTILE, "mode": 0o100644, "size": 1, "mtime": 0}],
            "truncated": False,
        },
        "/v1/vms": [
            {"id": "vm-1", "state": "RUNNING", "image": HOSTILE, "accelerator": {"name": "tcg"}, "created_at": "now"}
        ],
    }
    monkeypatch.setattr(Client, "send", lambda self, call: answers[call.path])
    monkeypatch.setattr(Client, "text", lambda self, call: f"step 1\n{HOSTILE}\n")
    monkeypatch.setattr(Client, "stream_events", lambda self, call: iter([{"log": HOSTILE}]))
    runner = CliRunner()
    for argv in (["ls", "vm-1:/root"], ["ps"], ["image", "logs", "app:1"]):
        result = runner.invoke(cli.main, argv)
        assert result.exit_code == 0, result.output
        assert "\x1b" not in result.output and "\\x1b]0;owned" in result.output, argv


def test_image_rm_all_sends_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[Call] = []
    monkeypatch.setattr(Client, "send", lambda self, call: sent.append(call))
    assert CliRunner().invoke(cli.main, ["image", "rm", "--all", "app"]).exit_code == 0
    assert CliRunner().invoke(cli.main, ["image", "rm", "app:2"]).exit_code == 0
    assert [(c.path, c.params) for c in sent] == [("/v1/images/app", {"all": "true"}), ("/v1/images/app:2", {})]
