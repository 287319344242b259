"""The jail's command line and cgroup limits (pure), and the jailer's refusal of bad options.

The jailer's confinement itself (mounts, ids, fds) needs root: tests/vm/test_posture.py.
"""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ember.config import Settings
from ember.errors import HostSetupError
from ember.host.binaries import ensure_jailer
from ember.host.cgroup import CgroupLimits, CgroupsV1, CgroupsV2, block_device
from ember.host.jail import JailSpec


def test_argv_carries_every_option_in_order() -> None:
    spec = JailSpec(
        uid=640001, gid=640001, groups=(672768, 672769), cgroup_procs=(Path("/cg/a/cgroup.procs"),),
        root=Path("/data/run/vm1/root"), ro=(Path("/data/guest/k"), Path("/data/images/x/ram")),
        rw=(Path("/data/vms/vm1/disk.qcow2"),), devices=(Path("/dev/kvm"),),
        fsize=3 << 30, keep_fds=4,
    )  # fmt: skip
    assert spec.argv(Path("/bin/ember-jailer"), ["/usr/bin/qemu", "-M", "microvm"]) == [
        "/bin/ember-jailer", "--uid", "640001", "--gid", "640001", "--groups", "672768,672769",
        "--cgroup", "/cg/a/cgroup.procs", "--netns", "--root", "/data/run/vm1/root",
        "--ro", "/data/guest/k", "--ro", "/data/images/x/ram", "--rw", "/data/vms/vm1/disk.qcow2",
        "--dev", "/dev/kvm", "--fsize", str(3 << 30), "--nofile", "4096", "--keep-fds", "4",
        "--", "/usr/bin/qemu", "-M", "microvm",
    ]  # fmt: skip


def test_argv_leaves_out_what_is_not_asked_for() -> None:
    spec = JailSpec(uid=7, gid=8, new_netns=False, root=Path("/r"))
    assert spec.argv(Path("/j"), ["/usr/bin/qemu-img", "info"]) == [
        "/j", "--uid", "7", "--gid", "8", "--root", "/r", "--nofile", "4096", "--keep-fds", "0",
        "--", "/usr/bin/qemu-img", "info",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def jailer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_jailer(tmp_path_factory.mktemp("bin"))


GOOD = ["--uid", "700001", "--gid", "700001", "--root", "/nonexistent-root"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--uid", "0", "--gid", "5", "--root", "/r"], "refusing to run as root"),
        (["--uid", "5", "--gid", "0", "--root", "/r"], "refusing to run as root"),
        (["--uid", "4294967295", "--gid", "5", "--root", "/r"], "out of range"),  # (uid_t)-1: "unchanged"
        (["--uid", "4294967296", "--gid", "5", "--root", "/r"], "out of range"),  # wraps to 0 as a uid_t
        (["--uid", "99999999999999999999999", "--gid", "5", "--root", "/r"], "out of range"),
        (["--uid", "-1", "--gid", "5", "--root", "/r"], "not a number"),
        (["--uid", "+5", "--gid", "5", "--root", "/r"], "not a number"),
        (["--uid", " 5", "--gid", "5", "--root", "/r"], "not a number"),
        (["--uid", "5x", "--gid", "5", "--root", "/r"], "not a number"),
        (["--uid", "", "--gid", "5", "--root", "/r"], "not a number"),
        (["--gid", "5", "--root", "/r"], "required"),
        (["--uid", "5", "--gid", "5"], "required"),
        ([*GOOD, "--groups", "0"], "refusing to run as root"),
        ([*GOOD, "--groups", "5,,6"], "not a number"),
        ([*GOOD, "--groups", "5,"], "not a number"),
        ([*GOOD, "--groups", ",".join(["7"] * 33)], "too many groups"),
        (["--uid", "5", "--gid", "5", "--root", "relative"], "not a clean absolute path"),
        ([*GOOD, "--ro", "etc/passwd"], "not a clean absolute path"),
        ([*GOOD, "--ro", "/"], "not a clean absolute path"),
        ([*GOOD, "--rw", "/etc/"], "not a clean absolute path"),
        ([*GOOD, "--rw", "/data/../etc"], "'.', '..' or an empty component"),
        ([*GOOD, "--ro", "/data/./x"], "'.', '..' or an empty component"),
        ([*GOOD, "--dev", "//dev/kvm"], "'.', '..' or an empty component"),
        ([*GOOD, "--cgroup", "cgroup.procs"], "not a clean absolute path"),
        ([*GOOD, "--fsize", "-1"], "not a number"),
        ([*GOOD, "--fsize", "18446744073709551616"], "out of range"),
        ([*GOOD, "--nofile", "2000000"], "out of range"),
        ([*GOOD, "--keep-fds", "4", "--nofile", "5"], "below the kept fds"),
        ([*GOOD, "--keep-fds", "2"], "a kept fd is not open"),
        ([*GOOD, "--chroot", "/x"], "unknown option"),
        ([*GOOD, "--uid"], "missing value"),
    ],
)
def test_jailer_refuses_bad_options_before_doing_anything(
    jailer: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    marker = tmp_path / "ran"
    proc = subprocess.run(
        [str(jailer), *args, "--", "/usr/bin/touch", str(marker)], capture_output=True, text=True, close_fds=True
    )
    assert proc.returncode == 111, proc
    assert message in proc.stderr, proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize("command", [[], ["touch"], ["--", "/usr/bin/true"]])
def test_jailer_needs_one_absolute_command(jailer: Path, command: list[str]) -> None:
    proc = subprocess.run([str(jailer), *GOOD, "--", *command], capture_output=True, text=True)
    assert proc.returncode == 111 and "missing '-- /absolute/command'" in proc.stderr


def limits(**changes: Any) -> CgroupLimits:
    base = CgroupLimits(memory_bytes=512 << 20, pids_max=64, cpu_quota=1.5, io_device="254:0",
                        io_read_bps=100, io_write_bps=200, io_read_iops=0, io_write_iops=40)  # fmt: skip
    return replace(base, **changes)


def test_for_vm_is_the_guest_plus_the_vmm_overhead(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, vmm_overhead_mib=100, vmm_pids_max=32, vmm_cpu_overhead=0.25,
                        vmm_io_read_bps=1, vmm_io_write_bps=2, vmm_io_read_iops=3, vmm_io_write_iops=4)  # fmt: skip
    assert CgroupLimits.for_vm(settings, 256, 2) == CgroupLimits(
        memory_bytes=356 << 20, pids_max=32, cpu_quota=2.25, io_device=block_device(tmp_path),
        io_read_bps=1, io_write_bps=2, io_read_iops=3, io_write_iops=4,
    )  # fmt: skip


def test_cpu_quota_and_io_limits_of_zero_mean_unlimited() -> None:
    assert limits().cpu_quota_us == 150_000
    assert limits(cpu_quota=0.001).cpu_quota_us == 1000  # the kernel's minimum quota
    assert limits(cpu_quota=0).cpu_quota_us == -1
    assert limits().io_limits == {"rbps": 100, "wbps": 200, "wiops": 40}
    assert limits(io_device="").io_limits == {}  # no disk (e.g. a tmpfs data dir): no io limits


def test_block_device_is_a_whole_disk_or_none() -> None:
    assert block_device(Path("/proc")) == ""  # no block device behind procfs
    disk = block_device(Path("/"))
    if disk:  # a container's overlay root may have none
        assert (Path("/sys/dev/block") / disk).exists()
        assert not (Path("/sys/dev/block") / disk / "partition").exists()


def fake_v2(root: Path, controllers: str) -> Path:
    root.mkdir()
    (root / "cgroup.controllers").write_text(controllers)
    (root / "cgroup.subtree_control").write_text("")
    return root


def test_v2_writes_memory_pids_cpu_and_io_limits(tmp_path: Path) -> None:
    cg = CgroupsV2("ember-x", fake_v2(tmp_path / "cg", "cpuset cpu io memory pids"))
    assert (tmp_path / "cg/ember-x/cgroup.subtree_control").read_text() == "+memory +pids +cpu +io"
    (procs,) = cg.create("vm1", limits())
    d = procs.parent
    assert d == tmp_path / "cg/ember-x/vm1"
    assert (d / "memory.max").read_text() == str(512 << 20)
    assert (d / "pids.max").read_text() == "64"
    assert (d / "cpu.max").read_text() == "150000 100000"
    assert (d / "io.max").read_text() == "254:0 rbps=100 wbps=200 wiops=40"
    (procs,) = cg.create("vm2", limits(cpu_quota=0, io_device=""))
    assert (procs.parent / "cpu.max").read_text() == "max 100000"
    assert not (procs.parent / "io.max").exists()


def test_v2_without_the_cpu_or_io_controller_fails_closed(tmp_path: Path) -> None:
    with pytest.raises(HostSetupError, match="cpu io"):
        CgroupsV2("ember-x", fake_v2(tmp_path / "cg", "memory pids"))


def test_v1_writes_each_hierarchy(tmp_path: Path) -> None:
    for h in ("memory", "pids", "cpu", "blkio"):
        (tmp_path / h).mkdir()
    cg = CgroupsV1("ember-x", tmp_path)
    procs = cg.create("vm1", limits())
    assert procs == [tmp_path / h / "ember-x/vm1/cgroup.procs" for h in ("memory", "pids", "cpu", "blkio")]
    assert (tmp_path / "memory/ember-x/vm1/memory.limit_in_bytes").read_text() == str(512 << 20)
    assert (tmp_path / "pids/ember-x/vm1/pids.max").read_text() == "64"
    assert (tmp_path / "cpu/ember-x/vm1/cpu.cfs_period_us").read_text() == "100000"
    assert (tmp_path / "cpu/ember-x/vm1/cpu.cfs_quota_us").read_text() == "150000"
    blkio = tmp_path / "blkio/ember-x/vm1"
    assert (blkio / "blkio.throttle.read_bps_device").read_text() == "254:0 100"
    assert (blkio / "blkio.throttle.write_bps_device").read_text() == "254:0 200"
    assert not (blkio / "blkio.throttle.read_iops_device").exists()  # 0: no rule
    assert (blkio / "blkio.throttle.write_iops_device").read_text() == "254:0 40"
    assert cg.names() == ["vm1"]


def test_all_vmms_together_weigh_less_than_the_daemon(tmp_path: Path) -> None:
    v2 = fake_v2(tmp_path / "cg", "cpu io memory pids")
    (v2 / "ember-x").mkdir()
    (v2 / "ember-x/cpu.weight").write_text("100")  # the kernel makes it with the directory
    CgroupsV2("ember-x", v2, cpu_weight=25)
    assert (v2 / "ember-x/cpu.weight").read_text() == "25"
    v1 = tmp_path / "v1"
    for h in ("memory", "pids", "cpu", "blkio"):
        (v1 / h).mkdir(parents=True)
    (v1 / "cpu/ember-x").mkdir()
    (v1 / "cpu/ember-x/cpu.shares").write_text("1024")
    CgroupsV1("ember-x", v1, cpu_weight=25)
    assert (v1 / "cpu/ember-x/cpu.shares").read_text() == "256"
