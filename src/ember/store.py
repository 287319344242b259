"""Durable records of images and VMs (SQLAlchemy Core; SQLite by default)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import (
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine, RowMapping
from sqlalchemy.exc import OperationalError

from ember.errors import ResourceExhausted
from ember.models import BuildRecord, BuildState, ImageRecord, VmRecord, VmState
from ember.vmm.machine import MachineConfig, RamMode

metadata = MetaData()

images = Table(
    "images",
    metadata,
    Column("name", String, primary_key=True),
    Column("machine", Text, nullable=False),
    Column("gid", Integer, nullable=False, unique=True),
    Column("token", String, nullable=False),
    Column("disk_bytes", Integer, nullable=False),
    Column("memory_bytes", Integer, nullable=False),
    Column("created_at", String, nullable=False),
    Column("parent", String, nullable=False),
)

builds = Table(
    "builds",
    metadata,
    Column("name", String, primary_key=True),
    Column("repo", String, nullable=False, index=True),
    Column("version", Integer, nullable=False),
    Column("state", String, nullable=False),
    Column("error", Text, nullable=False),
    Column("step", Text, nullable=False),
    Column("config", Text, nullable=False),
    Column("steps", Text, nullable=False),
    Column("disk_bytes", Integer, nullable=False),
    Column("memory_bytes", Integer, nullable=False),
    Column("seconds", Float, nullable=False),
    Column("created_at", String, nullable=False),
    Column("finished_at", String, nullable=False),
)

vms = Table(
    "vms",
    metadata,
    Column("id", String, primary_key=True),
    Column("image", String, nullable=False),
    Column("state", String, nullable=False),
    Column("machine", Text, nullable=False),
    Column("uid", Integer, nullable=False, unique=True),
    Column("token", String, nullable=False),
    Column("ram", String, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("state_reason", String, nullable=False),
    Column("next_token", String, nullable=False),
    Column("created_at", String, nullable=False),
    Column("updated_at", String, nullable=False),
)


def _image_row(r: ImageRecord) -> dict[str, object]:
    return {
        "name": r.name, "machine": r.machine.to_json(), "gid": r.gid, "token": r.token,
        "disk_bytes": r.disk_bytes, "memory_bytes": r.memory_bytes, "created_at": r.created_at, "parent": r.parent,
    }  # fmt: skip


def _image(row: RowMapping) -> ImageRecord:
    data = dict(row)
    data["machine"] = MachineConfig.from_json(data["machine"])
    return ImageRecord(**data)


def _vm_row(r: VmRecord) -> dict[str, object]:
    return {
        "id": r.id, "image": r.image, "state": r.state.value, "machine": r.machine.to_json(), "uid": r.uid,
        "token": r.token, "ram": r.ram.value, "pid": r.pid, "state_reason": r.state_reason,
        "next_token": r.next_token, "created_at": r.created_at, "updated_at": r.updated_at,
    }  # fmt: skip


def _vm(row: RowMapping) -> VmRecord:
    data = dict(row)
    data["machine"] = MachineConfig.from_json(data["machine"])
    data["state"] = VmState(data["state"])
    data["ram"] = RamMode(data["ram"])
    return VmRecord(**data)


class Store:
    def __init__(self, url_or_path: str | Path) -> None:
        url = url_or_path if isinstance(url_or_path, str) else f"sqlite:///{url_or_path}"
        self.engine: Engine = create_engine(url)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        metadata.create_all(self.engine)

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction; a full disk is reported like every other full disk."""
        try:
            with self.engine.begin() as c:
                yield c
        except OperationalError as exc:
            if "disk is full" in str(exc) or "disk I/O error" in str(exc):
                raise ResourceExhausted(
                    "the host disk is full: Ember cannot record the change; free space and retry"
                ) from exc
            raise

    # images
    def put_image(self, record: ImageRecord) -> None:
        with self._write() as c:
            c.execute(delete(images).where(images.c.name == record.name))
            c.execute(insert(images).values(**_image_row(record)))

    def get_image(self, name: str) -> ImageRecord | None:
        with self.engine.connect() as c:
            row = c.execute(select(images).where(images.c.name == name)).mappings().first()
        return _image(row) if row else None

    def list_images(self) -> list[ImageRecord]:
        with self.engine.connect() as c:
            return [_image(r) for r in c.execute(select(images).order_by(images.c.name)).mappings()]

    def delete_image(self, name: str) -> None:
        with self._write() as c:
            c.execute(delete(images).where(images.c.name == name))

    def latest_image(self, repo: str) -> ImageRecord | None:
        """The newest CREATED version of ``repo``."""
        with self.engine.connect() as c:
            row = c.execute(
                select(images).join(builds, builds.c.name == images.c.name)
                .where(builds.c.repo == repo, builds.c.state == BuildState.CREATED.value)
                .order_by(builds.c.version.desc()).limit(1)
            ).mappings().first()  # fmt: skip
        return _image(row) if row else None

    # builds
    def put_build(self, record: BuildRecord) -> None:
        row = dataclasses.asdict(record) | {"state": record.state.value}
        with self._write() as c:
            c.execute(delete(builds).where(builds.c.name == record.name))
            c.execute(insert(builds).values(**row))

    def get_build(self, name: str) -> BuildRecord | None:
        with self.engine.connect() as c:
            row = c.execute(select(builds).where(builds.c.name == name)).mappings().first()
        return BuildRecord(**{**row, "state": BuildState(row["state"])}) if row else None

    def list_builds(self) -> list[BuildRecord]:
        with self.engine.connect() as c:
            rows = c.execute(select(builds).order_by(builds.c.repo, builds.c.version)).mappings().all()
        return [BuildRecord(**{**r, "state": BuildState(r["state"])}) for r in rows]

    def delete_build(self, name: str) -> None:
        with self._write() as c:
            c.execute(delete(builds).where(builds.c.name == name))

    def next_version(self, repo: str) -> int:
        with self.engine.connect() as c:
            rows = c.execute(select(builds.c.version).where(builds.c.repo == repo)).all()
        return max((r[0] for r in rows), default=0) + 1

    def next_gid(self, gids: range, exclude: set[int] | None = None) -> int:
        with self.engine.connect() as c:
            used = {r[0] for r in c.execute(select(images.c.gid))} | (exclude or set())
        for gid in gids:
            if gid not in used:
                return gid
        raise ResourceExhausted(f"all {len(gids)} image group ids are in use: remove images or raise EMBER_UID_COUNT")

    # vms
    def insert_vm(self, record: VmRecord) -> None:
        with self._write() as c:
            c.execute(insert(vms).values(**_vm_row(record)))

    def update_vm(self, record: VmRecord) -> None:
        with self._write() as c:
            c.execute(update(vms).where(vms.c.id == record.id).values(**_vm_row(record)))

    def get_vm(self, vm_id: str) -> VmRecord | None:
        with self.engine.connect() as c:
            row = c.execute(select(vms).where(vms.c.id == vm_id)).mappings().first()
        return _vm(row) if row else None

    def list_vms(self) -> list[VmRecord]:
        with self.engine.connect() as c:
            return [_vm(r) for r in c.execute(select(vms).order_by(vms.c.created_at)).mappings()]

    def delete_vm(self, vm_id: str) -> None:
        with self._write() as c:
            c.execute(delete(vms).where(vms.c.id == vm_id))

    def free_uid(self, uids: range, exclude: set[int] | None = None) -> int:
        with self.engine.connect() as c:
            used = {r[0] for r in c.execute(select(vms.c.uid))} | (exclude or set())
        for uid in uids:
            if uid not in used:
                return uid
        raise ResourceExhausted(f"all {len(uids)} VMM uids are in use: remove VMs or raise EMBER_UID_COUNT")


def _sqlite_pragmas(dbapi_conn: object, _record: object) -> None:
    cur = dbapi_conn.cursor()  # type: ignore[attr-defined]
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.close()
