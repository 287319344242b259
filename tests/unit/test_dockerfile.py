"""Dockerfile parsing and expansion (pure)."""

from __future__ import annotations

import pytest

from ember.build.dockerfile import DockerfileError, pairs, parse, parse_healthcheck, run_argv
from ember.build.egress import ruleset


def test_stages_meta_args_and_from_expansion() -> None:
    df = parse("ARG BASE=debian:bookworm\nFROM ${BASE} AS build\nRUN true\nFROM scratch\nCOPY --from=build /a /a\n")
    assert [s.base for s in df.stages] == ["debian:bookworm", "scratch"]
    assert df.stages[0].name == "build" and df.stage("build") is df.stages[0] and df.stage("1") is df.stages[1]
    assert parse("ARG BASE=x\nFROM ${BASE}\n", {"BASE": "debian:bookworm-slim"}).stages[0].base == (
        "debian:bookworm-slim"
    )


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("FROM scratch\nFROBNICATE x\n", 2, "unknown"),
        ("FROM scratch\n\nVOLUME /data\n", 3, "not supported"),
        ("FROM scratch\nCOPY --link=false --frob=1 a b\n", 2, "--frob"),
        ("RUN true\n", 1, "only ARG"),
        ("# nothing\n", None, "no FROM"),
        ("FROM --platform=linux/arm64 scratch\n", 1, "linux/amd64"),
    ],
)
def test_errors_name_the_line(text: str, line: int | None, words: str) -> None:
    with pytest.raises(DockerfileError) as info:
        parse(text)
    assert info.value.line == line and words in str(info.value)
    if line:
        assert f"line {line}" in str(info.value)


def test_env_pairs_expand_like_docker() -> None:
    df = parse('FROM scratch\nENV A=1 B="two words" C=${A:-x}-${MISSING:-dflt}\n')
    ins = df.stages[0].instructions[0]
    assert pairs(ins, {"A": "1"}, "\\") == [("A", "1"), ("B", "two words"), ("C", "1-dflt")]


def test_run_heredoc_forms() -> None:
    df = parse('FROM scratch\nRUN <<EOT\necho hi\nEOT\nRUN <<EOT bash\necho x\nEOT\nRUN ["a", "b c"]\nRUN echo $X\n')
    lone, piped, exec_form, shell = df.stages[0].instructions
    sh = ("/bin/sh", "-c")
    assert run_argv(lone, sh) == ("/bin/sh", "-c", "echo hi\n")
    assert run_argv(piped, sh) == ("/bin/sh", "-c", "<<EOT bash\necho x\nEOT\n")
    assert run_argv(exec_form, sh) == ("a", "b c")
    assert run_argv(shell, ("/bin/bash", "-c")) == ("/bin/bash", "-c", "echo $X")


def test_egress_rules_only_touch_build_vm_uids() -> None:
    rules = ruleset("t", [4242, 4243], ["10.255.255.53"])
    assert "elements = { 4242, 4243 }" in rules and "meta skuid @builders jump builder" in rules
    assert "skuid !=" not in rules
    assert "ip daddr { 10.255.255.53 } udp dport 53 accept" in rules
    assert "127.0.0.0/8" in rules and "192.168.0.0/16" in rules
    assert rules.index("dport 53 accept") < rules.index("reject")


@pytest.mark.parametrize(
    "flag", ["--timeout=infs", "--interval=nanms", "--start-period=-1s", "--interval=25h", "--retries=99999"]
)
def test_healthcheck_durations_and_retries_are_bounded(flag: str) -> None:
    (stage,) = parse(f"FROM scratch\nHEALTHCHECK {flag} CMD true\n", {}).stages
    with pytest.raises(DockerfileError, match="line 2"):
        parse_healthcheck(stage.instructions[0], ("/bin/sh", "-c"))
