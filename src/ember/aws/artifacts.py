"""Code artifacts: the zip that CreateMicrovmImage's ``codeArtifact.uri`` names, fetched into a build context.

Two sources: ``s3://bucket/key`` from the S3-compatible store the operator configured (EMBER_S3_*; botocore's
S3 client, signed with Ember's own credentials, never the host's AWS configuration), and ``file:///path`` on
the daemon's host, only under EMBER_AWS_FILE_ARTIFACT_ROOT, every component below it opened fd-relative
without following a symbolic link (the daemon is root; the path is the tenant's). Either is copied, at most
EMBER_MAX_BUILD_CONTEXT_BYTES of it, into an unnamed file beside ``into`` (so nobody can change it while it is
read), then unpacked by :mod:`ember.aws.codezip`. Answers never show a host path or a credential.

**Scope** (EMBER_AWS_ARTIFACT_SCOPE). ``account``, the default: a tenant names only its own artifacts, the
objects whose key starts with its 12-digit account id and a ``/`` (``s3://BUCKET/123456789012/app.zip``) and the
files under the folder of that name below the root; anything else answers exactly like a missing object (its
message says where the tenant's artifacts go). ``shared`` (a single tenant): any object, any file under the root.
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ember.aws import codezip
from ember.aws.errors import InternalServerException, ResourceNotFoundException, ValidationException
from ember.build.unpack import DIR_FLAGS

if TYPE_CHECKING:
    from ember.config import Settings

MAX_URI = 2048  # the model's NonBlankString
MAX_KEY = 1024  # bytes of an S3 object key
BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
CHUNK = 1 << 20
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0  # one socket read; the whole download has EMBER_S3_TIMEOUT
NOT_FOUND = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})
SCOPES = ("account", "shared")  # EMBER_AWS_ARTIFACT_SCOPE
ACCOUNT = re.compile(r"[0-9]{12}")
USAGE = "use s3://BUCKET/KEY.zip (Ember's object store) or file:///PATH.zip (the daemon's host)"


@dataclass(frozen=True)
class S3Object:
    bucket: str
    key: str
    account: str = ""  # the tenant's account id when its artifacts are scoped to it ("": shared)


@dataclass(frozen=True)
class HostFile:
    parts: tuple[str, ...]  # the components below EMBER_AWS_FILE_ARTIFACT_ROOT
    account: str = ""  # as S3Object's


async def fetch_context(uri: str, *, into: Path, settings: Settings, account: str) -> None:
    """Fetch the zip ``uri`` names for the tenant of the 12-digit ``account`` id and unpack it into the empty
    directory ``into`` (made if missing; its parent must exist): a build context with a Dockerfile at its root.
    Raises ValidationException (a bad URI, not a zip, a hostile zip, no Dockerfile), ResourceNotFoundException
    (no such object or file, or one outside the account's scope) or InternalServerException (the store failed or
    took longer than EMBER_S3_TIMEOUT); ``into`` is left empty when it raises."""
    source = parse_uri(uri, settings, account=account)
    await asyncio.to_thread(_fetch, source, uri, into, settings)


def parse_uri(uri: str, settings: Settings, *, account: str) -> S3Object | HostFile:
    if len(uri) > MAX_URI or any(c.isspace() or ord(c) < 0x20 or c == "\x7f" for c in uri):
        raise ValidationException(f"codeArtifact.uri must be at most {MAX_URI} characters without spaces: {USAGE}")
    scope = _scope(settings, account)
    scheme, sep, rest = uri.partition("://")
    if sep and scheme.lower() == "s3":
        return _s3_object(rest, uri, settings, scope)
    if sep and scheme.lower() == "file":
        return _host_file(rest, settings, scope)
    raise ValidationException(f"codeArtifact.uri {uri[:200]!r} is neither s3:// nor file://: {USAGE}")


def _scope(settings: Settings, account: str) -> str:
    """The account the artifacts are scoped to ("": shared); a setting Ember does not know refuses them all."""
    if settings.aws_artifact_scope not in SCOPES:
        raise InternalServerException("this Ember's code artifact scope (EMBER_AWS_ARTIFACT_SCOPE) is not one of "
                                      f"{', '.join(SCOPES)}: ask the operator to fix it")  # fmt: skip
    if settings.aws_artifact_scope == "shared":
        return ""
    if not ACCOUNT.fullmatch(account):
        raise InternalServerException("the code artifact's account is not a 12-digit account id")
    return account


def _s3_missing(uri: str, source: S3Object) -> ResourceNotFoundException:
    """No such object, or (the same answer) one outside the account's scope."""
    where = f"; this account's code artifacts go under s3://{source.bucket}/{source.account}/" if source.account else ""
    return ResourceNotFoundException(f"the code artifact {uri[:200]} does not exist in Ember's object store: "
                                     f"upload it there first (e.g. aws s3 cp){where}")  # fmt: skip


def _s3_object(rest: str, uri: str, settings: Settings, account: str) -> S3Object:
    if not settings.s3_endpoint:
        raise ValidationException("this Ember has no object store for s3:// code artifacts (its operator sets "
                                  "EMBER_S3_ENDPOINT): use a file:// URI, or ask the operator")  # fmt: skip
    bucket, _, key = rest.partition("/")
    if not BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ValidationException(f"codeArtifact.uri: {bucket[:100]!r} is not an S3 bucket name (3-63 characters: "
                                  "lowercase letters, digits, '.' and '-')")  # fmt: skip
    if not key or len(key.encode()) > MAX_KEY:
        raise ValidationException(f"codeArtifact.uri must name an object: s3://{bucket}/KEY (1-{MAX_KEY} bytes)")
    if any(part in ("", ".", "..") for part in key.split("/")):  # a store may resolve them: never ambiguous
        raise ValidationException("codeArtifact.uri: an object key here is plain (no '.', '..' or '//' in it, "
                                  "no '/' at its ends)")  # fmt: skip
    source = S3Object(bucket, key, account)
    if account and not key.startswith(f"{account}/"):
        raise _s3_missing(uri, source)  # never asked of the store: another tenant's objects are not this one's
    return source


def _host_file(rest: str, settings: Settings, account: str) -> HostFile:
    if not settings.aws_file_artifact_root:
        raise ValidationException("file:// code artifacts are off on this Ember (its operator allows them under "
                                  "one directory with EMBER_AWS_FILE_ARTIFACT_ROOT): use an s3:// URI")  # fmt: skip
    host, slash, path = rest.partition("/")
    if host not in ("", "localhost") or not slash:
        raise ValidationException("codeArtifact.uri: a file:// URI names a file on the daemon's host: file:///PATH")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValidationException("codeArtifact.uri: a file:// path must be absolute and plain (no '.', '..' or "
                                  "'//')")  # fmt: skip
    root = tuple(p for p in settings.aws_file_artifact_root.split("/") if p not in ("", "."))
    if tuple(parts[: len(root)]) != root or len(parts) == len(root):
        raise ValidationException("codeArtifact.uri: file:// artifacts must be files under the directory this "
                                  "Ember's operator allows (EMBER_AWS_FILE_ARTIFACT_ROOT): ask them which")  # fmt: skip
    source = HostFile(tuple(parts[len(root) :]), account)
    if account and (source.parts[0] != account or len(source.parts) == 1):
        raise _file_missing(source)
    return source


def _fetch(source: S3Object | HostFile, uri: str, into: Path, settings: Settings) -> None:
    into.mkdir(mode=0o755, exist_ok=True)
    with tempfile.TemporaryFile(dir=into.parent) as spool:
        if isinstance(source, S3Object):
            _download(source, uri, spool, settings)
        else:
            _copy_host_file(source, spool, settings)
        codezip.unpack(spool, into, settings)


def _too_large(what: str, limit: int) -> ValidationException:
    return ValidationException(f"{what[:200]} is larger than the {limit} bytes allowed "
                               "(EMBER_MAX_BUILD_CONTEXT_BYTES): make it smaller, or ask the operator")  # fmt: skip


def _copy(stream: Any, spool: BinaryIO, what: str, limit: int, deadline: float | None = None) -> None:
    copied = 0
    while chunk := stream.read(CHUNK):
        copied += len(chunk)
        if copied > limit:
            raise _too_large(what, limit)
        if deadline is not None and time.monotonic() > deadline:
            raise InternalServerException(f"fetching {what[:200]} took longer than allowed (EMBER_S3_TIMEOUT): "
                                          "retry, or ask the operator")  # fmt: skip
        spool.write(chunk)


# ---- s3:// ------------------------------------------------------------------


def _s3_client(settings: Settings) -> Any:
    import botocore.session  # here: the daemon loads botocore's S3 model only when an artifact is fetched
    from botocore import UNSIGNED
    from botocore.config import Config

    session = botocore.session.Session()
    config = Config(
        connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S, retries={"max_attempts": 2},
        s3={"addressing_style": "path"},
        signature_version=None if settings.s3_access_key_id else UNSIGNED,  # none configured: anonymous, never
    )  # fmt: skip                                                          # the host's AWS credentials
    return session.create_client(
        "s3", endpoint_url=settings.s3_endpoint, region_name=settings.s3_region, config=config,
        aws_access_key_id=settings.s3_access_key_id or None,
        aws_secret_access_key=settings.s3_secret_access_key or None,
    )  # fmt: skip


def _download(obj: S3Object, uri: str, spool: BinaryIO, settings: Settings) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    limit = settings.max_build_context_bytes
    deadline = time.monotonic() + settings.s3_timeout_s
    client = _s3_client(settings)
    try:
        answer = client.get_object(Bucket=obj.bucket, Key=obj.key)
        if answer.get("ContentLength", 0) > limit:
            answer["Body"].close()
            raise _too_large(uri, limit)
        with answer["Body"] as body:
            _copy(body, spool, uri, limit, deadline)
    except ClientError as exc:
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if error.get("Code") in NOT_FOUND or status == 404:
            raise _s3_missing(uri, obj) from None
        if status == 403:
            raise ValidationException(f"Ember's object store refused to hand out {uri[:200]} ({error.get('Code')}): "
                                      "the operator's credentials (EMBER_S3_ACCESS_KEY_ID) must be allowed to read "
                                      "that bucket") from None  # fmt: skip
        raise InternalServerException(
            f"Ember's object store failed to hand out {uri[:200]} "
            f"({error.get('Code') or status}): retry, or ask the operator"
        ) from None
    except BotoCoreError as exc:
        raise InternalServerException(
            f"Ember's object store did not answer for {uri[:200]} ({type(exc).__name__}): retry, or ask the operator"
        ) from None
    finally:
        client.close()


# ---- file:// ----------------------------------------------------------------

FILE = "the file:// code artifact"  # answers name no host path, not even the one asked for


def _file_missing(source: HostFile) -> ResourceNotFoundException:
    """No such file, or (the same answer) one outside the account's folder."""
    where = (f"; this account's code artifacts lie in the folder {source.account} of the directory the operator allows "
             "(EMBER_AWS_FILE_ARTIFACT_ROOT)") if source.account else ""  # fmt: skip
    return ResourceNotFoundException(f"{FILE} does not exist on the daemon's host: check its path{where}")


def _copy_host_file(source: HostFile, spool: BinaryIO, settings: Settings) -> None:
    fd = _open_host_file(source, settings)
    with os.fdopen(fd, "rb") as f:
        _copy(f, spool, FILE, settings.max_build_context_bytes)


def _open_host_file(source: HostFile, settings: Settings) -> int:
    """A read descriptor of the regular file ``source`` names, no component below the root a symbolic link."""
    missing = _file_missing(source)
    try:
        fd = os.open(settings.aws_file_artifact_root, DIR_FLAGS & ~os.O_NOFOLLOW)  # the operator's own path
    except OSError:
        raise missing from None
    name = ""
    try:
        for name in source.parts[:-1]:
            step = os.open(name, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = step
        name = source.parts[-1]
        handle = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)  # opens nothing yet
        try:
            mode = os.fstat(handle).st_mode
            if stat.S_ISLNK(mode):
                raise _link()
            if not stat.S_ISREG(mode):  # a FIFO or a device is never opened
                raise ValidationException(f"{FILE} is not a regular file: name a zip")
            return os.open(f"/proc/self/fd/{handle}", os.O_RDONLY | os.O_CLOEXEC)  # that same inode
        finally:
            os.close(handle)
    except FileNotFoundError:
        raise missing from None
    except NotADirectoryError:  # O_DIRECTORY | O_NOFOLLOW on a symbolic link, or a file where a directory goes
        if stat.S_ISLNK(os.lstat(name, dir_fd=fd).st_mode):
            raise _link() from None
        raise missing from None
    except OSError as exc:
        raise ValidationException(f"{FILE} cannot be read on the daemon's host ({exc.strerror})") from None
    finally:
        os.close(fd)


def _link() -> ValidationException:
    return ValidationException(
        f"{FILE} goes through a symbolic link, which Ember does not follow: name the file itself"
    )
