"""Serial logs are capped without ever following what a VMM uid could plant in its run directory."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from ember.runtime import cap_log_file, keep_serial_capped


def test_serial_log_symlink_is_not_followed_and_only_a_lone_regular_file_is_cut(tmp_path: Path) -> None:
    victim = tmp_path / "victim"  # libc, ember.db, another tenant's disk...
    victim.write_bytes(b"x" * 4096)
    link = tmp_path / "serial.log"
    link.symlink_to(victim)
    assert not cap_log_file(link, 100) and victim.stat().st_size == 4096
    link.unlink()
    os.link(victim, link)  # a hard link to it
    assert not cap_log_file(link, 100) and victim.stat().st_size == 4096
    link.unlink()
    link.write_bytes(b"y" * 4096)
    assert cap_log_file(link, 100) and link.stat().st_size == 0


async def test_keep_serial_capped_cuts_a_growing_log(tmp_path: Path) -> None:
    """Build and capture VMs run this beside them, as launched VMs do."""
    log = tmp_path / "serial.log"
    log.write_bytes(b"")
    task = asyncio.create_task(keep_serial_capped(log, "vm-1", 1000))
    try:
        for _ in range(20):
            with open(log, "ab") as f:
                f.write(b"z" * 600)
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        assert log.stat().st_size <= 1000 + 600
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
