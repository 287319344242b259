"""How fast the CLI starts: median wall time of ``ember ps`` against a running daemon and of
``ember --help``, each a fresh process (prints JSON).

    sudo flock /tmp/ember-vm.lock .venv/bin/python bench/cli_start.py [--runs 30] [--running]

It starts a daemon of its own (as root; a temporary data directory, no image, so no VM boots)
and stops it at the end; ``--running`` measures against the daemon EMBER_SOCKET / EMBER_URL name
instead. The target (issue 10) is ``ember ps`` under 60 ms. Each command runs once first (warm
page cache and bytecode); a failing command stops the benchmark.

Two bytecode modes: "compiled" caches bytecode as an installed package has it (in a temporary
PYTHONPYCACHEPREFIX, never in the checkout, even when the environment sets
PYTHONDONTWRITEBYTECODE): the figure the target is about. "sources" is PYTHONDONTWRITEBYTECODE=1
on a checkout without __pycache__ (a development sandbox; measured on a copy of the package): the
standard library's bytecode is cached, Ember's own modules are compiled at every start.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UID_BLOCK = 2048  # host ids of the benchmark's own daemon (it starts no VM)


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


def _accepting(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


@contextmanager
def own_daemon() -> Iterator[dict[str, str]]:
    """A daemon in a temporary data directory; yields the environment that names it."""
    with tempfile.TemporaryDirectory(prefix="ember-cli-bench-") as tmp:
        data = Path(tmp)
        env = {
            **os.environ,
            "EMBER_DATA_DIR": str(data),
            "EMBER_SOCKET": str(data / "ember.sock"),
            "EMBER_DATABASE_URL": "",
            "EMBER_UID_BASE": str(1_900_000 + (os.getpid() % 200) * UID_BLOCK),
            "EMBER_UID_COUNT": str(UID_BLOCK),
            "EMBER_POOL_SIZE": "0",
        }
        env.pop("EMBER_URL", None)
        with open(data / "daemon.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "ember", "serve"], stdout=log, stderr=log, env=env)
        try:
            deadline = time.monotonic() + 60
            while not _accepting(data / "ember.sock"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the daemon did not start:\n{(data / 'daemon.log').read_text()[-3000:]}")
                time.sleep(0.05)
            yield env
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def measure(ember: list[str], runs: int, env: dict[str, str]) -> dict[str, object]:
    base = {k: v for k, v in env.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    with tempfile.TemporaryDirectory(prefix="ember-pycache-") as cache:
        compiled = {**base, "PYTHONPYCACHEPREFIX": cache}
        # a copy of the package without bytecode, first on the path: compiled at every start
        shutil.copytree(
            ROOT / "src" / "ember", Path(cache, "src", "ember"), ignore=shutil.ignore_patterns("__pycache__")
        )
        sources = {**base, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(Path(cache, "src"))}
        return {
            "command": " ".join(ember),
            "runs": runs,
            "compiled": {
                "ember ps": wall_ms([*ember, "ps"], runs, compiled),
                "ember --help": wall_ms([*ember, "--help"], runs, compiled),
                "python -c pass": wall_ms([sys.executable, "-c", "pass"], runs, compiled),
            },
            "sources": {
                "ember ps": wall_ms([*ember, "ps"], runs, sources),
                "ember --help": wall_ms([*ember, "--help"], runs, sources),
            },
            "target_ms": 60,
        }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--running", action="store_true", help="measure against the daemon EMBER_SOCKET/EMBER_URL name")
    args = parser.parse_args()
    ember = ember_command()
    if args.running:
        result = measure(ember, args.runs, dict(os.environ))
    else:
        with own_daemon() as env:
            result = measure(ember, args.runs, env)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
