"""Serial logs are capped through the daemon's own descriptor, never through a path."""

from __future__ import annotations

import os
from pathlib import Path

from ember.runtime import cap_log_fd


def test_only_a_lone_regular_log_over_the_cap_is_cut(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    log.write_bytes(b"y" * 4096)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    try:
        assert not cap_log_fd(fd, 8192) and log.stat().st_size == 4096
        os.link(log, tmp_path / "other")  # a second name: not ours alone, left alone
        assert not cap_log_fd(fd, 100) and log.stat().st_size == 4096
        (tmp_path / "other").unlink()
        assert cap_log_fd(fd, 100) and log.stat().st_size == 0
        os.write(fd, b"z" * 10)  # QEMU appends: it goes on at the start
        assert log.read_bytes() == b"z" * 10
    finally:
        os.close(fd)
