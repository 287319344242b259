"""Dockerfiles, parsed by BuildKit's parser (``e2b-dockerfile-utils``) into typed stages.

Pure: nothing here touches the host. Variables are expanded as Docker does it
(``$X``, ``${X:-default}``, ``${X:+alt}``): ``ARG`` before the first ``FROM``
feeds ``FROM`` lines only, an ``ARG`` inside a stage re-declares it for that
stage, ``ENV`` persists into the image. ``RUN``/``CMD``/``ENTRYPOINT`` are not
expanded here: the shell in the guest does it with the stage's environment.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

from e2b_dockerfile_utils import DockerfileInstruction, DockerfileSyntaxError, ShellLex, parse_dockerfile_ast

from ember.errors import InvalidRequest

SUPPORTED = frozenset(
    [
        "FROM",
        "ARG",
        "ENV",
        "RUN",
        "COPY",
        "ADD",
        "WORKDIR",
        "USER",
        "ENTRYPOINT",
        "CMD",
        "EXPOSE",
        "LABEL",
        "HEALTHCHECK",
        "SHELL",
        "STOPSIGNAL",
    ]
)
FLAGS = {
    "FROM": {"platform"},
    "COPY": {"from", "chown", "chmod", "link"},
    "ADD": {"chown", "chmod", "link"},
    "HEALTHCHECK": {"interval", "timeout", "start-period", "start-interval", "retries"},
}
DEFAULT_SHELL = ("/bin/sh", "-c")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_DURATION_S = 24 * 3600.0  # a HEALTHCHECK interval, timeout or start period
MAX_RETRIES = 1000


class DockerfileError(InvalidRequest):
    """The Dockerfile cannot be built as written; the message names the line."""

    def __init__(self, message: str, line: int | None = None) -> None:
        self.line = line
        super().__init__(f"Dockerfile line {line}: {message}" if line else f"Dockerfile: {message}")


@dataclass(frozen=True)
class Healthcheck:
    argv: tuple[str, ...]  # [] = NONE
    interval_s: float = 30.0
    timeout_s: float = 30.0
    start_period_s: float = 0.0
    retries: int = 3


@dataclass(frozen=True)
class ImageConfig:
    """What a finished image runs and how (Docker's image config, the parts Ember uses)."""

    env: tuple[tuple[str, str], ...] = ()
    workdir: str = "/"
    user: str = ""
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    shell: tuple[str, ...] = DEFAULT_SHELL
    exposed: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    healthcheck: Healthcheck | None = None
    stopsignal: str = ""

    def env_dict(self) -> dict[str, str]:
        return dict(self.env)

    def with_env(self, key: str, value: str) -> ImageConfig:
        return replace(self, env=(*[(k, v) for k, v in self.env if k != key], (key, value)))

    def with_label(self, key: str, value: str) -> ImageConfig:
        return replace(self, labels=(*[(k, v) for k, v in self.labels if k != key], (key, value)))

    def app_argv(self) -> tuple[str, ...]:
        return (*self.entrypoint, *self.cmd)

    def to_json(self) -> dict[str, object]:
        hc = self.healthcheck
        return {
            "env": [f"{k}={v}" for k, v in self.env], "workdir": self.workdir, "user": self.user,
            "entrypoint": list(self.entrypoint), "cmd": list(self.cmd), "shell": list(self.shell),
            "exposed": list(self.exposed), "labels": dict(self.labels), "stopsignal": self.stopsignal,
            "healthcheck": None if hc is None else {
                "argv": list(hc.argv), "interval_s": hc.interval_s, "timeout_s": hc.timeout_s,
                "start_period_s": hc.start_period_s, "retries": hc.retries,
            },
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, object]) -> ImageConfig:
        hc = data.get("healthcheck")
        env = [str(e).partition("=") for e in data.get("env", []) or []]  # type: ignore[attr-defined]
        return cls(
            env=tuple((k, v) for k, _, v in env), workdir=str(data.get("workdir") or "/"),
            user=str(data.get("user") or ""), entrypoint=tuple(data.get("entrypoint") or ()),  # type: ignore[arg-type]
            cmd=tuple(data.get("cmd") or ()), shell=tuple(data.get("shell") or DEFAULT_SHELL),  # type: ignore[arg-type]
            exposed=tuple(data.get("exposed") or ()),  # type: ignore[arg-type]
            labels=tuple(dict(data.get("labels") or {}).items()),  # type: ignore[call-overload]
            stopsignal=str(data.get("stopsignal") or ""),
            healthcheck=Healthcheck(**{**hc, "argv": tuple(hc["argv"])}) if isinstance(hc, dict) else None,
        )  # fmt: skip


@dataclass(frozen=True)
class Instruction:
    """One instruction of a stage, flags split out, words not yet expanded."""

    name: str
    line: int
    original: str
    flags: tuple[tuple[str, str], ...]
    args: tuple[str, ...]
    json: bool
    heredocs: tuple[tuple[str, str, bool], ...] = ()  # (name, content, expand)

    def flag(self, key: str, default: str = "") -> str:
        return dict(self.flags).get(key, default)

    def error(self, message: str) -> DockerfileError:
        return DockerfileError(f"{self.name}: {message}", self.line)


@dataclass(frozen=True)
class Stage:
    index: int
    base: str  # expanded FROM reference ("scratch", an image, or an earlier stage's name)
    name: str  # AS name, or "" (referred to by index then)
    line: int
    instructions: tuple[Instruction, ...]


@dataclass(frozen=True)
class Dockerfile:
    stages: tuple[Stage, ...]
    meta_args: tuple[tuple[str, str | None], ...]  # ARGs before the first FROM
    escape: str = "\\"

    def stage(self, ref: str) -> Stage | None:
        for stage in self.stages:
            if stage.name == ref.lower() or (ref.isascii() and ref.isdigit() and int(ref) == stage.index):
                return stage
        return None


def _flags(raw: list[str], name: str, line: int) -> tuple[tuple[str, str], ...]:
    allowed = FLAGS.get(name, set())
    out = []
    for item in raw:
        key, _, value = item.removeprefix("--").partition("=")
        if key not in allowed:
            raise DockerfileError(f"{name}: the flag --{key} is not supported by Ember", line)
        out.append((key, value))
    return tuple(out)


def _instruction(raw: DockerfileInstruction) -> Instruction:
    if raw.name not in SUPPORTED:
        what = "is not supported by Ember" if raw.name in {"ONBUILD", "VOLUME", "MAINTAINER"} else "is unknown"
        raise DockerfileError(f"the instruction {raw.name} {what}", raw.start_line)
    return Instruction(
        name=raw.name, line=raw.start_line, original=raw.original, flags=_flags(raw.flags, raw.name, raw.start_line),
        args=tuple(raw.args), json=raw.json,
        heredocs=tuple((h.name, h.content, h.expand) for h in raw.heredocs),
    )  # fmt: skip


def parse(text: str, build_args: dict[str, str] | None = None) -> Dockerfile:
    """Parse and check a Dockerfile; FROM lines are expanded with the meta ARGs."""
    try:
        ast = parse_dockerfile_ast(text)
    except DockerfileSyntaxError as exc:
        raise DockerfileError(re.sub(r"^Dockerfile parse error( on line \d+)?: ", "", str(exc)), exc.line) from None
    build_args = build_args or {}
    meta: dict[str, str | None] = {}
    stages: list[Stage] = []
    current: list[Instruction] = []
    head: tuple[str, str, int] | None = None
    lex_escape = ast.escape_token
    for raw in ast.instructions:
        ins = _instruction(raw)
        if ins.name == "FROM":
            if head is not None:
                stages.append(Stage(len(stages), head[0], head[1], head[2], tuple(current)))
            head, current = _from(ins, meta, build_args, lex_escape, {s.name for s in stages}), []
        elif head is None:
            if ins.name != "ARG":
                raise ins.error("only ARG may come before the first FROM")
            for key, default in arg_pairs(ins):
                meta[key] = build_args.get(key, default)
        else:
            current.append(ins)
    if head is None:
        raise DockerfileError("no FROM instruction: a Dockerfile starts with FROM (or ARG, then FROM)")
    stages.append(Stage(len(stages), head[0], head[1], head[2], tuple(current)))
    return Dockerfile(tuple(stages), tuple(meta.items()), lex_escape)


def _from(
    ins: Instruction, meta: dict[str, str | None], build_args: dict[str, str], escape: str, names: set[str]
) -> tuple[str, str, int]:
    args = list(ins.args)
    name = ""
    if len(args) == 3 and args[1].lower() == "as":
        name = args[2].lower()
        if name in names:
            raise ins.error(f"the stage name '{name}' is used twice")
    elif len(args) != 1:
        raise ins.error("expected 'FROM image' or 'FROM image AS name'")
    platform = ins.flag("platform")
    if platform and expand(platform, {k: v for k, v in meta.items() if v is not None}, escape) != "linux/amd64":
        raise ins.error(f"--platform={platform}: Ember builds linux/amd64 images only")
    env = {k: v for k, v in meta.items() if v is not None}
    base = expand(args[0], env, escape)
    if not base:
        raise ins.error(f"'{args[0]}' expands to an empty image name: pass it with --build-arg")
    return base, name, ins.line


def arg_pairs(ins: Instruction) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    for word in ins.args:
        key, eq, value = word.partition("=")
        if not key or not key.replace("_", "a").isalnum():
            raise ins.error(f"'{word}' is not a valid ARG (NAME or NAME=default)")
        out.append((key, ShellLex("\\").process_word(value) if eq else None))
    return out


def pairs(ins: Instruction, env: dict[str, str], escape: str) -> list[tuple[str, str]]:
    """ENV/LABEL arguments: the parser gives [key, value, delimiter] triples."""
    words = list(ins.args)
    if len(words) % 3:
        raise ins.error("expected KEY=VALUE pairs")
    out = []
    for i in range(0, len(words), 3):
        key = expand(words[i], env, escape)
        if not key:
            raise ins.error("an empty name")
        out.append((key, expand(words[i + 1], env, escape)))
    return out


def expand(word: str, env: dict[str, str], escape: str = "\\") -> str:
    try:
        return ShellLex(escape, env=env, skip_unset_env=False).process_word(word)
    except ValueError as exc:
        raise DockerfileError(str(exc)) from None


def expand_words(words: tuple[str, ...] | list[str], env: dict[str, str], escape: str, json_form: bool) -> list[str]:
    """COPY/ADD sources and destination: JSON form keeps spaces inside words."""
    if json_form:
        return [expand(w, env, escape) for w in words]
    out: list[str] = []
    for w in words:
        out.extend(ShellLex(escape, env=env, skip_unset_env=False).process_words(w))
    return out


def command(ins: Instruction, shell: tuple[str, ...]) -> tuple[str, ...]:
    """CMD/ENTRYPOINT/RUN/HEALTHCHECK CMD argv: JSON form as is, shell form wrapped in SHELL."""
    if ins.json:
        return tuple(ins.args)
    return (*shell, " ".join(ins.args))


def run_argv(ins: Instruction, shell: tuple[str, ...]) -> tuple[str, ...]:
    """RUN: with heredocs, BuildKit runs a lone heredoc as the script and otherwise
    hands the shell the whole text (shells understand heredocs themselves)."""
    if not ins.heredocs or ins.json:
        return command(ins, shell)
    line = " ".join(ins.args).strip()
    if len(ins.heredocs) == 1 and line.lstrip("<-").strip("'\"") == ins.heredocs[0][0]:
        return (*shell, ins.heredocs[0][1])
    text = line + "\n" + "".join(content + name + "\n" for name, content, _ in ins.heredocs)
    return (*shell, text)


def parse_shell(ins: Instruction) -> tuple[str, ...]:
    if not ins.json or not ins.args:
        raise ins.error('SHELL takes the JSON form, e.g. SHELL ["/bin/bash", "-c"]')
    return tuple(ins.args)


def duration_ok(seconds: float) -> bool:
    """A HEALTHCHECK interval, timeout or start period Ember accepts: finite, 0 to 24 hours."""
    return math.isfinite(seconds) and 0 <= seconds <= MAX_DURATION_S


def parse_duration(value: str, ins: Instruction) -> float:
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for unit in ("ms", "s", "m", "h"):
        if value.endswith(unit):
            try:
                seconds = float(value[: -len(unit)]) * units[unit]
            except ValueError:
                break
            if duration_ok(seconds):
                return seconds
            break
    raise ins.error(f"'{value}' is not a duration like 30s, 500ms or 1m (at most 24h)")


def parse_healthcheck(ins: Instruction, shell: tuple[str, ...]) -> Healthcheck:
    args = list(ins.args)
    if args and args[0].upper() == "NONE":
        return Healthcheck(argv=())
    if not args or args[0].upper() != "CMD" or len(args) < 2:
        raise ins.error("expected HEALTHCHECK [OPTIONS] CMD command, or HEALTHCHECK NONE")
    rest = args[1:]
    argv = tuple(rest) if ins.json else (*shell, " ".join(rest))
    retries = ins.flag("retries", "3")
    if not (retries.isascii() and retries.isdigit()) or int(retries) > MAX_RETRIES:
        raise ins.error(f"--retries={retries} is not a number from 0 to {MAX_RETRIES}")
    return Healthcheck(
        argv=argv,
        interval_s=parse_duration(ins.flag("interval", "30s"), ins),
        timeout_s=parse_duration(ins.flag("timeout", "30s"), ins),
        start_period_s=parse_duration(ins.flag("start-period", "0s"), ins),
        retries=int(retries),
    )


@dataclass
class StageEnv:
    """Variables visible while a stage is being built (mutable, one per stage build)."""

    config: ImageConfig
    args: dict[str, str] = field(default_factory=dict)

    def variables(self) -> dict[str, str]:
        return {**self.args, **self.config.env_dict()}

    def run_env(self) -> list[str]:
        merged = {"PATH": DEFAULT_PATH, **self.args, **self.config.env_dict()}
        return [f"{k}={v}" for k, v in merged.items()]
