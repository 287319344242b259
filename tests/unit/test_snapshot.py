"""Snapshot directories are atomic and refuse damage (real files, no VM)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
from pathlib import Path

import pytest

from ember.errors import SnapshotError
from ember.snapshot import (
    SHA256,
    XXH3,
    Snapshot,
    StreamTap,
    check_digest,
    hash_file,
    load_manifest,
    mapped_ram_offset,
    new_manifest,
    staging,
    verify_files,
)
from ember.vmm.machine import Accel, MachineConfig

MACHINE = MachineConfig(Accel.TCG, 256, 1, "/boot/k", "/i", "console=ttyS0", "QEMU 7.2")


def make(tmp_path: Path) -> Path:
    final = tmp_path / "snap"

    async def stage() -> None:
        async with staging(final) as tmp:
            snap = Snapshot(tmp)
            snap.state.write_bytes(os.urandom(1000))
            snap.write(new_manifest("suspend", MACHINE, {Snapshot.STATE: hash_file(snap.state)}, False))

    asyncio.run(stage())
    return final


def test_round_trip_and_machine_config(tmp_path: Path) -> None:
    final = make(tmp_path)
    manifest = load_manifest(final)
    assert manifest.machine == MACHINE and manifest.kind == "suspend"
    verify_files(manifest, {"state": final / "state"})
    assert [p.name for p in tmp_path.iterdir()] == ["snap"], "staging left files behind"


async def test_failed_staging_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        async with staging(tmp_path / "snap") as tmp:
            (tmp / "state").write_bytes(b"x")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_damage_is_detected(tmp_path: Path) -> None:
    final = make(tmp_path)
    state = final / "state"
    data = bytearray(state.read_bytes())
    data[10] ^= 1
    state.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="SHA-256"):
        verify_files(load_manifest(final), {"state": final / "state"})
    state.write_bytes(bytes(data[:-1]))
    with pytest.raises(SnapshotError, match="manifest says"):
        load_manifest(final)
    (final / "manifest.json").unlink()
    with pytest.raises(SnapshotError, match="incomplete"):
        load_manifest(final)


def test_stream_tap_hashes_what_crosses_it(tmp_path: Path) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 5)
    sink = StreamTap.sink(tmp_path / "out", limit=len(payload))
    view = memoryview(payload)
    while view:
        view = view[os.write(sink.fd, view[: 1 << 16]) :]
    digest = sink.finish()
    assert digest == hash_file(tmp_path / "out") and digest.size == len(payload)
    source = StreamTap.source(tmp_path / "out")
    got = b""
    while chunk := os.read(source.fd, 1 << 20):
        got += chunk
    assert source.finish() == digest and got == payload


def test_sparse_hash_covers_data_and_layout(tmp_path: Path) -> None:
    ram = tmp_path / "ram"
    with open(ram, "wb") as f:
        f.truncate(64 * 1024 * 1024)
        f.seek(8 * 1024 * 1024)
        f.write(b"guest page" * 400)
    digest = hash_file(ram, sparse=True)
    assert digest.sparse and digest.size == 64 * 1024 * 1024
    with open(ram, "r+b") as f:
        f.seek(8 * 1024 * 1024 + 5)
        f.write(b"X")
    changed = hash_file(ram, sparse=True)
    assert changed != digest, "a changed byte must change the sparse digest"
    # the same bytes laid out differently (zeros written instead of a hole) hash the same
    with open(ram, "r+b") as f:
        f.seek(40 * 1024 * 1024)
        f.write(bytes(3 * 1024 * 1024))
    assert hash_file(ram, sparse=True) == changed


@pytest.mark.parametrize("algo", [SHA256, XXH3])
def test_chunk_sums_of_either_kind_catch_one_changed_byte(tmp_path: Path, algo: str) -> None:
    ram = tmp_path / "ram"
    with open(ram, "wb") as f:
        f.truncate(16 * 1024 * 1024)
        f.seek(3 * 1024 * 1024 + 7)
        f.write(os.urandom(5000))
    digest = hash_file(ram, sparse=True, algo=algo)
    assert digest.algo == algo
    with open(ram, "r+b") as f:
        f.seek(3 * 1024 * 1024 + 9)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(SnapshotError, match="damaged"):
        check_digest(ram, digest, hash_file(ram, sparse=True, algo=digest.algo))
    assert hash_file(ram, sparse=True, algo=XXH3) != hash_file(ram, sparse=True, algo=SHA256)


def test_a_manifest_naming_an_unknown_digest_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(SnapshotError, match="unknown file digest"):
        hash_file(tmp_path / "f", sparse=True, algo="md5")
    with pytest.raises(SnapshotError, match="unknown file digest"):
        hash_file(tmp_path / "f", algo=XXH3)  # a whole-file digest is SHA-256 only


def test_a_stream_past_its_limit_is_cut_off_and_fails(tmp_path: Path) -> None:
    """A VMM chooses how much state it streams: the root-written file stops at the limit."""
    sink = StreamTap.sink(tmp_path / "out", limit=1 << 20)
    sent = 0
    with contextlib.suppress(BrokenPipeError):
        while sent < 8 << 20:
            sent += os.write(sink.fd, bytes(1 << 16))
    with pytest.raises(SnapshotError, match="passed 1048576 bytes"):
        sink.finish()
    assert (tmp_path / "out").stat().st_size <= 1 << 20


def _mapped_file(path: Path, ram: int, offset: int, size: int) -> None:
    header = b"QEVM" + b"\x03mem" + struct.pack(">Q", ram) + struct.pack(">IQQQ", 1, 4096, 4096, offset)
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(size)


def test_mapped_ram_offset_is_read_from_the_vmms_header_and_bounded(tmp_path: Path) -> None:
    """The header was written by a VMM: only a page-aligned offset leaving room for all of RAM passes."""
    ram, f = 16 << 20, tmp_path / "ram"
    _mapped_file(f, ram, 1 << 20, (1 << 20) + ram + 4096)
    assert mapped_ram_offset(f, ram) == 1 << 20
    for offset in (1000, 0, (1 << 20) + 4096 + 4096):  # unaligned, none, past the end of the file
        _mapped_file(f, ram, offset, (1 << 20) + ram + 4096)
        with pytest.raises(SnapshotError, match="bad mapped-ram header"):
            mapped_ram_offset(f, ram)
    f.write_bytes(os.urandom(8192))  # no header at all
    with pytest.raises(SnapshotError, match="no mapped-ram header"):
        mapped_ram_offset(f, ram)
