""".dockerignore and COPY globs: Docker's semantics (checked against e2b-dockerfile-utils' port of moby's
matcher), in linear time whatever the tenant writes, and bounded."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest
from e2b_dockerfile_utils import PatternMatcher

from ember.build.context import BuildContext
from ember.build.tarread import TarLimits
from ember.dockerignore import IgnoreError, IgnoreMatcher, component_matcher
from ember.errors import BuildFailed

LIMITS = TarLimits(max_bytes=1 << 30, max_members=100_000, max_header=1 << 20, max_depth=256, max_file=1 << 30)
PIECES = ["a", "b", "/", "*", "**", "?", "[ab]", "[^a]", "[a-c]", ".", "..", "\\*", "!", "c.d", "-", " ", "x/", "**/"]
NAMES = ["a", "b", "ab", "ba", "c.d", "aa", "*", "x", "."]


def test_the_same_verdicts_as_mobys_matcher() -> None:
    rng = random.Random(1)
    for _ in range(3000):
        patterns = ["".join(rng.choice(PIECES) for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
        try:
            theirs = PatternMatcher(patterns)
        except ValueError:
            with pytest.raises(IgnoreError):
                IgnoreMatcher(patterns)
            continue
        ours = IgnoreMatcher(patterns)
        for _ in range(10):
            path = "/".join(rng.choice(NAMES) for _ in range(rng.randint(1, 4)))
            assert ours.matches(path) == theirs.matches(path), (patterns, path)
            assert ours.may_match_under(path) == theirs.may_match_under(path), (patterns, path)


def test_pathological_patterns_match_in_linear_time() -> None:
    """Backtracking regexes took seconds to hours on these (and held the interpreter lock throughout)."""
    deep = "/".join(["d"] * 250)
    started = time.monotonic()
    ignore = IgnoreMatcher(["**/" * 30 + "x", "*a" * 40 + "b", "!" + "**/" * 30 + "d*d*d*d*d*d*d*d*q"])
    for path in (deep, "a" * 4000, deep + "/" + "a" * 255):
        ignore.matches(path)
    assert not component_matcher("a*" * 60 + "b")("a" * 255)
    assert time.monotonic() - started < 5


def test_patterns_are_bounded() -> None:
    with pytest.raises(IgnoreError, match="at most 1000 patterns"):
        IgnoreMatcher([f"p{i}" for i in range(1001)])
    with pytest.raises(IgnoreError, match="at most 1000 patterns"):
        IgnoreMatcher(["a" * 1025])
    with pytest.raises(IgnoreError, match="syntax error"):
        IgnoreMatcher(["[a"])


def test_walking_a_deep_context_costs_one_lookup_per_entry_and_has_a_deadline(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(200):
        os.mkdir("d", dir_fd=fd)
        nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    for i in range(3000):
        os.close(os.open(f"f{i}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    os.close(fd)
    (tmp_path / ".dockerignore").write_text("**/f1*\n")
    with BuildContext(tmp_path, LIMITS) as ctx:
        files = ctx.walk("")
        assert len(files) == 1 + 1 + 200 + 3000 - 1111  # "", .dockerignore, the directories, files not f1*
        assert len(ctx.file_digest(files)) == 64
    with BuildContext(tmp_path, LIMITS, scan_s=0.0) as ctx, pytest.raises(BuildFailed, match="EMBER_BUILD_TOOL"):
        ctx.walk("")
