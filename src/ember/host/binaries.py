"""Small static C helpers Ember compiles from its own sources at first use."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

from ember.errors import HostSetupError


def compile_static(source: bytes, out: Path) -> None:
    """Compile one C file into a static, stripped executable at ``out`` (atomically)."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise HostSetupError("a C compiler is needed: apt-get install gcc libc6-dev (scripts/install.sh does this)")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "main.c"
        src.write_bytes(source)
        tmp_out = Path(tmp) / "a.out"
        proc = subprocess.run(
            [cc, "-O2", "-Wall", "-Wextra", "-Werror", "-static", "-o", str(tmp_out), str(src)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise HostSetupError(f"compiling {out.name} failed:\n{proc.stderr[-4000:]}")
        subprocess.run(["strip", str(tmp_out)], check=False, capture_output=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        staged = out.with_name(out.name + ".tmp")
        shutil.copyfile(tmp_out, staged)
        os.chmod(staged, 0o755)
        os.replace(staged, out)


def ensure_jailer(bin_dir: Path) -> Path:
    source = resources.files("ember.host").joinpath("jailer.c").read_bytes()
    out = bin_dir / f"ember-jailer-{hashlib.sha256(source).hexdigest()[:12]}"
    if not out.exists():
        compile_static(source, out)
    return out
