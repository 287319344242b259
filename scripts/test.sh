#!/usr/bin/env bash
# Install what Ember needs, then run lint, types and the whole test suite (unit tests and real micro-VM
# tests) on SQLite (the default), then again, but for the store-agnostic modules, on a throwaway
# PostgreSQL cluster (scripts/postgres.sh sets EMBER_TEST_DATABASE_URL; every test daemon gets a
# database of its own there). Extra arguments go to
# pytest, in both passes. Exits non-zero if either pass fails; prints both passes' results at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "test.sh: $*"; }
run() {
    say "$*"
    "$@"
}
run scripts/install.sh
run .venv/bin/ruff check src tests bench
run .venv/bin/ruff format --check src tests bench
run .venv/bin/mypy

logs=$(mktemp -d /tmp/ember-test-logs.XXXXXX)
trap 'rm -rf "$logs"' EXIT
export PYTHONUNBUFFERED=1 # pytest's output goes through tee: keep it live

closing() {  # LOG: pytest's closing line, e.g. "===== 312 passed, 2 skipped in 870.12s (0:14:30) =====" (-q: no bars)
    grep -E '^(=+ )?([0-9]+ [a-z]+|no tests ran)(, [0-9]+ [a-z]+)* in [0-9.]+s( \([0-9:]+\))?( =+)?$' "$1" | tail -n 1 || true
}

pass() {  # NAME [COMMAND PREFIX...] -- runs pytest "$ARGS", its output also in $logs/NAME
    local name=$1 started=$SECONDS status=0
    shift
    say "pass $name: $* .venv/bin/python -m pytest ${ARGS[*]}"
    "$@" .venv/bin/python -m pytest "${ARGS[@]}" 2>&1 | tee "$logs/$name" || status=${PIPESTATUS[0]}
    summary=$(closing "$logs/$name")
    RESULTS+=("$name: exit $status after $((SECONDS - started)) s: ${summary:-no pytest summary}")
    [ "$status" = 0 ] || [ "$FIRST_FAILURE" != 0 ] || FIRST_FAILURE=$status
}

ARGS=(--durations=20 "$@") # the slowest tests of each pass, to keep CI inside its time budget
RESULTS=()
FIRST_FAILURE=0
pass sqlite env EMBER_TEST_DATABASE_URL=
# the PostgreSQL pass: everything that goes through the store; the store-agnostic tests (the guest agent, the
# jail, the build sandbox, the warm pool: pyproject.toml's markers; unit tests that reach no PostgreSQL database,
# marked by tests/conftest.py) ran in the first pass and use the database as the rest do, or not at all
ARGS+=(-m "not store_agnostic")
pass postgresql scripts/postgres.sh run
for r in "${RESULTS[@]}"; do
    say "$r"
done
count() {  # WORD...: the sum of "N WORD" over both passes' closing lines
    local n=0 word log
    for log in "$logs"/*; do
        for word in "$@"; do
            n=$((n + $(closing "$log" | grep -oE "[0-9]+ $word\b" | awk '{s += $1} END {print s + 0}')))
        done
    done
    echo "$n"
}
echo "total: $(count passed) passed, $(count failed errors error) failed, $(count skipped) skipped"
exit "$FIRST_FAILURE"
