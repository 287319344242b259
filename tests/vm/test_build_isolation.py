"""Build isolation through a real daemon and real build VMs (review H5): every build VM runs as a
uid of its own, cached layers are root's and read-only to every VMM, and a layer changed on disk is
noticed on the next build and made again."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from ember.config import Settings
from ember.host.cgroup import group_for
from ember.sdk import Client
from tests.conftest import DaemonProcess, build

pytestmark = [pytest.mark.vm, pytest.mark.store_agnostic]

DOCKERFILE = "FROM ember:debian-python3\nRUN echo {tag} > /made-by-run && sleep {sleep}\n"


def ctx(root: Path, tag: str, sleep: int = 0) -> Path:
    root.mkdir()
    (root / "Dockerfile").write_text(DOCKERFILE.format(tag=tag, sleep=sleep))
    return root


def build_vm_uids(settings: Settings) -> set[int]:
    """The uids of this daemon's build VMMs running now (in its cgroups named build-*)."""
    marker = f"/{group_for(settings.data_dir)}/build-"
    uids = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker in Path(f"/proc/{pid}/cgroup").read_text():
                uids.add(os.stat(f"/proc/{pid}").st_uid)
        except OSError:
            continue
    return uids


def test_layers_are_roots_and_read_only_to_vmms(client: Client, daemon: DaemonProcess, tmp_path: Path) -> None:
    image, logs = build(client, ctx(tmp_path / "c", "layers"), "isolated-layers")
    assert image["state"] == "CREATED", logs
    settings: Settings = daemon.settings
    layers = sorted((settings.data_dir / "layers").glob("*.qcow2"))
    assert layers
    for layer in layers:
        st = layer.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777, st.st_nlink) == (0, settings.layer_gid, 0o440, 1), layer
        assert st.st_uid not in settings.vmm_uids
    st = (settings.data_dir / "layers").stat()
    assert st.st_uid == 0 and not st.st_mode & 0o022


def test_a_cached_layer_changed_on_disk_is_rebuilt(client: Client, daemon: DaemonProcess, tmp_path: Path) -> None:
    image, logs = build(client, ctx(tmp_path / "a", "tamper"), "tamper-a")
    assert image["state"] == "CREATED", logs
    layers = daemon.settings.data_dir / "layers"
    markers = [m for m in layers.glob("*.json") if len(json.loads(m.read_text())["chain"]) >= 2]
    assert markers
    for marker in markers:  # every RUN layer: a byte changed, its mtime put back (ctime still moves)
        disk = marker.with_suffix(".qcow2")
        st = disk.stat()
        with open(disk, "r+b") as f:
            f.seek(st.st_size - 1)
            last = f.read(1)
            f.seek(st.st_size - 1)
            f.write(bytes([last[0] ^ 1]))
        os.utime(disk, ns=(st.st_atime_ns, st.st_mtime_ns))
    image, logs = build(client, ctx(tmp_path / "b", "tamper"), "tamper-b")
    assert image["state"] == "CREATED", logs
    run_lines = [line for line in logs if "RUN echo tamper" in line]
    assert run_lines and not any("CACHED" in line for line in run_lines), logs


def test_concurrent_build_vms_run_under_different_uids(client: Client, daemon: DaemonProcess, tmp_path: Path) -> None:
    seen: list[set[int]] = []
    results: dict[str, dict[str, object]] = {}

    def run(name: str) -> None:
        results[name], _ = build(client, ctx(tmp_path / name, name, sleep=20), name)

    threads = [threading.Thread(target=run, args=(name,)) for name in ("uid-a", "uid-b")]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 600
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        seen.append(build_vm_uids(daemon.settings))
        time.sleep(0.5)
    for t in threads:
        t.join()
    assert all(r["state"] == "CREATED" for r in results.values()), results
    assert any(len(uids) == 2 for uids in seen), seen  # both build VMs at once, each its own uid
    settings: Settings = daemon.settings
    every = set().union(*seen)
    assert every <= set(settings.vmm_uids) and settings.qemu_img_uid not in every
