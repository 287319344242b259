"""The CLI never lets a name or a log line chosen by a tenant or a guest drive the terminal; it
sends what its flags say, prints JSON with --json and exits 1 on API errors, 2 on usage errors."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ember import cli
from ember.sdk import Client, NotFound, Request

HOSTILE = "evil\x1b]0;owned\x07\x1b[2J\rname\u202etxt.exe\x9b31m"
VM = {"id": "vm-1", "state": "RUNNING", "image": HOSTILE, "accelerator": {"name": "tcg"}, "created_at": "now",
      "tags": {"team": HOSTILE}}  # fmt: skip


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        cli.main(argv)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[Request]:
    """The requests the CLI sends; answers by path."""
    requests: list[Request] = []
    answers: dict[str, Any] = {
        "/v1/vms/vm-1/ls": {
            "entries": [{"name": HOSTILE, "mode": 0o100644, "size": 1, "mtime": 0}],
            "truncated": False,
        },
        "/v1/vms": [VM],
        "/v1/vms/vm-1/events": [{"id": 1, "vm_id": "vm-1", "to_state": "RUNNING", "actor": HOSTILE}],
        "/v1/images": [{"name": HOSTILE, "state": "CREATED"}],
        "/v1/tenants/acme": {"name": "acme", "quotas": {"max_running_vms": 3}},
    }

    def send(self: Client, req: Request) -> Any:
        requests.append(req)
        if req.path == "/v1/vms/vm-404":
            raise NotFound(404, "VmNotFound", "no VM with id 'vm-404': list VMs with 'ember ps'")
        return VM if req.method == "POST" else answers.get(req.path)

    monkeypatch.setattr(Client, "send", send)
    monkeypatch.setattr(Client, "text", lambda self, req: f"step 1\n{HOSTILE}\n")
    monkeypatch.setattr(Client, "stream", lambda self, req: iter([{"progress": HOSTILE}, {"image": {"name": "d"}}]))
    return requests


def test_control_and_format_characters_are_shown_escaped() -> None:
    out = cli.shown(HOSTILE)
    assert not any(c in out for c in "\x1b\x07\r\u202e\x9b")
    assert out == "evil\\x1b]0;owned\\x07\\x1b[2J\\rname\\u202etxt.exe\\x9b31m"
    assert cli.shown("line 1\n\tline 2\x1b", lines=True) == "line 1\n\tline 2\\x1b"
    assert cli.shown("plain ünïcode name") == "plain ünïcode name"


def test_ls_ps_events_and_build_logs_print_guest_names_escaped(
    sent: list[Request], capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in (["ls", "vm-1:/root"], ["ps"], ["image", "logs", "app:1"], ["events", "vm-1"], ["image", "ls"]):
        code, out, err = run(argv, capsys)
        assert code == 0, (argv, err)
        assert "\x1b" not in out + err and "\\x1b]0;owned" in out + err, argv


def test_json_prints_the_daemons_json(sent: list[Request], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["ps", "--json"], capsys)
    assert code == 0 and json.loads(out) == [VM]
    code, out, _ = run(["tenant", "set", "acme", "--max-running-vms", "3", "--json"], capsys)
    assert code == 0 and json.loads(out)["quotas"] == {"max_running_vms": 3}
    assert sent[-1].method == "PATCH" and sent[-1].json == {"quotas": {"max_running_vms": 3}}


def test_flags_become_the_request(sent: list[Request], capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["image", "rm", "--all", "app"], capsys)[0] == 0
    assert run(["image", "rm", "app:2"], capsys)[0] == 0
    assert [(r.path, r.params) for r in sent] == [("/v1/images/app", {"all": True}), ("/v1/images/app%3A2", {})]
    code, out, _ = run(["run", "app", "--version", "2", "--memory", "512", "-e", "A=1", "--tag", "t=x=y",
                        "--client-token", "c1"], capsys)  # fmt: skip
    assert (code, out) == (0, "vm-1\n")
    assert sent[-1].json == {"image": "app", "version": 2, "memory_mib": 512, "env": {"A": "1"},
                             "tags": {"t": "x=y"}, "client_token": "c1"}  # fmt: skip
    assert run(["ps", "--filter", "tag=team=a", "--filter", "env=prod", "--state", "RUNNING", "--all"], capsys)[0] == 0
    assert sent[-1].target == "/v1/vms?state=RUNNING&tag=team%3Da&tag=env%3Dprod&all=true"


def test_api_errors_exit_1_and_usage_errors_exit_2(sent: list[Request], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["inspect", "vm-404"], capsys)
    assert (code, err) == (1, "ember: no VM with id 'vm-404': list VMs with 'ember ps'\n")
    assert run(["run", "app", "-e", "novalue"], capsys)[0] == 2
    assert run(["tenant", "set", "acme"], capsys)[0] == 2  # no quota named
    assert run(["nosuchcommand"], capsys)[0] == 2
    assert run(["cp", "a", "b"], capsys)[0] == 2


def test_token_create_makes_a_shell_token_with_shell(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    requests: list[Request] = []
    made = {"token": "emt1.a.b", "vm_id": "vm-1", "expires_at": "later", "allowed_ports": "8080"}

    def send(self: Client, req: Request) -> Any:
        requests.append(req)
        return {**made, "kind": "shell" if req.path.endswith("shell-tokens") else "proxy"}

    monkeypatch.setattr(Client, "send", send)
    assert run(["token", "create", "vm-1", "--shell", "--minutes", "7"], capsys) == (0, "emt1.a.b\n", "")
    assert (requests[-1].path, requests[-1].json) == ("/v1/vms/vm-1/shell-tokens", {"expires_in_minutes": 7})
    assert run(["token", "create", "vm-1"], capsys)[0] == 0
    assert (requests[-1].path, requests[-1].json) == ("/v1/vms/vm-1/auth-tokens",
                                                      {"allowed_ports": "8080", "expires_in_minutes": 10})  # fmt: skip
    code, _, err = run(["token", "create", "vm-1", "--shell", "--port", "22"], capsys)
    assert code == 2 and "not both" in err and len(requests) == 2
