"""How fast the CLI starts: median wall time of ``ember ps`` against a running daemon and of
``ember --help``, each a fresh process (prints JSON).

    sudo .venv/bin/python bench/cli_start.py [--runs 30]        # EMBER_SOCKET / EMBER_URL name the daemon

The target (issue 10) is ``ember ps`` under 60 ms. Each command runs once first (warm page cache
and bytecode); a failing ``ember ps`` (no daemon) stops the benchmark. Bytecode is cached as an
installed package's is, in a temporary PYTHONPYCACHEPREFIX (never in the checkout), even when the
environment sets PYTHONDONTWRITEBYTECODE: "compiled" is that figure; "uncached" compiles every
module at every start (what PYTHONDONTWRITEBYTECODE=1 without a cache costs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def ember_command() -> list[str]:
    script = Path(sys.executable).parent / "ember"
    if script.exists():
        return [str(script)]
    found = shutil.which("ember")
    return [found] if found else [sys.executable, "-m", "ember"]


def wall_ms(argv: list[str], runs: int, env: dict[str, str]) -> dict[str, float]:
    subprocess.run(argv, check=True, capture_output=True, env=env)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, env=env)
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return {"median_ms": round(statistics.median(times), 1), "min_ms": round(times[0], 1),
            "p90_ms": round(times[int(len(times) * 0.9) - 1], 1)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    ember = ember_command()
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    with tempfile.TemporaryDirectory(prefix="ember-pycache-") as cache:
        compiled = {**base, "PYTHONPYCACHEPREFIX": cache}
        uncached = {**base, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPYCACHEPREFIX": cache + "/none"}
        result = {
            "command": " ".join(ember),
            "runs": args.runs,
            "compiled": {
                "ember ps": wall_ms([*ember, "ps"], args.runs, compiled),
                "ember --help": wall_ms([*ember, "--help"], args.runs, compiled),
                "python -c pass": wall_ms([sys.executable, "-c", "pass"], args.runs, compiled),
            },
            "uncached": {"ember ps": wall_ms([*ember, "ps"], args.runs, uncached)},
            "target_ms": 60,
        }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
