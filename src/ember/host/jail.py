"""How a VMM (or a ``qemu-img`` run) is confined: the ``ember-jailer`` command line.

:class:`JailSpec` is the whole confinement of one process: ids, cgroups, network
namespace, the files bound into its otherwise empty root, resource limits and the
file descriptors it keeps. ``src/ember/host/jailer.c`` documents what each option
does and in which order; the jailer re-checks everything given here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, kw_only=True)
class JailSpec:
    uid: int
    gid: int
    groups: tuple[int, ...] = ()  # supplementary groups (e.g. an image's group, to read its files)
    cgroup_procs: tuple[Path, ...] = ()  # cgroup.procs files the process joins first
    new_netns: bool = True  # a network namespace of its own: no network at all
    # An existing, empty, root-owned directory no one else can write: the mount point of the new root.
    root: Path
    # Files or directories bound at the same path in the new root. Every path must be absolute and
    # free of symlinks (the jailer refuses one rather than follow it).
    ro: tuple[Path, ...] = ()
    rw: tuple[Path, ...] = ()  # read-write, but nosuid,nodev,noexec
    devices: tuple[Path, ...] = ()  # character devices, e.g. /dev/kvm
    fsize: int = 0  # RLIMIT_FSIZE in bytes; 0 = unlimited
    nofile: int = 4096  # RLIMIT_NOFILE
    keep_fds: int = 0  # fds 3 .. 3 + keep_fds - 1 stay open across exec; every other one is closed

    def argv(self, jailer: Path, command: list[str]) -> list[str]:
        """The jailer's command line that runs ``command`` (its first item an absolute path) so confined."""
        argv = [str(jailer), "--uid", str(self.uid), "--gid", str(self.gid)]
        if self.groups:
            argv += ["--groups", ",".join(map(str, self.groups))]
        for procs in self.cgroup_procs:
            argv += ["--cgroup", str(procs)]
        if self.new_netns:
            argv.append("--netns")
        argv += ["--root", str(self.root)]
        for option, paths in (("--ro", self.ro), ("--rw", self.rw), ("--dev", self.devices)):
            for path in paths:
                argv += [option, str(path)]
        if self.fsize:
            argv += ["--fsize", str(self.fsize)]
        argv += ["--nofile", str(self.nofile), "--keep-fds", str(self.keep_fds), "--", *command]
        return argv
