"""The AWS API's image operations on Ember's builder and image store (names, states: :mod:`ember.aws.imagestore`;
the request's members: :mod:`ember.aws.imagespec`; managed images: :mod:`ember.aws.managed`).

CreateMicrovmImage and UpdateMicrovmImage fetch the code zip (``codeArtifact.uri``: ember.aws.artifacts) and
read its Dockerfile within the request (a missing object, a hostile zip or a bad Dockerfile is the answer's
error, nothing is recorded), then hold the tenant's quotas (images, concurrent builds, storage: as
``ember image build``) and ``clientToken`` (idempotency, kind ``aws-image``), record the version and start
Ember's build, answering once its build record exists (state CREATING / UPDATING). An update while a version
is still building is a ConflictException. Deleting an image or version removes its Ember images and builds
(refused while VMs use them, or while it builds: ConflictException); deleting again succeeds (DELETED). The
last live version of an image cannot be deleted on its own (delete the image).

RunMicrovm (ember.aws.microvms) resolves what to launch with :func:`resolve_runnable`; an Ember image that is an
INACTIVE (or deleted) version of an image of this API is refused by :func:`runnable_version`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import secrets
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember.api.limits import Limits
from ember.aws.arns import image_arn, parse_image_arn
from ember.aws.errors import ConflictException, ResourceNotFoundException, ValidationException
from ember.aws.imagespec import build_network, environment, hook_settings, spec_of
from ember.aws.imagestore import (
    AWS_NAME,
    AwsImage,
    AwsImageStore,
    AwsVersion,
    build_state,
    image_state,
    page,
    repo_for,
    version_state,
)  # fmt: skip
from ember.aws.managed import check_base, managed_name
from ember.aws.operations import Call, operation
from ember.build.builder import BuildOptions
from ember.build.context import BuildContext
from ember.build.dockerfile import parse
from ember.build.service import BuildRequest
from ember.build.tarread import TarLimits
from ember.build.unpack import remove_tree
from ember.errors import ImageNotFound
from ember.metrics import Operation
from ember.models import BuildRecord, BuildState, ImageRecord, parse_time, utcnow
from ember.tenancy import names
from ember.tenancy.idempotency import MAX_TOKEN, Idempotency, Settle
from ember.tenancy.quotas import Ask, Quota

if TYPE_CHECKING:
    from ember.daemon import Daemon

KIND = "aws-image"  # idempotency tokens of Create/UpdateMicrovmImage
ARCH = {"architecture": "X86_64", "chipset": "INTEL", "chipsetGeneration": "x86-64"}
MAX_TAGS = 50  # per image, as on AWS


def _store(daemon: Daemon) -> AwsImageStore:
    return AwsImageStore(daemon.engine.store.engine)


def _not_found(what: str) -> ResourceNotFoundException:
    return ResourceNotFoundException(f"{what[:300]} does not exist", resourceType="MicrovmImage")


def image_name(call: Call, identifier: str) -> str:
    """The AWS name an identifier (a name, or the ARN of one of the caller's images) gives; anything else,
    another account's ARN included, answers exactly like a missing image."""
    arn = parse_image_arn(identifier)
    if arn is not None:
        if arn.account != call.account:
            raise _not_found(f"image {identifier}")
        return arn.name
    if not AWS_NAME.match(identifier):
        raise _not_found(f"image {identifier}")
    return identifier


def _image(daemon: Daemon, call: Call, *, deleted: bool = False) -> AwsImage:
    identifier = str(call.params["imageIdentifier"])
    image = _store(daemon).get(call.principal.tenant, image_name(call, identifier))
    if image is None or (image.deleted_at and not deleted):
        raise _not_found(f"image {identifier}")
    return image


def _version(daemon: Daemon, call: Call, image: AwsImage, *, deleted: bool = False) -> AwsVersion:
    text = str(call.params["imageVersion"])
    number = int(text) if text.isdigit() and len(text) <= 9 else -1
    found = next((v for v in _store(daemon).versions(image.tenant, image.name) if v.version == number), None)
    if found is None or (found.deleted_at and not deleted):
        raise ResourceNotFoundException(
            f"image {image.name} has no version {text[:40]}", resourceType="MicrovmImageVersion"
        )
    return found


def _build(daemon: Daemon, image: AwsImage, version: AwsVersion) -> BuildRecord | None:
    return daemon.engine.store.get_build(version.build_name(image.repo))


def _states(daemon: Daemon, image: AwsImage) -> list[tuple[AwsVersion, str]]:
    return [(v, version_state(v, _build(daemon, image, v))) for v in _store(daemon).versions(image.tenant, image.name)]


def _image_view(daemon: Daemon, call: Call, image: AwsImage) -> dict[str, Any]:
    states = _states(daemon, image)
    active = [v for v, s in states if s == "SUCCESSFUL" and v.status == "ACTIVE"]
    failed = [v for v, s in states if s == "FAILED"]
    return {
        "imageArn": image_arn(call.region, call.account, image.name), "name": image.name,
        "state": image_state(image, states), "createdAt": parse_time(image.created_at),
        "updatedAt": parse_time(image.updated_at), "tags": image.tags,
        "latestActiveImageVersion": str(active[-1].version) if active else None,
        "latestFailedImageVersion": str(failed[-1].version) if failed else None,
    }  # fmt: skip


def _reason(version: AwsVersion, build: BuildRecord | None) -> str | None:
    if version.error:
        return version.error
    return build.error or None if build is not None else None


def _version_view(daemon: Daemon, call: Call, image: AwsImage, version: AwsVersion) -> dict[str, Any]:
    build = _build(daemon, image, version)
    return {
        **version.spec, "imageArn": image_arn(call.region, call.account, image.name),
        "imageVersion": str(version.version), "state": version_state(version, build), "status": version.status,
        "createdAt": parse_time(version.created_at), "updatedAt": parse_time(version.updated_at),
        "stateReason": _reason(version, build), "tags": image.tags,
    }  # fmt: skip


def _build_view(daemon: Daemon, call: Call, image: AwsImage, version: AwsVersion) -> dict[str, Any]:
    build = _build(daemon, image, version)
    view: dict[str, Any] = {
        "imageArn": image_arn(call.region, call.account, image.name), "imageVersion": str(version.version),
        "buildId": version.build_id, "buildState": build_state(version, build), **ARCH,
        "stateReason": _reason(version, build),
        "createdAt": parse_time(build.created_at if build else version.created_at),
    }  # fmt: skip
    if build is not None and build.state is BuildState.CREATED:
        view["snapshotBuild"] = {
            "memorySnapshotSizeInBytes": build.memory_bytes,
            "diskSnapshotSizeInBytes": build.disk_bytes,
        }
    return view


# ---- create / update ------------------------------------------------------------------------------------


def _token(params: Mapping[str, Any]) -> str | None:
    token = params.get("clientToken")
    if token is None or len(token) <= MAX_TOKEN:
        return token
    return "sha256:" + hashlib.sha256(str(token).encode()).hexdigest()[: MAX_TOKEN - 7]  # the model allows 128


async def _fetch(daemon: Daemon, spec: Mapping[str, Any]) -> Path:
    """The code zip unpacked into a fresh build directory, its Dockerfile read (the caller removes it)."""
    settings = daemon.settings
    tmp = Path(tempfile.mkdtemp(prefix="build-", dir=settings.data_dir))  # swept if the daemon dies
    try:
        # ember.aws.artifacts (the code-artifact part, on its own branch until merged): bound when first used
        fetch_context = importlib.import_module("ember.aws.artifacts").fetch_context
        await fetch_context(str(spec["codeArtifact"]["uri"]), into=tmp / "context", settings=settings)
        with BuildContext(tmp / "context", TarLimits.from_settings(settings), "Dockerfile") as ctx:
            parse(ctx.dockerfile_text(), {})  # a bad Dockerfile is the answer's 400, before anything is recorded
    except BaseException:
        await asyncio.to_thread(remove_tree, tmp)
        raise
    return tmp


async def _new_version(daemon: Daemon, call: Call, name: str, spec: dict[str, Any], settle: Settle) -> dict[str, Any]:
    """Record a new version of the image ``name`` (created if it is new) and start its build."""
    tenant, store = call.principal.tenant, _store(daemon)
    check_base(spec["baseImageArn"], spec.get("baseImageVersion"))
    hooks, ready_timeout = hook_settings(spec)
    first = call.operation == "CreateMicrovmImage"
    _check_name(daemon, call, name, first=first)  # before the download; again under the tenant's lock
    tmp = await _fetch(daemon, spec)
    started = False
    asks = [Ask(Quota.IMAGES, 1), Ask(Quota.CONCURRENT_BUILDS, 1), Ask(Quota.STORAGE_BYTES, 0)]
    try:
        async with Limits(daemon).admit(tenant, asks, Operation.BUILD) as release:
            image = _check_name(daemon, call, name, first=first)
            now = utcnow()
            if image is None or image.deleted_at:
                store.forget_versions(tenant, name)
                image = AwsImage(
                    tenant, name, names.new_repo(tenant, repo_for(name)), dict(call.params.get("tags") or {}), now, now
                )
            image = AwsImage(**{**image.__dict__, "updated_at": now})
            numbers = [v.version for v in store.versions(tenant, name)] + [
                daemon.engine.store.next_version(image.repo) - 1
            ]
            version = AwsVersion(tenant, name, max(numbers) + 1, f"b-{secrets.token_hex(10)}", "ACTIVE", spec, now, now)
            store.put(image)
            store.put_version(version)
            settle(f"{name}:{version.version}")
            req = BuildRequest(
                name=names.public(image.repo), tenant=tenant, options=BuildOptions(network=build_network(spec)),
                ready_timeout_s=ready_timeout, hooks=hooks, env=environment(spec), version=version.version,
            )  # fmt: skip
            await _start(daemon, req, tmp, release)
            started = True  # the build removes its directory
    finally:
        if not started:
            await asyncio.to_thread(remove_tree, tmp)
    return {**_image_view(daemon, call, image), **spec, "imageVersion": str(version.version)}


def _check_name(daemon: Daemon, call: Call, name: str, *, first: bool) -> AwsImage | None:
    image = _store(daemon).get(call.principal.tenant, name)
    live = image is not None and not image.deleted_at
    if first and live:
        raise ConflictException(f"image {name} exists: UpdateMicrovmImage makes a new version of it",
                                resourceId=name, resourceType="MicrovmImage")  # fmt: skip
    if not first and not live:
        raise _not_found(f"image {name}")
    if image is not None and live and any(s in ("PENDING", "IN_PROGRESS") for _, s in _states(daemon, image)):
        raise ConflictException(f"image {name} has a version being built: update it when that build ends",
                                resourceId=name, resourceType="MicrovmImage")  # fmt: skip
    if first:
        repo = names.new_repo(call.principal.tenant, repo_for(name))
        owner = _store(daemon).by_repo(repo)
        if (owner is None or owner.name != name) and (daemon.engine.store.next_version(repo) > 1 or owner is not None):
            raise ConflictException(
                f"image name {name} maps to the Ember image {names.public(repo)}, which exists: remove it "
                "('ember image rm --all') or pick another name", resourceId=name, resourceType="MicrovmImage",
            )  # fmt: skip
    return image


async def _start(daemon: Daemon, req: BuildRequest, tmp: Path, release: Any) -> None:
    """Run the build in the background; returns once its record exists (or raises what refused it)."""
    recorded: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_record(_: BuildRecord) -> None:
        release()  # its record makes its use count: the tenant's next request is checked against it
        if not recorded.done():
            recorded.set_result(None)

    async def work() -> None:
        try:
            record = await daemon.builds.build(req, tmp / "context", lambda _line: None, on_record)
        except Exception as exc:  # refused before its record (the build catches everything after)
            if not recorded.done():
                recorded.set_exception(exc)
            return
        finally:
            if not recorded.done():
                recorded.cancel()
            await asyncio.to_thread(remove_tree, tmp)
        image = daemon.engine.store.get_image(record.name) if record.state is BuildState.CREATED else None
        if image is not None:
            daemon.engine.warm_up(image)

    daemon.engine.spawn_chore(work())
    await recorded


async def _create_or_update(daemon: Daemon, call: Call, name: str) -> Mapping[str, Any]:
    spec = spec_of(call.params, daemon.settings)
    body = {k: v for k, v in call.params.items() if k != "clientToken"}

    async def start(settle: Settle) -> dict[str, Any]:
        return await _new_version(daemon, call, name, spec, settle)

    async def existing(resource: str) -> dict[str, Any]:
        image = _store(daemon).get(call.principal.tenant, name)
        number = int(resource.rpartition(":")[2])
        version = next((v for v in _store(daemon).versions(call.principal.tenant, name) if v.version == number), None)
        if image is None or version is None:
            raise _not_found(f"image {name}")
        return {**_image_view(daemon, call, image), **version.spec, "imageVersion": str(number)}

    return await Idempotency(daemon.tenants).create(call.principal, KIND, _token(call.params), body, start, existing)


@operation("CreateMicrovmImage")
async def create_image(daemon: Daemon, call: Call) -> Mapping[str, Any]:
    tags = call.params.get("tags") or {}
    if len(tags) > MAX_TAGS:
        raise ValidationException(f"an image has at most {MAX_TAGS} tags")
    return await _create_or_update(daemon, call, str(call.params["name"]))


@operation("UpdateMicrovmImage")
async def update_image(daemon: Daemon, call: Call) -> Mapping[str, Any]:
    image = _image(daemon, call)
    return await _create_or_update(daemon, call, image.name)


# ---- read ------------------------------------------------------------------------------------------------


@operation("GetMicrovmImage")
async def get_image(daemon: Daemon, call: Call) -> Mapping[str, Any]:
    return _image_view(daemon, call, _image(daemon, call))


@operation("ListMicrovmImages")
async def list_images(daemon: Daemon, call: Call) -> Mapping[str, Any]:
    wanted = call.params.get("nameFilter")
    images = [i for i in _store(daemon).images(call.principal.tenant) if wanted is None or wanted in i.name]
    shown, token = page(images, lambda i: i.name, call.params.get("maxResults"), call.params.get("nextToken"))
    summary = ("imageArn", "name", "state", "latestActiveImageVersion", "latestFailedImageVersion", "createdAt")
    items = [{k: v for k, v in _image_view(daemon, call, i).items() if k in summary} for i in shown]
    return {"items": items, "nextToken": token}


@operation("GetMicrovmImageVersion")
async def get_version(daemon: Daemon, call: Call) -> Mapping[str, Any]:
    image = _image(daemon, call)
    return _version_view(daemon, call, image, _version(daemon, call, image))


@operation("ListMicrovmImageVersions")
async def list_versions(daemon: Daemon, call: Call) -> Mapping[str, Any]:
    image = _image(daemon, call)
    live = [v for v in _store(daemon).versions(image.tenant, image.name) if not v.deleted_at]
    shown, token = page(
        live, lambda v: f"{v.version:010d}", call.params.get("maxResults"), call.params.get("nextToken")
    )
    return {"items": [_version_view(daemon, call, image, v) for v in shown], "nextToken": token}


@operation("GetMicrovmImageBuild")
async def get_build(daemon: Daemon, call: Call) -> Mapping[str, Any]:
    image = _image(daemon, call)
    version = _version(daemon, call, image)
    if call.params["buildId"] != version.build_id:
        raise ResourceNotFoundException(
            f"no build {str(call.params['buildId'])[:60]}", resourceType="MicrovmImageBuild"
        )
    return _build_view(daemon, call, image, version)


@operation("ListMicrovmImageBuilds")
async def list_builds(daemon: Daemon, call: Call) -> Mapping[str, Any]:
    image = _image(daemon, call)
    version = _version(daemon, call, image)
    p = call.params
    wanted = all(p.get(k) in (None, ARCH[k]) for k in ("architecture", "chipset", "chipsetGeneration"))
    builds = [_build_view(daemon, call, image, version)] if wanted else []
    shown, token = page(builds, lambda b: str(b["buildId"]), p.get("maxResults"), p.get("nextToken"))
    return {"items": shown, "nextToken": token}


# ---- status, delete --------------------------------------------------------------------------------------


@operation("UpdateMicrovmImageVersion")
async def update_version(daemon: Daemon, call: Call) -> Mapping[str, Any]:
    image = _image(daemon, call)
    version = _version(daemon, call, image)
    version = AwsVersion(**{**version.__dict__, "status": str(call.params["status"]), "updated_at": utcnow()})
    _store(daemon).put_version(version)
    return _version_view(daemon, call, image, version)


async def _remove(daemon: Daemon, image: AwsImage, versions: list[AwsVersion]) -> None:
    """Remove the versions' Ember images and builds (Conflict while VMs use one) and mark them deleted."""
    for version in versions:
        if version_state(version, _build(daemon, image, version)) in ("PENDING", "IN_PROGRESS"):
            why = f"version {version.version} of image {image.name} is being built: delete it when that build ends"
            raise ConflictException(why, resourceId=image.name, resourceType="MicrovmImage")
    names_ = [v.build_name(image.repo) for v in versions]
    users = [vm.id for vm in daemon.engine.store.list_vms() if vm.image in names_]
    if users:
        raise ConflictException(f"image {image.name} is used by {len(users)} microVM(s): terminate them first",
                                resourceId=image.name, resourceType="MicrovmImage")  # fmt: skip
    now = utcnow()
    for version, name in zip(versions, names_, strict=True):
        with contextlib.suppress(ImageNotFound):  # its build failed before it was recorded, or it is gone
            await daemon.engine.remove_image(name)
        daemon.builds.log_path(name).unlink(missing_ok=True)
        _store(daemon).put_version(AwsVersion(**{**version.__dict__, "deleted_at": now, "updated_at": now}))


@operation("DeleteMicrovmImageVersion")
async def delete_version(daemon: Daemon, call: Call) -> Mapping[str, Any]:
    image = _image(daemon, call, deleted=True)
    version = _version(daemon, call, image, deleted=True)
    if not version.deleted_at:
        live = [v for v in _store(daemon).versions(image.tenant, image.name) if not v.deleted_at]
        if len(live) == 1:
            raise ConflictException(f"version {version.version} is the only version of image {image.name}: "
                                    "delete the image (DeleteMicrovmImage)", resourceId=image.name)  # fmt: skip
        await _remove(daemon, image, [version])
    return {"imageIdentifier": call.params["imageIdentifier"], "imageVersion": str(version.version), "state": "DELETED"}


@operation("DeleteMicrovmImage")
async def delete_image(daemon: Daemon, call: Call) -> Mapping[str, Any]:
    image = _image(daemon, call, deleted=True)
    if not image.deleted_at:
        live = [v for v in _store(daemon).versions(image.tenant, image.name) if not v.deleted_at]
        await _remove(daemon, image, live)
        now = utcnow()
        _store(daemon).put(AwsImage(**{**image.__dict__, "deleted_at": now, "updated_at": now}))
    return {"imageIdentifier": call.params["imageIdentifier"], "state": "DELETED"}


# ---- for RunMicrovm ----------------------------------------------------------------------------------------


def runnable_version(daemon: Daemon, image: str) -> None:
    """Refuse (ConflictException) to launch the Ember image ``image`` (internal ``repo:version``) when it is a
    version of an image of this API whose status is INACTIVE (or which is deleted); any other image passes."""
    repo, _, number = image.rpartition(":")
    owner = _store(daemon).by_repo(repo)
    if owner is None or not number.isdigit():
        return
    version = next((v for v in _store(daemon).versions(owner.tenant, owner.name) if v.version == int(number)), None)
    if version is not None and (version.status != "ACTIVE" or version.deleted_at or owner.deleted_at):
        raise ConflictException(f"version {number} of image {owner.name} is INACTIVE: activate it "
                                "(UpdateMicrovmImageVersion status=ACTIVE) or run another version",
                                resourceId=owner.name, resourceType="MicrovmImageVersion")  # fmt: skip


def resolve_runnable(daemon: Daemon, call: Call, identifier: str, version: str | None) -> ImageRecord:
    """The Ember image RunMicrovm launches for ``imageIdentifier`` / ``imageVersion``: a managed image (its ARN
    or name), an image of this API (its name or ARN: the given version, else its newest ACTIVE SUCCESSFUL one),
    or an image built with Ember's own API (its repo name). Missing (or another tenant's): ResourceNotFound;
    an INACTIVE version: Conflict; a version not built (yet): Conflict."""
    managed = managed_name(identifier)
    if managed is not None and version in (None, "1"):
        image = daemon.engine.store.get_image(managed)
        if image is None:
            raise _not_found(f"managed image {managed} (not built yet: the operator builds it)")
        return image
    name = image_name(call, identifier)
    owner = _store(daemon).get(call.principal.tenant, name)
    if owner is not None and not owner.deleted_at:
        states = _states(daemon, owner)
        if version is not None:
            found = next(((v, s) for v, s in states if str(v.version) == version and not v.deleted_at), None)
            if found is None:
                raise ResourceNotFoundException(f"image {name} has no version {version[:40]}")
            runnable_version(daemon, found[0].build_name(owner.repo))
            if found[1] != "SUCCESSFUL":
                raise ConflictException(f"version {version} of image {name} is {found[1]}: run a SUCCESSFUL version")
            return daemon.images.get(found[0].build_name(owner.repo))
        ready = [v for v, s in states if s == "SUCCESSFUL" and v.status == "ACTIVE" and not v.deleted_at]
        if not ready:
            raise ConflictException(f"image {name} has no ACTIVE SUCCESSFUL version to run yet")
        return daemon.images.get(ready[-1].build_name(owner.repo))
    try:  # an image built with 'ember image build': its repo name, lowercase
        wanted = f"{name}:{version}" if version is not None else name
        internal = names.internal(call.principal.tenant, wanted)
        image = daemon.engine.store.get_image(internal) or daemon.engine.store.latest_image(internal)
    except ImageNotFound:
        image = None
    if image is None or image.tenant != call.principal.tenant:
        raise _not_found(f"image {identifier}")
    runnable_version(daemon, image.name)
    return image
