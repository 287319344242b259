"""What the AWS API keeps of the images it creates (tables ``aws_images``, ``aws_image_versions``), and the
pure rules that show Ember's builds as AWS's image, version and build states.

**Names.** An AWS image name is ``[A-Za-z0-9_-]{1,64}`` and case-sensitive; an Ember repo is lowercase
(``[a-z0-9][a-z0-9._-]{0,62}``). An image whose name is already a valid Ember repo (lowercase, starting with
a letter or digit, not a built-in base's name) gets the repo of that very name, so ``ember run myapp`` and
``ember image ls`` show it as the tenant named it; any other name gets ``aws-<lowercased name, at most 40
characters>-<8 hex of the name's SHA-256>`` (``MyApp`` -> ``aws-myapp-0b3f...``), distinct from every
lowercase name. The mapping is recorded (``aws_images.repo``), never recomputed, and a repo the tenant
already uses (an image built with ``ember image build``) makes the create a ConflictException.

**Numbers.** Each version is one Ember build (``repo:version``; ``imageVersion`` is that number as a string,
``buildId`` a random id of the build). The image keeps the highest number it gave (``last_version``), also once
deleted, so a number is never given twice, not even to an image deleted and made again (whose VMs' hooks and
snapshots are then never taken for the old one's).

**States.** A version is recorded once its build record exists (a build refused before that records nothing,
and a new image is not shown before its first version is). Its state: IN_PROGRESS while BUILDING, SUCCESSFUL
when CREATED, FAILED when CREATE_FAILED or when its build record is gone (removed through Ember's own API),
DELETED once deleted (its build and files are gone). The image's state follows its newest live version:
CREATING / CREATED / CREATE_FAILED while that is its first version, UPDATING / UPDATED / UPDATE_FAILED after an
update; DELETED once deleted (deletion is synchronous: DELETING is never shown). Builds map as versions do
(IN_PROGRESS, SUCCESSFUL, FAILED), on X86_64 / INTEL only.

**Status.** Every version is ACTIVE when made; UpdateMicrovmImageVersion sets INACTIVE (or back): an INACTIVE
version cannot be run (:func:`ember.aws.images.runnable_version`).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Engine, and_, delete, insert, select

from ember.aws.errors import ValidationException
from ember.db.schema import aws_image_versions, aws_images
from ember.db.store import write_transaction
from ember.images import RESERVED_NAMES
from ember.models import BuildRecord, BuildState
from ember.tenancy import names

T = TypeVar("T")
AWS_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
HASHED_PREFIX = "aws-"
HASHED_STEM = 40  # characters of the lowercased name kept in a hashed repo name


def repo_for(name: str) -> str:
    """The Ember repo (public, without its tenant) an AWS image ``name`` gets (see the module's docstring)."""
    if names.REPO.match(name) and name not in RESERVED_NAMES and not name.startswith(HASHED_PREFIX):
        return name
    stem = re.sub(r"[^a-z0-9_-]", "", name.lower())[:HASHED_STEM].strip("_-")
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{HASHED_PREFIX}{stem}-{digest}" if stem else f"{HASHED_PREFIX}{digest}"


@dataclass(frozen=True)
class AwsImage:
    tenant: str
    name: str  # the AWS name
    repo: str  # the Ember repo (internal: ember.tenancy.names)
    tags: dict[str, str]
    created_at: str
    updated_at: str
    deleted_at: str = ""  # also while its first version's build is being started (not shown before)
    last_version: int = 0  # the highest version number it gave


@dataclass(frozen=True)
class AwsVersion:
    tenant: str
    name: str
    version: int
    build_id: str
    status: str  # ACTIVE or INACTIVE
    spec: dict[str, Any]  # the create/update request's members, as the API shows them back
    created_at: str
    updated_at: str
    deleted_at: str = ""

    def build_name(self, repo: str) -> str:
        return f"{repo}:{self.version}"


class AwsImageStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def get(self, tenant: str, name: str) -> AwsImage | None:
        """The image (also a deleted one) ``tenant`` named ``name``."""
        where = and_(aws_images.c.tenant == tenant, aws_images.c.name == name)
        with self.engine.connect() as c:
            row = c.execute(select(aws_images).where(where)).mappings().first()
        return _image(row) if row else None

    def by_repo(self, repo: str) -> AwsImage | None:
        with self.engine.connect() as c:
            row = c.execute(select(aws_images).where(aws_images.c.repo == repo)).mappings().first()
        return _image(row) if row else None

    def images(self, tenant: str) -> list[AwsImage]:
        """The tenant's live images, by name."""
        where = and_(aws_images.c.tenant == tenant, aws_images.c.deleted_at == "")
        with self.engine.connect() as c:
            rows = c.execute(select(aws_images).where(where).order_by(aws_images.c.name)).mappings().all()
        return [_image(r) for r in rows]

    def put(self, image: AwsImage) -> None:
        where = and_(aws_images.c.tenant == image.tenant, aws_images.c.name == image.name)
        row = dataclasses.asdict(image) | {"tags": json.dumps(image.tags, sort_keys=True)}
        with write_transaction(self.engine) as c:
            c.execute(delete(aws_images).where(where))
            c.execute(insert(aws_images).values(**row))

    def versions(self, tenant: str, name: str) -> list[AwsVersion]:
        """Every version of the image (deleted ones too), oldest first."""
        where = and_(aws_image_versions.c.tenant == tenant, aws_image_versions.c.name == name)
        query = select(aws_image_versions).where(where).order_by(aws_image_versions.c.version)
        with self.engine.connect() as c:
            return [_version(r) for r in c.execute(query).mappings().all()]

    def put_version(self, version: AwsVersion) -> None:
        t = aws_image_versions.c
        where = and_(t.tenant == version.tenant, t.name == version.name, t.version == version.version)
        row = dataclasses.asdict(version) | {"spec": json.dumps(version.spec, sort_keys=True)}
        with write_transaction(self.engine) as c:
            c.execute(delete(aws_image_versions).where(where))
            c.execute(insert(aws_image_versions).values(**row))

    def forget_versions(self, tenant: str, name: str) -> None:
        """A deleted image made again starts with no versions (its numbers go on from its ``last_version``)."""
        t = aws_image_versions.c
        with write_transaction(self.engine) as c:
            c.execute(delete(aws_image_versions).where(and_(t.tenant == tenant, t.name == name)))


def _image(row: Any) -> AwsImage:
    return AwsImage(**{**row, "tags": json.loads(row["tags"])})


def _version(row: Any) -> AwsVersion:
    return AwsVersion(**{**row, "spec": json.loads(row["spec"])})


# ---- states (pure) ----------------------------------------------------------------------------------------

_BUILD_STATES = {BuildState.BUILDING: "IN_PROGRESS", BuildState.CREATED: "SUCCESSFUL",
                 BuildState.CREATE_FAILED: "FAILED"}  # fmt: skip
BUILDING = "IN_PROGRESS"
GONE = "its build record is gone (removed through Ember's own API): delete this version"


def build_state(version: AwsVersion, build: BuildRecord | None) -> str:
    """The model's BuildState of the version's one build (None: its record is gone, :data:`GONE`)."""
    return "FAILED" if build is None else _BUILD_STATES[build.state]


def version_state(version: AwsVersion, build: BuildRecord | None) -> str:
    """The model's MicrovmImageVersionState."""
    return "DELETED" if version.deleted_at else build_state(version, build)


def image_state(image: AwsImage, states: Sequence[tuple[AwsVersion, str]]) -> str:
    """The model's MicrovmImageState from its versions (oldest first) and their states."""
    if image.deleted_at:
        return "DELETED"
    live = [(v, s) for v, s in states if not v.deleted_at]
    if not live:
        return "CREATE_FAILED"  # (an image keeps a live version: the last one cannot be deleted)
    newest, state = live[-1]
    first = newest.version == min(v.version for v, _ in states)
    if state == BUILDING:
        return "CREATING" if first else "UPDATING"
    if state == "SUCCESSFUL":
        return "CREATED" if first else "UPDATED"
    return "CREATE_FAILED" if first else "UPDATE_FAILED"


# ---- pagination ------------------------------------------------------------------------------------------


def page(
    items: Sequence[T], key: Callable[[T], str], max_results: int | None, token: str | None
) -> tuple[list[T], str | None]:
    """One page of ``items`` (sorted by ``key``) after the one ``token`` ended at; the token of the next page or
    None. A token is the last key shown, encoded (opaque to callers); one that is not ours is a 400."""
    after = None
    if token is not None:
        try:
            after = base64.urlsafe_b64decode(token.encode("ascii")).decode()
        except (UnicodeError, ValueError, binascii.Error):
            raise ValidationException("nextToken is not a token this API gave: start the listing again") from None
        if not after.startswith("k:"):
            raise ValidationException("nextToken is not a token this API gave: start the listing again")
        after = after[2:]
    ordered = sorted(items, key=key)
    rest = [i for i in ordered if after is None or key(i) > after]
    size = max_results or 50
    shown = rest[:size]
    more = len(rest) > size
    return shown, base64.urlsafe_b64encode(f"k:{key(shown[-1])}".encode()).decode() if more and shown else None
