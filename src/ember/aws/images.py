"""The AWS API's image operations on Ember's builder and image store (names, states: :mod:`ember.aws.imagestore`;
the request's members: :mod:`ember.aws.imagespec`; managed images: :mod:`ember.aws.managed`).

CreateMicrovmImage and UpdateMicrovmImage check the tenant's quotas (images, concurrent builds, storage: as
``ember image build``) and hold one concurrent build while they fetch the code zip (``codeArtifact.uri``:
ember.aws.artifacts, the tenant's own) and read its Dockerfile (a missing object, a hostile zip or a bad
Dockerfile is the answer's error, nothing is recorded), then, under the tenant's lock, check again, take the
next version number and start Ember's build; the version (and a new image) is recorded once its build record
exists, and the answer comes then (state CREATING / UPDATING). ``clientToken``: idempotency, kind
``aws-image``. An update while a version is still building is a ConflictException. Deleting an image or version
removes its Ember images and builds (refused while VMs use them, or while it builds: ConflictException);
deleting again succeeds (DELETED). The last live version of an image cannot be deleted on its own (delete the
image). Every change of an image (create, update, delete, tags, a version's status) happens under the tenant's
lock. Each answer holds its output shape's members only (:func:`shaped`).

RunMicrovm (ember.aws.microvms) resolves what to launch with :func:`resolve_runnable`; an Ember image that is an
INACTIVE (or deleted) version of an image of this API is refused by :func:`runnable_version`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import secrets
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember.api.limits import Limits
from ember.aws import artifacts
from ember.aws.arns import image_arn, parse_image_arn
from ember.aws.errors import ConflictException, ResourceNotFoundException, ValidationException
from ember.aws.imagespec import build_network, environment, hook_settings, spec_of
from ember.aws.imagestore import (
    AWS_NAME,
    BUILDING,
    GONE,
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
from ember.aws.model import service
from ember.aws.operations import Call, operation
from ember.build.builder import BuildOptions
from ember.build.service import BuildRequest
from ember.build.unpack import remove_tree
from ember.errors import Conflict, ImageNotFound
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
    number = int(text) if text.isascii() and text.isdigit() and len(text) <= 9 else -1  # "²" is a digit int() refuses
    found = next((v for v in _store(daemon).versions(image.tenant, image.name) if v.version == number), None)
    if found is None or (found.deleted_at and not deleted):
        raise ResourceNotFoundException(
            f"image {image.name} has no version {text[:40]}", resourceType="MicrovmImageVersion"
        )
    return found


def shaped(operation: str, result: Mapping[str, Any]) -> dict[str, Any]:
    """``result`` cut to the members of ``operation``'s output shape (a list's items to its items' members): what
    a view holds for another operation never reaches the answer."""
    shape = service().operation_model(operation).output_shape
    out: dict[str, Any] = {}
    for name, member in shape.members.items() if shape is not None else ():
        if name in result:
            value = result[name]
            if member.type_name == "list" and member.member.type_name == "structure":
                value = [{k: v for k, v in item.items() if k in member.member.members} for item in value]
            out[name] = value
    return out


def _build(daemon: Daemon, image: AwsImage, version: AwsVersion) -> BuildRecord | None:
    return daemon.engine.store.get_build(version.build_name(image.repo))


def _states(daemon: Daemon, image: AwsImage) -> list[tuple[AwsVersion, str]]:
    """Each version (oldest first) and its state; a deleted one's build is not looked up (it is gone)."""
    versions = _store(daemon).versions(image.tenant, image.name)
    return [(v, version_state(v, None if v.deleted_at else _build(daemon, image, v))) for v in versions]


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
    if build is None:
        return None if version.deleted_at else GONE
    return build.error or None


def _version_view(daemon: Daemon, call: Call, image: AwsImage, version: AwsVersion) -> dict[str, Any]:
    build = _build(daemon, image, version)
    return {
        **version.spec, "imageArn": image_arn(call.region, call.account, image.name),
        "imageVersion": str(version.version), "state": version_state(version, build), "status": version.status,
        "createdAt": parse_time(version.created_at), "updatedAt": parse_time(version.updated_at),
        "stateReason": _reason(version, build), "tags": image.tags,
    }  # fmt: skip


def _build_view(daemon: Daemon, call: Call, image: AwsImage, version: AwsVersion) -> dict[str, Any]:
    """The version's build as GetMicrovmImageBuild shows it (a list's items hold fewer members: :func:`shaped`)."""
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


async def _fetch(daemon: Daemon, call: Call, spec: Mapping[str, Any]) -> Path:
    """The code zip unpacked into a fresh build directory, its Dockerfile read (the caller removes it)."""
    settings = daemon.settings
    tmp = Path(tempfile.mkdtemp(prefix="build-", dir=settings.data_dir))  # swept if the daemon dies
    try:
        await artifacts.fetch_context(
            str(spec["codeArtifact"]["uri"]), into=tmp / "context", settings=settings, account=call.account
        )
        # a bad Dockerfile is the answer's 400, before anything is recorded
        await daemon.builds.parser.check(tmp / "context", "Dockerfile", {})
    except BaseException:
        await asyncio.to_thread(remove_tree, tmp)
        raise
    return tmp


ASKS = [Ask(Quota.IMAGES, 1), Ask(Quota.CONCURRENT_BUILDS, 1), Ask(Quota.STORAGE_BYTES, 0)]
ASKS_HELD = [Ask(Quota.IMAGES, 1), Ask(Quota.CONCURRENT_BUILDS, 0), Ask(Quota.STORAGE_BYTES, 0)]  # a build held


async def _new_version(daemon: Daemon, call: Call, name: str, spec: dict[str, Any], settle: Settle) -> dict[str, Any]:
    """Record a new version of the image ``name`` (created if it is new) and start its build."""
    tenant, store = call.principal.tenant, _store(daemon)
    check_base(spec["baseImageArn"], spec.get("baseImageVersion"))
    hooks, ready_timeout = hook_settings(spec)
    first = call.operation == "CreateMicrovmImage"
    limits = Limits(daemon)
    async with limits.admit(tenant, ASKS, Operation.BUILD):  # before the download, which holds a build meanwhile
        await asyncio.to_thread(_check_name, daemon, call, name, first=first)
        held = daemon.quotas.hold(tenant, Quota.CONCURRENT_BUILDS)
    try:
        tmp = await _fetch(daemon, call, spec)
        started = False
        try:
            # the same checks under the tenant's lock (the held build counts as the one asked for)
            async with limits.admit(tenant, ASKS_HELD, Operation.BUILD):
                found = await asyncio.to_thread(_check_name, daemon, call, name, first=first)
                now = utcnow()
                fresh = found is None or bool(found.deleted_at)
                if found is None or fresh:
                    store.forget_versions(tenant, name)
                    repo = found.repo if found is not None else names.new_repo(tenant, repo_for(name))
                    tags = dict(call.params.get("tags") or {})
                    given = found.last_version if found is not None else 0
                    found = AwsImage(tenant, name, repo, tags, now, now, deleted_at=now, last_version=given)  # hidden
                number = max(found.last_version, daemon.engine.store.next_version(found.repo) - 1) + 1
                image = dataclasses.replace(found, updated_at=now, last_version=number)
                store.put(image)  # the number is taken, whatever happens to its build
                version = AwsVersion(tenant, name, number, f"b-{secrets.token_hex(10)}", "ACTIVE", spec, now, now)
                req = BuildRequest(
                    name=names.public(image.repo), tenant=tenant, options=BuildOptions(network=build_network(spec)),
                    ready_timeout_s=ready_timeout, hooks=hooks, env=environment(spec), version=number,
                )  # fmt: skip

                def record() -> None:  # once its build record exists (which counts as a concurrent build now)
                    held()
                    store.put_version(version)
                    if fresh:
                        store.put(dataclasses.replace(image, deleted_at=""))
                    settle(f"{name}:{number}")

                started = True  # the build removes its directory, whatever happens to it
                await _start(daemon, req, tmp, record)
        finally:
            if not started:
                await asyncio.to_thread(remove_tree, tmp)
    finally:
        held()  # (once: also if the build was refused)
    view = await asyncio.to_thread(_image_view, daemon, call, dataclasses.replace(image, deleted_at=""))
    return {**view, **spec, "imageVersion": str(number)}


def _check_name(daemon: Daemon, call: Call, name: str, *, first: bool) -> AwsImage | None:
    image = _store(daemon).get(call.principal.tenant, name)
    live = image is not None and not image.deleted_at
    if first and live:
        raise ConflictException(f"image {name} exists: UpdateMicrovmImage makes a new version of it",
                                resourceId=name, resourceType="MicrovmImage")  # fmt: skip
    if not first and not live:
        raise _not_found(f"image {name}")
    if image is not None and live and any(s == BUILDING for _, s in _states(daemon, image)):
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


async def _start(daemon: Daemon, req: BuildRequest, tmp: Path, record: Callable[[], None]) -> None:
    """Run the build in the background; ``record()`` is called as soon as its build record exists, then this
    returns (or raises what refused the build, or what ``record`` raised)."""
    recorded: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_record(_: BuildRecord) -> None:
        try:
            record()
        except Exception as exc:  # the answer's error; the build goes on (its record counts)
            recorded.set_exception(exc)
        else:
            recorded.set_result(None)

    async def work() -> None:
        try:
            built = await daemon.builds.build(req, tmp / "context", lambda _line: None, on_record)
        except Exception as exc:  # refused before its record (the build catches everything after)
            if not recorded.done():
                recorded.set_exception(exc)
            return
        finally:
            if not recorded.done():
                recorded.cancel()
            await asyncio.to_thread(remove_tree, tmp)
        image = daemon.engine.store.get_image(built.name) if built.state is BuildState.CREATED else None
        if image is not None:
            daemon.engine.warm_up(image)

    daemon.engine.spawn_chore(work())
    await recorded


async def _create_or_update(daemon: Daemon, call: Call, name: str) -> Mapping[str, Any]:
    spec = spec_of(call.params, daemon.settings)
    body = {k: v for k, v in call.params.items() if k != "clientToken"}

    async def start(settle: Settle) -> dict[str, Any]:
        return await _new_version(daemon, call, name, spec, settle)

    def existing_view(resource: str) -> dict[str, Any]:
        image = _store(daemon).get(call.principal.tenant, name)
        number = int(resource.rpartition(":")[2])
        version = next((v for v in _store(daemon).versions(call.principal.tenant, name) if v.version == number), None)
        if image is None or version is None:
            raise _not_found(f"image {name}")
        return {**_image_view(daemon, call, image), **version.spec, "imageVersion": str(number)}

    async def existing(resource: str) -> dict[str, Any]:
        return await asyncio.to_thread(existing_view, resource)

    result = await Idempotency(daemon.tenants).create(call.principal, KIND, _token(call.params), body, start, existing)
    return shaped(call.operation, result)


@operation("CreateMicrovmImage")
async def create_image(daemon: Daemon, call: Call) -> Mapping[str, Any]:
    tags = call.params.get("tags") or {}
    if len(tags) > MAX_TAGS:
        raise ValidationException(f"an image has at most {MAX_TAGS} tags")
    return await _create_or_update(daemon, call, str(call.params["name"]))


@operation("UpdateMicrovmImage")
async def update_image(daemon: Daemon, call: Call) -> Mapping[str, Any]:
    image = await asyncio.to_thread(_image, daemon, call)
    return await _create_or_update(daemon, call, image.name)


# ---- read (the store's reads off the event loop) ------------------------------------------------------------


async def _read(call: Call, view: Callable[[], Mapping[str, Any]]) -> dict[str, Any]:
    """``view()`` in a thread, its answer shaped as the operation's output."""
    return await asyncio.to_thread(lambda: shaped(call.operation, view()))


@operation("GetMicrovmImage")
async def get_image(daemon: Daemon, call: Call) -> Mapping[str, Any]:
    return await _read(call, lambda: _image_view(daemon, call, _image(daemon, call)))


@operation("ListMicrovmImages")
async def list_images(daemon: Daemon, call: Call) -> Mapping[str, Any]:
    def view() -> dict[str, Any]:
        wanted = call.params.get("nameFilter")
        images = [i for i in _store(daemon).images(call.principal.tenant) if wanted is None or wanted in i.name]
        shown, token = page(images, lambda i: i.name, call.params.get("maxResults"), call.params.get("nextToken"))
        return {"items": [_image_view(daemon, call, i) for i in shown], "nextToken": token}

    return await _read(call, view)


@operation("GetMicrovmImageVersion")
async def get_version(daemon: Daemon, call: Call) -> Mapping[str, Any]:
    def view() -> dict[str, Any]:
        image = _image(daemon, call)
        return _version_view(daemon, call, image, _version(daemon, call, image))

    return await _read(call, view)


@operation("ListMicrovmImageVersions")
async def list_versions(daemon: Daemon, call: Call) -> Mapping[str, Any]:
    def view() -> dict[str, Any]:
        image = _image(daemon, call)
        live = [v for v in _store(daemon).versions(image.tenant, image.name) if not v.deleted_at]
        shown, token = page(
            live, lambda v: f"{v.version:010d}", call.params.get("maxResults"), call.params.get("nextToken")
        )
        return {"items": [_version_view(daemon, call, image, v) for v in shown], "nextToken": token}

    return await _read(call, view)


@operation("GetMicrovmImageBuild")
async def get_build(daemon: Daemon, call: Call) -> Mapping[str, Any]:
    def view() -> dict[str, Any]:
        image = _image(daemon, call)
        version = _version(daemon, call, image)
        if call.params["buildId"] != version.build_id:
            raise ResourceNotFoundException(
                f"no build {str(call.params['buildId'])[:60]}", resourceType="MicrovmImageBuild"
            )
        return _build_view(daemon, call, image, version)

    return await _read(call, view)


@operation("ListMicrovmImageBuilds")
async def list_builds(daemon: Daemon, call: Call) -> Mapping[str, Any]:
    def view() -> dict[str, Any]:
        image = _image(daemon, call)
        version = _version(daemon, call, image)
        p = call.params
        wanted = all(p.get(k) in (None, ARCH[k]) for k in ("architecture", "chipset", "chipsetGeneration"))
        builds = [_build_view(daemon, call, image, version)] if wanted else []
        shown, token = page(builds, lambda b: str(b["buildId"]), p.get("maxResults"), p.get("nextToken"))
        return {"items": shown, "nextToken": token}

    return await _read(call, view)


# ---- status, delete (under the tenant's lock) ----------------------------------------------------------------


@operation("UpdateMicrovmImageVersion")
async def update_version(daemon: Daemon, call: Call) -> Mapping[str, Any]:
    async with daemon.quotas.lock(call.principal.tenant):

        def view() -> dict[str, Any]:
            image = _image(daemon, call)
            version = _version(daemon, call, image)
            version = dataclasses.replace(version, status=str(call.params["status"]), updated_at=utcnow())
            _store(daemon).put_version(version)
            return _version_view(daemon, call, image, version)

        return await _read(call, view)


async def _remove(daemon: Daemon, image: AwsImage, versions: list[AwsVersion]) -> None:
    """Remove the versions' Ember images and builds (Conflict while VMs use one) and mark them deleted."""
    for version in versions:
        if version_state(version, _build(daemon, image, version)) == BUILDING:
            why = f"version {version.version} of image {image.name} is being built: delete it when that build ends"
            raise ConflictException(why, resourceId=image.name, resourceType="MicrovmImage")
    names_ = [v.build_name(image.repo) for v in versions]
    users = [vm.id for vm in daemon.engine.store.list_vms() if vm.image in names_]
    if users:
        raise ConflictException(f"image {image.name} is used by {len(users)} microVM(s): terminate them first",
                                resourceId=image.name, resourceType="MicrovmImage")  # fmt: skip
    now = utcnow()
    for version, name in zip(versions, names_, strict=True):
        with contextlib.suppress(ImageNotFound):  # its build record is gone (removed through Ember's own API)
            await daemon.engine.remove_image(name)
        daemon.builds.log_path(name).unlink(missing_ok=True)
        _store(daemon).put_version(dataclasses.replace(version, deleted_at=now, updated_at=now))


@operation("DeleteMicrovmImageVersion")
async def delete_version(daemon: Daemon, call: Call) -> Mapping[str, Any]:
    async with daemon.quotas.lock(call.principal.tenant):  # no create, update or other delete meanwhile
        image = await asyncio.to_thread(_image, daemon, call, deleted=True)
        version = await asyncio.to_thread(_version, daemon, call, image, deleted=True)
        if not version.deleted_at:
            versions = await asyncio.to_thread(_store(daemon).versions, image.tenant, image.name)
            if len([v for v in versions if not v.deleted_at]) == 1:
                raise ConflictException(f"version {version.version} is the only version of image {image.name}: "
                                        "delete the image (DeleteMicrovmImage)", resourceId=image.name)  # fmt: skip
            await _remove(daemon, image, [version])
    return shaped(call.operation, {"imageIdentifier": call.params["imageIdentifier"],
                                   "imageVersion": str(version.version), "state": "DELETED"})  # fmt: skip


@operation("DeleteMicrovmImage")
async def delete_image(daemon: Daemon, call: Call) -> Mapping[str, Any]:
    async with daemon.quotas.lock(call.principal.tenant):  # no create, update or other delete meanwhile
        image = await asyncio.to_thread(_image, daemon, call, deleted=True)
        if not image.deleted_at:
            versions = await asyncio.to_thread(_store(daemon).versions, image.tenant, image.name)
            await _remove(daemon, image, [v for v in versions if not v.deleted_at])
            now = utcnow()
            _store(daemon).put(dataclasses.replace(image, deleted_at=now, updated_at=now))
    return shaped(call.operation, {"imageIdentifier": call.params["imageIdentifier"], "state": "DELETED"})


# ---- for RunMicrovm ----------------------------------------------------------------------------------------


def runnable_version(daemon: Daemon, image: str) -> None:
    """Refuse (Conflict; the AWS API's ConflictException) to launch the Ember image ``image`` (internal
    ``repo:version``) when it is a version of an image of this API whose status is INACTIVE (or which is deleted),
    whichever API asks (RunMicrovm, /v1/vms: ember.api.images.resolve_image); any other image passes."""
    repo, _, number = image.rpartition(":")
    owner = _store(daemon).by_repo(repo)
    if owner is None or not (number.isascii() and number.isdigit()):
        return
    version = next((v for v in _store(daemon).versions(owner.tenant, owner.name) if v.version == int(number)), None)
    if version is not None and (version.deleted_at or owner.deleted_at):
        raise Conflict(f"version {number} of image {owner.name} is deleted: run another version")
    if version is not None and version.status != "ACTIVE":
        raise Conflict(f"version {number} of image {owner.name} is INACTIVE: activate it "
                       "(UpdateMicrovmImageVersion status=ACTIVE) or run another version")  # fmt: skip


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
