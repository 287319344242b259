#!/usr/bin/env bash
# Install what Ember needs, then run lint, types and the whole test suite
# (unit tests and real micro-VM tests). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
.venv/bin/ruff check src tests bench
.venv/bin/ruff format --check src tests bench
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
