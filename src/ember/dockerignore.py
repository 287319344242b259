""".dockerignore and COPY glob matching in linear time.

The semantics are Docker's (moby/patternmatcher, which e2b-dockerfile-utils
ports): patterns are cleaned, ``**`` spans directories, ``*`` and ``?`` stay
in one, ``[...]`` classes and ``\\`` escapes; a pattern that matches a
directory excludes everything under it; ``!`` re-includes; the last matching
pattern wins, evaluated on each parent directory first. A tenant writes the
patterns, so they are compiled for RE2 (no backtracking: a match costs time
linear in the path, whatever the pattern) instead of Python's ``re``, which
holds the interpreter lock for as long as a pathological pattern backtracks.
Patterns are bounded in count and length.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import re2

MAX_PATTERNS = 1000
MAX_PATTERN_LEN = 1024
WILDCARD = re.compile(r"[*?\[\\]")
_OPTIONS = re2.Options()
_OPTIONS.log_errors = False


class IgnoreError(ValueError):
    """A .dockerignore that Ember refuses; the message names the pattern."""


def _literal(ch: str) -> str:
    return ch if ch.isascii() and ch.isalnum() else f"\\x{{{ord(ch):x}}}"


def _class(pattern: str, i: int) -> tuple[str, int]:
    """The RE2 class for the bracket expression starting after ``[`` at ``i``, and the index after it."""
    out, n = "[", len(pattern)
    if i < n and pattern[i] == "^":
        out, i = "[^", i + 1
    items = 0
    while i < n and not (items and pattern[i] == "]"):
        lo, i = _class_char(pattern, i)
        out += lo
        if i < n and pattern[i] == "-":
            hi, i = _class_char(pattern, i + 1)
            out += "-" + hi
        items += 1
    if i >= n or not items:
        raise IgnoreError("syntax error in pattern (a '[' class is not closed or empty)")
    return out + "]", i + 1


def _class_char(pattern: str, i: int) -> tuple[str, int]:
    if i >= len(pattern) or pattern[i] in "-]":
        raise IgnoreError("syntax error in pattern")
    if pattern[i] == "\\":
        i += 1
        if i >= len(pattern):
            raise IgnoreError("syntax error in pattern (a trailing '\\')")
    return _literal(pattern[i]), i + 1


def _compile(pattern: str) -> Callable[[str], bool]:
    """A matcher of whole paths, with Docker's shortcuts for plain, ``x/**`` and ``**/x`` patterns."""
    regex, i, n = "", 0, len(pattern)
    kinds: list[str] = []  # what each wildcard makes of the pattern: Docker's shortcut or a regex
    while i < n:
        ch, first = pattern[i], i == 0
        i += 1
        if ch == "*" and i < n and pattern[i] == "*":
            i += 1
            if i < n and pattern[i] == "/":
                i += 1
            at_end = i >= n
            regex += ".*" if at_end else "(.*/)?"
            kinds.append("suffix" if first else "prefix" if at_end and not kinds else "regex")
        elif ch == "*":
            regex += "[^/]*"
            kinds.append("regex")
        elif ch == "?":
            regex += "[^/]"
            kinds.append("regex")
        elif ch == "[":
            cls, i = _class(pattern, i)
            regex += cls
            kinds.append("regex")
        elif ch == "\\":
            if i >= n:
                raise IgnoreError("syntax error in pattern (a trailing '\\')")
            regex += _literal(pattern[i])
            i += 1
            kinds.append("regex")
        else:
            regex += _literal(ch)
    if not kinds:
        return lambda path: path == pattern
    if kinds == ["prefix"]:
        prefix = pattern[:-2]
        return lambda path: path.startswith(prefix)
    if kinds == ["suffix"]:
        suffix = pattern[2:]  # "**/foo" also matches "foo"
        return lambda path: path.endswith(suffix) or (suffix.startswith("/") and path == suffix[1:])
    try:
        compiled = re2.compile(regex, _OPTIONS)
    except re2.error:
        raise IgnoreError("syntax error in pattern") from None
    return lambda path: compiled.fullmatch(path) is not None


def component_matcher(pattern: str) -> Callable[[str], bool]:
    """A COPY source glob for one path component (``*``, ``?``, ``[...]``, ``\\``), as Go's
    filepath.Match reads it, in linear time."""
    return _compile(re.sub(r"\*+", "*", pattern))


@dataclass(frozen=True)
class _Pattern:
    exclusion: bool  # a '!' pattern: re-includes
    dirs: tuple[str, ...]
    match: Callable[[str], bool]


Verdicts = tuple[bool, ...]  # for one path: which patterns matched it (or a parent of it)


class IgnoreMatcher:
    def __init__(self, lines: Sequence[str]) -> None:
        self.patterns: list[_Pattern] = []
        for original in lines:
            pattern = original.strip()
            if not pattern or original.startswith("#"):
                continue
            if len(self.patterns) >= MAX_PATTERNS or len(pattern) > MAX_PATTERN_LEN:
                raise IgnoreError(f"at most {MAX_PATTERNS} patterns of at most {MAX_PATTERN_LEN} characters")
            exclusion = pattern.startswith("!")
            if exclusion:
                pattern = pattern[1:].strip()
                if not pattern:
                    raise IgnoreError(f"'{original[:80]}' is not a pattern")
            pattern = posixpath.normpath(re.sub("/+", "/", pattern))
            if len(pattern) > 1 and pattern.startswith("/"):
                pattern = pattern[1:]
            try:
                self.patterns.append(_Pattern(exclusion, tuple(pattern.split("/")), _compile(pattern)))
            except IgnoreError as exc:
                raise IgnoreError(f"'{original[:80]}': {exc}") from None

    def verdicts(self, path: str, parent: Verdicts | None) -> tuple[Verdicts, bool]:
        """(what each pattern says of ``path``, whether it is excluded), given its parent directory's
        verdicts (None at the top). Walking a tree this way costs one match per pattern and path."""
        out: list[bool] = []
        excluded = False
        for i, pattern in enumerate(self.patterns):
            hit = parent is not None and parent[i]
            if not hit:
                if pattern.exclusion != excluded:  # neither can change the verdict so far
                    out.append(False)
                    continue
                hit = pattern.match(path)
            out.append(hit)
            if hit:
                excluded = not pattern.exclusion
        return tuple(out), excluded

    def path_verdicts(self, path: str) -> tuple[Verdicts | None, bool]:
        """``verdicts`` of ``path`` (relative, slash-separated), each parent directory first;
        (None, False) for the context's root ("")."""
        verdicts: Verdicts | None = None
        excluded = False
        if path:
            parts = path.split("/")
            for depth in range(1, len(parts) + 1):
                verdicts, excluded = self.verdicts("/".join(parts[:depth]), verdicts)
        return verdicts, excluded

    def matches(self, path: str) -> bool:
        """Whether ``path`` (relative, slash-separated) is excluded."""
        return self.path_verdicts(path)[1]

    def may_match_under(self, directory: str) -> bool:
        """Whether a '!' pattern could re-include something under ``directory`` (then it is walked)."""
        segments = directory.split("/")
        for pattern in self.patterns:
            if not pattern.exclusion:
                continue
            for i, segment in enumerate(segments):
                if i >= len(pattern.dirs):
                    break
                if "**" in pattern.dirs[i]:
                    return True
                if not WILDCARD.search(pattern.dirs[i]) and pattern.dirs[i] != segment:
                    break
            else:
                if len(pattern.dirs) > len(segments):
                    return True
        return False
