"""Build VMs restored from the builder snapshot, through a real daemon and real build VMs: the
snapshot is root's and read-only to every VMM, no build's state reaches another (each restore is
a private copy-on-write of the template RAM with a fresh RNG seed), the restored VM's network and
COPY --from disks work, and a template damaged on disk is refused and made again."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ember.config import Settings
from ember.sdk import Client
from ember.snapshot import Snapshot, hash_file
from tests.conftest import DaemonProcess, build

pytestmark = [pytest.mark.vm, pytest.mark.store_agnostic]

RESTORED = "starting the build VM (from the builder snapshot)"
# RUN output goes to the build log; the marker lines let the test pick them out.
PROBE = (
    "RUN echo rand-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n') && "
    "if [ -e /dev/shm/marker ]; then echo saw-$(cat /dev/shm/marker); fi && "
    "echo {tag} > /dev/shm/marker && echo route-$(grep -c '^eth0[[:space:]]*00000000' /proc/net/route)\n"
)


def ctx(root: Path, tag: str, extra: str = "") -> Path:
    root.mkdir()
    (root / "Dockerfile").write_text("FROM ember:debian-python3\n" + PROBE.format(tag=tag) + extra)
    return root


def marked(logs: list[str], prefix: str) -> list[str]:
    """Words starting with ``prefix`` in the RUN step's output (log lines '  | ...')."""
    return [word for line in logs if line.startswith("  | ") for word in line.split() if word.startswith(prefix)]


def templates(settings: Settings) -> list[Path]:
    return sorted(p for p in (settings.data_dir / "builder").iterdir() if not p.name.startswith("."))


def test_build_vms_restore_from_a_root_owned_snapshot_and_share_nothing(
    client: Client, daemon: DaemonProcess, tmp_path: Path
) -> None:
    settings: Settings = daemon.settings
    a, logs_a = build(client, ctx(tmp_path / "a", "tenant-a"), "restored-a")
    assert a["state"] == "CREATED", logs_a
    b, logs_b = build(client, ctx(tmp_path / "b", "tenant-b"), "restored-b")
    assert b["state"] == "CREATED", logs_b
    assert any(RESTORED in line for line in logs_b), logs_b

    # two restores of one snapshot: each reseeded (else both would draw the same bytes), neither
    # saw what the other wrote to its RAM (tmpfs), and both have their network configured
    rand_a, rand_b = marked(logs_a, "rand-"), marked(logs_b, "rand-")
    assert len(rand_a) == len(rand_b) == 1 and rand_a != rand_b, (logs_a, logs_b)
    assert marked(logs_a, "saw-") == marked(logs_b, "saw-") == []
    assert marked(logs_b, "route-") == ["route-1"]

    (template,) = [t for t in templates(settings) if t.name.startswith("net-")]
    gid = settings.layer_gid
    for name, owner in ((Snapshot.RAM, (0, gid, 0o440)), (Snapshot.DISK, (0, gid, 0o440)),
                        (Snapshot.STATE, (0, 0, 0o400)), ("token", (0, 0, 0o400))):  # fmt: skip
        st = (template / name).stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == owner, name
    # every build VM mapped the template RAM: none of their writes reached it
    manifest = json.loads((template / "manifest.json").read_text())
    assert hash_file(template / Snapshot.RAM, True).sha256 == manifest["files"]["ram"]["sha256"]


def test_copy_from_disks_fill_the_snapshot_slots(client: Client, tmp_path: Path) -> None:
    root = tmp_path / "multi"
    root.mkdir()
    (root / "Dockerfile").write_text(
        "FROM ember:debian-python3 AS one\nRUN echo from-one > /one.txt\n"
        "FROM ember:debian-python3 AS two\nRUN echo from-two > /two.txt\n"
        "FROM ember:debian-python3\nCOPY --from=one /one.txt /got/\nCOPY --from=two /two.txt /got/\n"
        "RUN cat /got/one.txt /got/two.txt\n"
    )
    image, logs = build(client, root, "restored-multi")
    assert image["state"] == "CREATED", logs
    assert sum(RESTORED in line for line in logs) >= 2, logs
    assert any("from-one" in line for line in logs) and any("from-two" in line for line in logs), logs


def test_a_damaged_template_is_refused_and_made_again(client: Client, daemon: DaemonProcess, tmp_path: Path) -> None:
    settings: Settings = daemon.settings
    image, logs = build(client, ctx(tmp_path / "first", "first"), "damaged-first")
    assert image["state"] == "CREATED", logs
    (template,) = [t for t in templates(settings) if t.name.startswith("net-")]
    daemon.stop()
    ram = template / Snapshot.RAM
    fd = os.open(ram, os.O_WRONLY)  # same size, one byte changed: only its SHA-256 tells
    try:
        os.pwrite(fd, b"\x5a", os.path.getsize(ram) // 2)
    finally:
        os.close(fd)
    damaged = hash_file(ram, True)
    daemon.start()
    with Client(settings=settings) as c:
        image, logs = build(c, ctx(tmp_path / "second", "second"), "damaged-second")
    assert image["state"] == "CREATED", logs
    assert any(RESTORED in line for line in logs), logs
    assert hash_file(ram, True) != damaged  # made again, not used
    assert "builder snapshot" in daemon.log.read_text() and "refused" in daemon.log.read_text()


def test_a_state_damaged_while_in_use_is_never_loaded(client: Client, daemon: DaemonProcess, tmp_path: Path) -> None:
    settings: Settings = daemon.settings
    image, logs = build(client, ctx(tmp_path / "one", "one"), "state-one")
    assert image["state"] == "CREATED", logs
    (template,) = [t for t in templates(settings) if t.name.startswith("net-")]
    state = template / Snapshot.STATE
    fd = os.open(state, os.O_RDWR)  # verified when the daemon first used it: changed since, same size
    try:
        middle = os.path.getsize(state) // 2
        os.pwrite(fd, bytes([os.pread(fd, 1, middle)[0] ^ 0xFF]), middle)
    finally:
        os.close(fd)
    image, logs = build(client, ctx(tmp_path / "two", "two"), "state-two")
    assert image["state"] == "CREATED", logs
    assert any("cold boot: the builder snapshot was damaged" in line for line in logs), logs
    assert not template.exists()  # dropped: the next build makes it again
    image, logs = build(client, ctx(tmp_path / "three", "three"), "state-three")
    assert image["state"] == "CREATED", logs
    assert any(RESTORED in line for line in logs), logs
