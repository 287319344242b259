"""Sandbox posture: what a process Ember jails can see and do, read from the host's /proc.

Modelled on gVisor's sandboxposture_test: instead of trusting the code that builds the
jail, look at the running process (ids, namespaces, no_new_privs, seccomp, fds, root,
cwd, environment, rlimits, cgroup limits). First the jailer alone (``ember-jailer`` on a
plain command, with hostile options), then the VMM of a running VM (launched and resumed).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ember.config import Settings
from ember.host import cgroup
from ember.host.binaries import ensure_jailer
from ember.host.cgroup import CgroupLimits, block_device
from ember.host.jail import JailSpec
from ember.sdk import Client, Request
from tests.conftest import DaemonProcess, vm_tests_possible

pytestmark = pytest.mark.vm

JAIL_UID = 799_990  # below the test daemons' uid blocks (tests.conftest)
FSIZE = 3 << 30
MERGED_USR = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


# ---- reading a process -----------------------------------------------------------


def status(pid: int, task: str = "") -> dict[str, str]:
    lines = Path(f"/proc/{pid}", task, "status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def fds(pid: int) -> dict[int, str]:
    base = Path(f"/proc/{pid}/fd")
    out = {}
    for name in os.listdir(base):
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile
            out[int(name)] = os.readlink(base / name)
    return out


def limits(pid: int) -> dict[str, tuple[str, str]]:
    out = {}
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]:
        m = re.match(r"(Max [a-z ]+?)\s{2,}(\S+)\s+(\S+)", line)
        if m:
            out[m[1]] = (m[2], m[3])
    return out


@dataclass(frozen=True)
class Mount:
    point: str
    options: frozenset[str]


def mounts(pid: int) -> list[Mount]:
    out = []
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        out.append(Mount(fields[4], frozenset(fields[5].split(","))))
    return out


def tree(pid: int) -> dict[str, str]:
    """Every path in the process's root (not inside /usr): "dir", "file", "chr" or "-> target"."""
    root = Path(f"/proc/{pid}/root")
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = "/" + os.path.relpath(dirpath, root) if dirpath != str(root) else ""
        for name in sorted(dirnames + filenames):
            full, path = os.path.join(dirpath, name), f"{rel}/{name}"
            st = os.lstat(full)
            if os.path.islink(full):
                out[path] = "-> " + os.readlink(full)
            elif os.path.isdir(full):
                out[path] = "dir"
            else:
                out[path] = "chr" if (st.st_mode & 0o170000) == 0o020000 else "file"
        if rel == "":
            dirnames[:] = [d for d in dirnames if d != "usr"]  # the host's /usr, read-only
    return out


def same_file(a: str, b: str) -> bool:
    sa, sb = os.stat(a), os.stat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def ancestors(path: Path) -> set[str]:
    return {str(p) for p in path.parents if p != Path("/")}


def host_usr_links() -> dict[str, str]:
    return {f"/{n}": "-> " + os.readlink(f"/{n}") for n in MERGED_USR if os.path.islink(f"/{n}")}


def cgroup_dirs(pid: int) -> dict[str, Path]:
    """The process's cgroup directory per controller ("" for cgroup v2)."""
    out = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            out[c] = Path("/sys/fs/cgroup", c, path.lstrip("/")) if c else Path("/sys/fs/cgroup", path.lstrip("/"))
    return out


# ---- the jailer alone ------------------------------------------------------------


@pytest.fixture(scope="module")
def jailer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = vm_tests_possible()
    if reason:
        pytest.fail(reason)
    return ensure_jailer(tmp_path_factory.mktemp("bin"))


def spawn(argv: list[str], keep: list[int], log: Path) -> int:
    """Start argv with ``keep`` at fds 3, 4, ... (as the daemon does)."""
    log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        actions = [(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                   (os.POSIX_SPAWN_DUP2, log_fd, 1), (os.POSIX_SPAWN_DUP2, log_fd, 2)]  # fmt: skip
        actions += [(os.POSIX_SPAWN_DUP2, fd, 3 + i) for i, fd in enumerate(keep)]
        return os.posix_spawn(argv[0], argv, {"LEAK": "me"}, file_actions=actions)
    finally:
        os.close(log_fd)


def wait_exec(pid: int, exe: str, log: Path) -> None:
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/exe") == exe:
                return
        done, _ = os.waitpid(pid, os.WNOHANG)
        assert done == 0, f"the jailer failed: {log.read_text()}"
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.fixture
def jailed_sleep(jailer: Path, tmp_path: Path) -> Iterator[tuple[int, dict[str, Path], list[int]]]:
    """``sleep`` run through the jailer with one of each option; yields (pid, its paths, kept fds)."""
    paths = {"root": tmp_path / "root", "kernel": tmp_path / "guest/kernel", "image": tmp_path / "images/x",
             "vm": tmp_path / "vms/x", "secret": tmp_path / "secret"}  # fmt: skip
    paths["root"].mkdir(mode=0o700)
    paths["image"].mkdir(parents=True)
    (paths["image"] / "disk").write_bytes(b"template")
    paths["vm"].mkdir(parents=True)
    (paths["vm"] / "disk").write_bytes(b"overlay")
    os.chown(paths["vm"], JAIL_UID, JAIL_UID)
    paths["kernel"].parent.mkdir()
    paths["kernel"].write_bytes(b"kernel")
    paths["secret"].write_bytes(b"not bound")
    groups = cgroup.detect(f"ember-posture-{os.getpid()}")
    procs = groups.create("jailer", CgroupLimits(memory_bytes=64 << 20, pids_max=8, cpu_quota=0.5))
    r, w = os.pipe()
    spec = JailSpec(
        uid=JAIL_UID, gid=JAIL_UID, groups=(JAIL_UID + 1,), cgroup_procs=tuple(procs), root=paths["root"],
        ro=(paths["kernel"], paths["image"]), rw=(paths["vm"],), devices=(Path("/dev/full"),),
        fsize=FSIZE, nofile=512, keep_fds=2,
    )  # fmt: skip
    pid = spawn(spec.argv(jailer, ["/usr/bin/sleep", "60"]), [r, w], tmp_path / "log")
    try:
        wait_exec(pid, "/usr/bin/sleep", tmp_path / "log")
        yield pid, paths, [os.fstat(r).st_ino, os.fstat(w).st_ino]
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(r)
        os.close(w)
        groups.destroy("jailer")
        groups.release()


def test_jailed_process_has_only_its_ids_fds_and_limits(jailed_sleep: tuple[int, dict[str, Path], list[int]]) -> None:
    pid, _, pipe_inodes = jailed_sleep
    st = status(pid)
    assert st["Uid"].split() == [str(JAIL_UID)] * 4
    assert st["Gid"].split() == [str(JAIL_UID)] * 4
    assert st["Groups"].split() == [str(JAIL_UID + 1)]
    assert st["NoNewPrivs"] == "1"
    assert st["Umask"] == "0077"
    assert all(v == "0000000000000000" for k, v in st.items() if k.startswith("Cap") and k != "CapBnd")
    for ns in ("mnt", "net"):
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}")
    open_fds = fds(pid)
    assert sorted(open_fds) == [0, 1, 2, 3, 4]  # stdio and the two kept fds: nothing else leaked
    assert open_fds[0] == "/dev/null"
    assert [open_fds[3], open_fds[4]] == [f"pipe:[{ino}]" for ino in pipe_inodes]
    assert Path(f"/proc/{pid}/environ").read_bytes() == b""
    lim = limits(pid)
    assert lim["Max file size"] == (str(FSIZE), str(FSIZE))
    assert lim["Max core file size"] == ("0", "0")
    assert lim["Max open files"] == ("512", "512")
    dirs = cgroup_dirs(pid)
    joined = [dirs[c] for c in ("memory", "pids", "cpu", "blkio")] if "memory" in dirs else [dirs[""]]
    assert all(d.name == "jailer" and d.parent.name == f"ember-posture-{os.getpid()}" for d in joined)


def test_jailed_root_holds_only_what_was_bound(jailed_sleep: tuple[int, dict[str, Path], list[int]]) -> None:
    pid, paths, _ = jailed_sleep
    kernel, image, vm = paths["kernel"], paths["image"], paths["vm"]
    expected = {p: "dir" for p in ancestors(kernel) | ancestors(image) | ancestors(vm) | {str(image), str(vm)}}
    expected |= {str(kernel): "file", f"{image}/disk": "file", f"{vm}/disk": "file", "/usr": "dir", "/dev": "dir"}
    expected |= {f"/dev/{d}": "chr" for d in ("null", "zero", "urandom", "full")}
    expected |= host_usr_links()
    assert tree(pid) == expected  # no /proc, /sys, /etc, /tmp, no secret, no other VM
    assert same_file(f"/proc/{pid}/cwd", f"/proc/{pid}/root")
    want = {
        "/": {"ro", "nosuid", "nodev", "noexec"},
        "/usr": {"ro", "nosuid", "nodev"},
        str(kernel): {"ro", "nosuid", "nodev"},
        str(image): {"ro", "nosuid", "nodev"},
        str(vm): {"rw", "nosuid", "nodev", "noexec"},
        **{f"/dev/{d}": {"rw", "nosuid", "noexec"} for d in ("null", "zero", "urandom", "full")},
    }
    got = {m.point: m.options for m in mounts(pid)}
    assert sorted(got) == sorted(want)  # the host's root is detached: no other mount is reachable
    for point, options in want.items():
        assert options <= got[point], point
    assert all("nodev" not in got[f"/dev/{d}"] for d in ("null", "zero", "urandom", "full"))  # usable devices


def test_jailed_process_reaches_what_was_bound_and_nothing_else(jailer: Path, tmp_path: Path) -> None:
    """With the daemon's umask (077): the uid runs a /usr program, reads a read-only bind, writes a
    read-write one and /dev/null, and cannot write its root or reach a host path left out."""
    root, kernel, vm = tmp_path / "root", tmp_path / "guest/kernel", tmp_path / "vms/x"
    root.mkdir(mode=0o700)
    kernel.parent.mkdir()
    kernel.write_bytes(b"kernel")
    vm.mkdir(parents=True)
    os.chown(vm, JAIL_UID, JAIL_UID)
    (tmp_path / "secret").write_bytes(b"secret")
    spec = JailSpec(uid=JAIL_UID, gid=JAIL_UID, root=root, ro=(kernel,), rw=(vm,))
    script = (
        f"cat {kernel} && echo x >/dev/null && echo y >{vm}/new && ! touch /new 2>/dev/null"
        f" && ! cat {tmp_path}/secret 2>/dev/null && test ! -e /etc -a ! -e /proc -a ! -e /sys -a ! -e /root"
    )
    old = os.umask(0o077)
    try:
        proc = subprocess.run(spec.argv(jailer, ["/usr/bin/sh", "-c", script]), capture_output=True, text=True)
    finally:
        os.umask(old)
    assert (proc.returncode, proc.stdout) == (0, "kernel"), proc.stderr
    assert (vm / "new").read_text() == "y\n" and (vm / "new").stat().st_uid == JAIL_UID
    assert (vm / "new").stat().st_mode & 0o777 == 0o600  # the VMM's own umask is 077


def run_jailer(jailer: Path, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    marker = tmp_path / "ran"
    proc = subprocess.run(
        [str(jailer), "--uid", str(JAIL_UID), "--gid", str(JAIL_UID), *args, "--", "/usr/bin/touch", str(marker)],
        capture_output=True,
        text=True,
    )
    assert not marker.exists()
    return proc


def test_jailer_never_binds_through_a_symlink(jailer: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir(mode=0o700)
    vm = tmp_path / "vm"  # a directory a VMM uid could write
    vm.mkdir()
    (vm / "disk").symlink_to("/etc/shadow")
    (vm / "up").symlink_to("/etc")
    for path in (vm / "disk", vm / "up" / "shadow"):
        proc = run_jailer(jailer, ["--root", str(root), "--rw", str(path)], tmp_path)
        assert proc.returncode == 111 and "Too many levels of symbolic links" in proc.stderr, proc.stderr
    proc = run_jailer(jailer, ["--root", str(root), "--dev", str(vm / "up" / "shadow")], tmp_path)
    assert proc.returncode == 111, proc.stderr
    (vm / "file").write_bytes(b"")
    proc = run_jailer(jailer, ["--root", str(root), "--dev", str(vm / "file")], tmp_path)
    assert proc.returncode == 111 and "not a character device" in proc.stderr


def test_jailer_refuses_an_unsafe_root(jailer: Path, tmp_path: Path) -> None:
    def check(root: Path, message: str) -> None:
        proc = run_jailer(jailer, ["--root", str(root)], tmp_path)
        assert proc.returncode == 111 and message in proc.stderr, proc.stderr

    full = tmp_path / "full"
    full.mkdir(mode=0o700)
    (full / "x").write_bytes(b"")
    check(full, "not empty")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, JAIL_UID, JAIL_UID)
    check(theirs, "not a root-owned directory")
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o775)
    check(shared, "not a root-owned directory")
    (tmp_path / "link").symlink_to(tmp_path / "full")
    check(tmp_path / "link", "Too many levels of symbolic links")
    (tmp_path / "file").write_bytes(b"")
    check(tmp_path / "file", "not a root-owned directory")


# ---- the VMM of a running VM -----------------------------------------------------


def under(path: str, *dirs: Path) -> bool:
    return any(Path(path).is_relative_to(d) for d in dirs)


def test_vmm_posture(vm: str, client: Client, daemon: DaemonProcess, settings: Settings) -> None:
    info = client.send(Request("GET", f"/v1/vms/{vm}"))
    pid = info["pid"]
    assert pid and daemon.proc is not None
    data = settings.data_dir
    # the VM's own files, its root-owned control directory (logs), its image's files, the guest kernel
    allowed = (data / "vms" / vm, data / "run" / vm, data / "images" / info["image"], settings.guest_dir)

    # ids: its own uid and group, at most its image's group besides
    st = status(pid)
    uid = int(st["Uid"].split()[0])
    assert uid in settings.vmm_uids
    assert st["Uid"].split() == [str(uid)] * 4
    assert st["Gid"].split() == [str(uid)] * 4
    groups = [int(g) for g in st["Groups"].split()]
    assert len(groups) <= 1 and all(g in settings.image_gids for g in groups), groups
    assert all(v == "0000000000000000" for k, v in st.items() if k.startswith("Cap") and k != "CapBnd")
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"  # QEMU's -sandbox filter
    assert os.readlink(f"/proc/{pid}/exe") == os.path.realpath(shutil.which(settings.qemu_binary) or "?")
    # every thread as confined as the process (seccomp synced to all), no child process, no terminal
    keys = ("Uid", "Gid", "Groups", "NoNewPrivs", "Seccomp", "CapPrm", "CapEff", "CapAmb")
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that just exited
            ts = status(pid, f"task/{task.name}")
            assert {k: ts[k] for k in keys} == {k: st[k] for k in keys}, task.name
            assert (task / "children").read_text().split() == [], task.name
    assert Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[4] == "0"  # tty_nr

    # namespaces: neither the daemon's mounts nor its network
    for ns in ("mnt", "net", "ipc", "uts", "cgroup"):  # SysV IPC too: no segment outlives it or reaches the host's
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/{daemon.proc.pid}/ns/{ns}"), ns

    # fds: stdio, sockets, QEMU's own anonymous ones, and files of this VM only
    for fd, target in fds(pid).items():
        if target.startswith(("socket:[", "anon_inode:", "pipe:[")) or target in ("/dev/null", "/dev/kvm"):
            continue
        assert target.startswith("/") and under(target, *allowed), (fd, target)
    assert fds(pid)[0] == "/dev/null"
    image_dir = data / "images" / info["image"]
    for fd, target in fds(pid).items():  # the image's disk and template RAM: read-only (review H3, H4)
        if under(target, image_dir):
            flags = int(Path(f"/proc/{pid}/fdinfo/{fd}").read_text().split("flags:")[1].split()[0], 8)
            assert flags & os.O_ACCMODE == os.O_RDONLY, (fd, target)

    # root: only the jail's content (what QEMU needs, this VM's files), read-only; cwd is its root
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    # a restored VMM boots nothing: no -kernel or -initrd, and no kernel in its root
    assert "-kernel" not in argv and "-initrd" not in argv and "-append" not in argv, argv
    boot: tuple[Path, ...] = ()
    bound = (data / "vms" / vm, data / "images" / info["image"], settings.guest_dir, *boot)
    fixed = {"/usr", "/dev", "/dev/null", "/dev/zero", "/dev/urandom", "/dev/kvm", *host_usr_links()}
    for path in tree(pid):
        on_the_way = any(d.is_relative_to(path) for d in bound)  # a directory leading to a bound path
        assert path in fixed or on_the_way or under(path, *bound), path
    for absent in ("/etc", "/proc", "/sys", "/tmp/.X11-unix", "/root", "/home", "/run", str(data / "ember.db")):
        assert not os.path.lexists(f"/proc/{pid}/root{absent}"), absent
    for m in mounts(pid):
        if m.point == "/" or under(m.point, image_dir):
            assert "ro" in m.options, m
        if not m.point.startswith("/dev/"):
            assert {"nosuid", "nodev"} <= m.options and ("ro" in m.options or "noexec" in m.options), m
    assert same_file(f"/proc/{pid}/cwd", f"/proc/{pid}/root")
    assert Path(f"/proc/{pid}/environ").read_bytes() == b""

    # rlimits
    lim = limits(pid)
    assert lim["Max file size"][0] != "unlimited" and lim["Max file size"][0] == lim["Max file size"][1]
    assert lim["Max core file size"] == ("0", "0")

    # cgroup limits
    want = CgroupLimits.for_vm(settings, info["memory_mib"], info["vcpus"])
    dirs = cgroup_dirs(pid)
    if "memory" in dirs:  # v1
        assert (dirs["memory"] / "memory.limit_in_bytes").read_text().strip() == str(want.memory_bytes)
        assert (dirs["pids"] / "pids.max").read_text().strip() == str(want.pids_max)
        assert (dirs["cpu"] / "cpu.cfs_quota_us").read_text().strip() == str(want.cpu_quota_us)
        for key, name in cgroup.CgroupsV1.THROTTLE.items():
            rule = (dirs["blkio"] / f"blkio.throttle.{name}").read_text().split()
            assert rule == ([want.io_device, str(want.io_limits[key])] if key in want.io_limits else []), name
    else:
        d = dirs[""]
        assert (d / "memory.max").read_text().strip() == str(want.memory_bytes)
        assert (d / "pids.max").read_text().strip() == str(want.pids_max)
        assert (d / "cpu.max").read_text().split() == [str(want.cpu_quota_us), str(cgroup.CPU_PERIOD_US)]
        if want.io_limits:
            io = (d / "io.max").read_text().split()
            assert io[0] == want.io_device and {f"{k}={v}" for k, v in want.io_limits.items()} <= set(io[1:])
    assert want.io_device == block_device(settings.data_dir)
