"""Lifecycle transitions and configuration (pure logic)."""

from __future__ import annotations

import pytest

from ember.config import Settings
from ember.errors import InvalidStateTransition
from ember.models import TRANSITIONS, VmState, check_transition, require_running
from ember.vmm.machine import Accel, MachineConfig


def test_every_state_has_a_transition_entry() -> None:
    assert set(TRANSITIONS) == set(VmState)


def test_out_of_phase_calls_name_the_fix() -> None:
    with pytest.raises(InvalidStateTransition, match="resume it first with 'ember resume vm-1'"):
        require_running("vm-1", VmState.SUSPENDED, "exec in")
    with pytest.raises(InvalidStateTransition, match="cannot resume VM vm-1 while it is RUNNING"):
        check_transition("vm-1", VmState.RUNNING, VmState.RESUMING, "resume")
    check_transition("vm-1", VmState.SUSPENDED, VmState.RESUMING, "resume")


def test_failed_suspend_and_resume_fall_back_safely() -> None:
    assert VmState.RUNNING in TRANSITIONS[VmState.SUSPENDING]
    assert VmState.SUSPENDED in TRANSITIONS[VmState.RESUMING]


def test_settings_from_env() -> None:
    s = Settings.from_env({"EMBER_MEMORY_MIB": "512", "EMBER_DATA_DIR": "/x", "EMBER_AGENT_TIMEOUT": "2.5"})
    assert (s.memory_mib, str(s.data_dir), s.agent_timeout_s) == (512, "/x", 2.5)
    assert s.db_path.name == "ember.db" and s.cache_dir == s.data_dir / "cache"
    with pytest.raises(ValueError, match="EMBER_MEMORY_MIB='lots' is not a valid int"):
        Settings.from_env({"EMBER_MEMORY_MIB": "lots"})


def test_host_id_layout_is_disjoint() -> None:
    s = Settings.from_env({"EMBER_UID_BASE": "1000", "EMBER_UID_COUNT": "100"})
    assert s.vmm_uids == range(1000, 1050) and s.image_gids == range(1050, 1097)
    assert (s.layer_gid, s.qemu_img_uid) == (1097, 1098)
    singles = {s.layer_gid, s.qemu_img_uid}
    assert not set(s.vmm_uids) & set(s.image_gids) and not singles & (set(s.vmm_uids) | set(s.image_gids))


def test_a_snapshot_restores_only_on_its_own_qemu_release() -> None:
    machine = MachineConfig(Accel.TCG, 256, 1, "/k", "/i", "", "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)")
    assert machine.restores_on("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-3~bpo12+1)")
    assert machine.restores_on("QEMU emulator version 10.0.7")
    assert not machine.restores_on("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18)")
    assert not machine.restores_on("QEMU emulator version 10.1.0")
