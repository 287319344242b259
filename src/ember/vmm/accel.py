"""Choose the accelerator: hardware KVM only where it is really there.

``/dev/kvm`` alone proves nothing (on these machines it is PVM, on which a
stock guest kernel crawls). Hardware KVM means the ``kvm_intel`` or
``kvm_amd`` module is loaded *and* QEMU starts a microvm with ``accel=kvm``
and reports KVM enabled. Everything else runs under TCG, which QEMU's own
security documentation says is not a security boundary: Ember logs that and
shows it in every VM's ``inspect`` output.
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ember.errors import HostSetupError
from ember.vmm.machine import Accel

log = logging.getLogger(__name__)

TCG_WARNING = (
    "running guests under TCG (software emulation): TCG is not a security boundary "
    "(QEMU security docs); use a host with VT-x/AMD-V for isolation"
)


@dataclass(frozen=True)
class AccelChoice:
    accel: Accel
    reason: str


def hardware_kvm_modules(sys_module: Path = Path("/sys/module")) -> list[str]:
    return [m for m in ("kvm_intel", "kvm_amd") if (sys_module / m).is_dir()]


def _kvm_probe(qemu: str) -> bool:
    """Start a bare microvm under KVM and check that QEMU really got KVM."""
    try:
        proc = subprocess.run(
            [qemu, "-M", "microvm,accel=kvm", "-nodefaults", "-nographic", "-S", "-qmp", "stdio"],
            input=b'{"execute":"qmp_capabilities"}\n{"execute":"query-kvm"}\n{"execute":"quit"}\n',
            capture_output=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return b'"enabled": true' in proc.stdout


def choose(mode: str, qemu: str) -> AccelChoice:
    if mode == "tcg":
        return AccelChoice(Accel.TCG, "configured (EMBER_ACCEL=tcg)")
    modules = hardware_kvm_modules()
    usable = bool(modules) and os.access("/dev/kvm", os.R_OK | os.W_OK)
    if mode == "kvm":
        if not usable or not _kvm_probe(qemu):
            raise HostSetupError(
                "EMBER_ACCEL=kvm but hardware KVM is not usable here (kvm_intel/kvm_amd not loaded, "
                "or /dev/kvm refused a VM): use EMBER_ACCEL=auto or tcg"
            )
        return AccelChoice(Accel.KVM, f"configured; {modules[0]} loaded")
    if mode != "auto":
        raise HostSetupError(f"EMBER_ACCEL must be auto, kvm or tcg, not {mode!r}")
    if not modules:
        return AccelChoice(Accel.TCG, "no kvm_intel/kvm_amd module: no hardware virtualization")
    if not usable or not _kvm_probe(qemu):
        return AccelChoice(Accel.TCG, f"{modules[0]} loaded but a KVM probe VM failed")
    return AccelChoice(Accel.KVM, f"{modules[0]} loaded and a probe VM ran")
