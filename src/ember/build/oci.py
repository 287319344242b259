"""Base images from OCI registries and OCI layouts: references, manifests, blobs.

References are read Docker's way, ``[host[:port]/]path[:tag][@digest]``: a first
component holding '.' or ':' (or ``localhost``) names the registry, anything else
is Docker Hub (``library/`` before one-word names). Registries are spoken to
through the distribution API v2 with httpx: an anonymous bearer token fetched
from the ``WWW-Authenticate`` challenge when the registry asks for one, image
indexes and Docker manifest lists narrowed to linux/amd64, every manifest and
blob checked against its digest and size, blobs kept by digest under
``<cache>/blobs/sha256``. Loopback registries and those in
EMBER_INSECURE_REGISTRIES are spoken to over plain HTTP, the rest over HTTPS
verified with the host's CA bundle. A registry picks where the daemon connects
(token realm, redirects), so each connection is confined: the realm on the
registry's own site, redirects to https only, the token to the registry only,
and every address checked against ember.netpolicy after DNS (private, loopback
and metadata addresses only for registries the operator configured).

Local images come from the build context: ``FROM oci-layout://DIR[:tag]`` (an
OCI image layout directory, as ``skopeo copy ... oci:DIR:tag`` writes it) and
``FROM oci-archive://FILE[:tag]`` (the same as a tar, as ``docker save`` or
``skopeo copy ... oci-archive:`` write it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import ssl
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import httpx

from ember import netpolicy
from ember.build.dockerfile import DEFAULT_SHELL, MAX_RETRIES, Healthcheck, ImageConfig, duration_ok
from ember.build.tarread import ArchiveError, TarLimits
from ember.build.unpack import Capacity, Tree
from ember.config import Settings
from ember.errors import BuildFailed

log = logging.getLogger(__name__)

INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
LAYER_TYPES = frozenset({
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
})  # fmt: skip
ACCEPT = ", ".join((*INDEX_TYPES, *MANIFEST_TYPES))
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
MAX_MANIFEST = 4 << 20
MAX_CONFIG = 8 << 20
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
LOCAL_SCHEMES = ("oci-layout://", "oci-archive://")


def fail(ref: str, message: str) -> BuildFailed:
    return BuildFailed(message, step=f"FROM {ref}")


# ---- references -------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    registry: str  # host[:port]; "docker.io" for Docker Hub
    repository: str
    tag: str = "latest"
    digest: str = ""

    @property
    def reference(self) -> str:
        """What goes after /manifests/: the digest when pinned, else the tag."""
        return self.digest or self.tag

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}" + (f"@{self.digest}" if self.digest else f":{self.tag}")


REPO_PART = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
TAG = re.compile(r"[\w][\w.-]{0,127}")


def parse_reference(ref: str) -> Reference:
    name, _, digest = ref.partition("@")
    if digest and not DIGEST.fullmatch(digest):
        raise fail(ref, f"'{digest}' is not a sha256 digest (sha256: and 64 hex digits)")
    tag = "latest"
    last_slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > last_slash:
        name, tag = name[:colon], name[colon + 1 :]
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, rest
    else:
        registry, path = "docker.io", name
        if "/" not in path:
            path = f"library/{path}"
    if not all(REPO_PART.fullmatch(p) for p in path.split("/")) or not TAG.fullmatch(tag):
        raise fail(ref, "not an image reference like registry.example:5000/team/app:1.2 (lowercase repository path)")
    return Reference(registry, path, tag, digest)


def is_local(ref: str) -> bool:
    return ref.startswith(LOCAL_SCHEMES)


# ---- what an image is made of -------------------------------------------------


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int

    @classmethod
    def from_json(cls, data: Any, ref: str) -> Descriptor:
        try:
            desc = cls(str(data.get("mediaType", "")), str(data["digest"]), int(data["size"]))
        except (AttributeError, KeyError, TypeError, ValueError):
            raise fail(ref, "a manifest holds a malformed descriptor") from None
        if not DIGEST.fullmatch(desc.digest) or desc.size < 0:
            raise fail(ref, f"unsupported or malformed digest '{desc.digest}' (Ember verifies sha256 only)")
        return desc


@dataclass(frozen=True)
class ResolvedImage:
    digest: str  # of the linux/amd64 image manifest: what the base layer is cached by
    config: ImageConfig
    layers: tuple[Descriptor, ...]


class Source(Protocol):
    """Where manifests and blobs come from: a registry or a local layout.

    Sources only transfer bytes; checking them against their digests and
    caching blobs is done once, here and in :class:`BlobStore`."""

    name: str

    async def manifest(self, reference: str) -> tuple[bytes, str]: ...

    def chunks(self, desc: Descriptor) -> AsyncGenerator[bytes, None]: ...


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json(data: bytes, ref: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        raise fail(ref, f"the {what} is not JSON") from None
    if not isinstance(value, dict):
        raise fail(ref, f"the {what} is not a JSON object")
    return value


def _pick_platform(index: dict[str, Any], ref: str) -> Descriptor:
    seen = []
    for entry in index.get("manifests") or []:
        platform = entry.get("platform") or {}
        os_arch = f"{platform.get('os')}/{platform.get('architecture')}"
        if os_arch == "linux/amd64":
            return Descriptor.from_json(entry, ref)
        seen.append(os_arch)
    raise fail(ref, f"no linux/amd64 image in this index (it has: {', '.join(seen) or 'nothing'})")


async def _manifest(source: Source, reference: str, ref: str) -> tuple[bytes, dict[str, Any], str]:
    """(bytes, parsed, media type) of a manifest; one named by digest must match it."""
    body, media_type = await source.manifest(reference)
    if DIGEST.fullmatch(reference) and sha256_digest(body) != reference:
        raise fail(ref, f"the manifest {source.name} sent does not match {reference[:19]}: refusing it")
    data = _json(body, ref, "manifest")
    return body, data, str(data.get("mediaType") or media_type).split(";")[0].strip()


async def resolve(source: Source, blobs: BlobStore, reference: str, ref: str) -> ResolvedImage:
    """The linux/amd64 image ``reference`` names: manifest digest, config, layers."""
    body, data, media_type = await _manifest(source, reference, ref)
    if media_type in INDEX_TYPES or (not media_type and "manifests" in data):
        body, data, media_type = await _manifest(source, _pick_platform(data, ref).digest, ref)
    if data.get("schemaVersion") == 1:
        raise fail(ref, "Docker schema 1 manifests are not supported: push the image again with a current tool")
    if media_type not in MANIFEST_TYPES and not (not media_type and "layers" in data):
        raise fail(ref, f"'{media_type}' is not an image manifest")
    digest = sha256_digest(body)
    config_desc = Descriptor.from_json(data.get("config"), ref)
    layers = tuple(Descriptor.from_json(d, ref) for d in data.get("layers") or [])
    for layer in layers:
        if layer.media_type and layer.media_type not in LAYER_TYPES:
            raise fail(ref, f"layer {layer.digest[:19]} has media type '{layer.media_type}', not a filesystem layer")
    config_path = await blobs.fetch(source, config_desc, MAX_CONFIG)
    config = _json(config_path.read_bytes(), ref, "image config")
    arch = f"{config.get('os', 'linux')}/{config.get('architecture', 'amd64')}"
    if arch != "linux/amd64":
        raise fail(ref, f"the image is for {arch}; Ember runs linux/amd64 images")
    try:
        run_config = image_config(config.get("config") or {})
    except (AttributeError, TypeError, ValueError, IndexError, OverflowError):
        raise fail(
            ref, "the image config is malformed (Env, Cmd, Healthcheck, ... of the wrong type or out of range)"
        ) from None
    return ResolvedImage(digest, run_config, layers)


def image_config(c: dict[str, Any]) -> ImageConfig:
    """Docker/OCI image config -> what Ember runs (Env, Entrypoint, Cmd, WorkingDir, User, ...)."""
    env = [str(e).partition("=") for e in c.get("Env") or []]
    hc = c.get("Healthcheck") or None
    healthcheck = None
    if isinstance(hc, dict) and hc.get("Test"):
        test = [str(t) for t in hc["Test"]]
        shell = tuple(c.get("Shell") or DEFAULT_SHELL)
        argv = () if test[0] == "NONE" else tuple(test[1:]) if test[0] == "CMD" else (*shell, *test[1:2])
        defaults = Healthcheck(())

        def seconds(key: str, default: float) -> float:
            value = float(hc.get(key) or 0) / 1e9 or default
            if not duration_ok(value):
                raise ValueError(f"Healthcheck {key}")
            return value

        retries = int(hc.get("Retries") or defaults.retries)
        if not 0 <= retries <= MAX_RETRIES:
            raise ValueError("Healthcheck Retries")

        healthcheck = Healthcheck(
            argv, seconds("Interval", defaults.interval_s), seconds("Timeout", defaults.timeout_s),
            seconds("StartPeriod", defaults.start_period_s), retries,
        )  # fmt: skip
    return ImageConfig(
        env=tuple((k, v) for k, _, v in env), workdir=str(c.get("WorkingDir") or "/"), user=str(c.get("User") or ""),
        entrypoint=tuple(str(a) for a in c.get("Entrypoint") or ()), cmd=tuple(str(a) for a in c.get("Cmd") or ()),
        shell=tuple(c.get("Shell") or DEFAULT_SHELL),
        exposed=tuple(p if "/" in p else f"{p}/tcp" for p in (c.get("ExposedPorts") or {})),
        labels=tuple((str(k), str(v)) for k, v in (c.get("Labels") or {}).items()),
        healthcheck=healthcheck, stopsignal=str(c.get("StopSignal") or ""),
    )  # fmt: skip


# ---- blobs ------------------------------------------------------------------


class BlobStore:
    """Verified blobs by digest; a file is only ever renamed into place whole and checked."""

    def __init__(self, root: Path) -> None:
        self.root = root / "blobs" / "sha256"

    def path(self, digest: str) -> Path:
        return self.root / digest.removeprefix("sha256:")

    async def fetch(self, source: Source, desc: Descriptor, limit: int | None = None) -> Path:
        """The blob's file: from the cache, else from ``source``, checked on the way in."""
        path = self.path(desc.digest)
        if path.exists():
            return path
        if limit is not None and desc.size > limit:
            raise fail(source.name, f"blob {desc.digest[:19]} is {desc.size} bytes, over the {limit} allowed")
        return await self._put(desc, source.chunks(desc), source.name)

    async def _put(self, desc: Descriptor, chunks: AsyncGenerator[bytes, None], ref: str) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".partial-")
        sha = hashlib.sha256()
        size = 0
        try:
            async with contextlib.aclosing(chunks):
                with os.fdopen(fd, "wb") as out:
                    async for chunk in chunks:
                        size += len(chunk)
                        if size > desc.size:
                            too_big = f"blob {desc.digest[:19]} is larger than its manifest says ({desc.size} bytes)"
                            raise fail(ref, too_big)
                        sha.update(chunk)
                        out.write(chunk)
            if size != desc.size or f"sha256:{sha.hexdigest()}" != desc.digest:
                raise fail(ref, f"blob {desc.digest[:19]} does not match its digest or size: refusing it")
            os.replace(tmp, self.path(desc.digest))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return self.path(desc.digest)

    def clean_partial(self) -> None:
        for tmp in self.root.glob(".partial-*") if self.root.is_dir() else ():
            tmp.unlink(missing_ok=True)


# ---- registries -------------------------------------------------------------

MAX_TOKEN = 1 << 20  # a token service's answer
MAX_REDIRECTS = 5
REGISTRY_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
                           r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")  # fmt: skip


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', rest))


def same_site(host: str, registry_host: str) -> bool:
    """``host`` is the registry's host, or in the domain the registry host is a name of (auth.docker.io for
    registry-1.docker.io, gitlab.com for registry.gitlab.com); that domain needs two labels at least."""
    if host == registry_host:
        return True
    parent = registry_host.partition(".")[2]
    if parent.count(".") < 1 or all(p.isdigit() for p in registry_host.split(".")) or ":" in registry_host:
        return False
    return host == parent or host.endswith("." + parent)


async def _read(resp: httpx.Response, limit: int) -> bytes | None:
    """The body, or None when it is larger than ``limit``."""
    body = bytearray()
    async for chunk in resp.aiter_bytes():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


class Registry:
    """One repository on a registry, through the distribution API v2.

    Only the registry's own origin gets the bearer token; the token realm must be https on the
    registry's site (same host, http allowed, for loopback and insecure registries); redirects
    (blob CDNs) are followed here, to https hosts only. Every connection goes through
    :func:`client`'s address check. Errors tell the tenant what failed; URLs, statuses and
    addresses go to the daemon's log only."""

    def __init__(self, ref: Reference, client: httpx.AsyncClient, insecure: tuple[str, ...]) -> None:
        self.ref = ref
        self.name = str(ref)
        self.client = client
        host = "registry-1.docker.io" if ref.registry == "docker.io" else ref.registry
        hostname = netpolicy.hostname(host)
        self.plain = hostname in ("localhost", "::1") or hostname.startswith("127.") or ref.registry in insecure
        try:
            if not REGISTRY_HOST.fullmatch(host):
                raise httpx.InvalidURL(host)
            self.base = httpx.URL(f"{'http' if self.plain else 'https'}://{host}/v2/{ref.repository}")
            if (self.base.port or 0) > 65535:
                raise httpx.InvalidURL(host)
        except httpx.InvalidURL:
            raise fail(self.name, f"'{ref.registry}' is not a registry host[:port]") from None
        self.token = ""

    def _url(self, tail: str) -> httpx.URL:
        return self.base.copy_with(path=f"{self.base.path}/{tail}")

    def _fail(self, message: str, detail: object) -> BuildFailed:
        log.warning("pull of %s: %s (%s)", self.name, message, detail)
        return fail(self.name, message)

    def _own(self, url: httpx.URL) -> bool:
        return (url.scheme, url.host, url.port) == (self.base.scheme, self.base.host, self.base.port)

    def _realm(self, realm: str) -> httpx.URL:
        try:
            url = httpx.URL(realm)
        except httpx.InvalidURL:
            url = httpx.URL()
        if self.plain:
            ok = url.scheme in ("http", "https") and url.host == self.base.host
            rule = "the registry's token realm must be on the registry's own host"
        else:
            ok = url.scheme == "https" and same_site(url.host, self.base.host)
            rule = "the registry's token realm must be https on the registry's own site"
        if not ok or url.userinfo:
            raise self._fail(rule, f"realm {realm!r}")
        return url

    async def _login(self, response: httpx.Response) -> None:
        scheme, params = _challenge(response.headers.get("www-authenticate", ""))
        if scheme != "bearer" or "realm" not in params:
            raise fail(self.name, f"the registry wants {scheme or 'unknown'} credentials; Ember pulls anonymously")
        realm = self._realm(params["realm"])
        query = {
            "service": params.get("service", ""),
            "scope": params.get("scope", f"repository:{self.ref.repository}:pull"),
        }
        try:  # no Authorization header: the realm never gets a token
            async with self.client.stream("GET", realm, params={k: v for k, v in query.items() if v}) as got:
                body = await _read(got, MAX_TOKEN) if got.is_success else b""
                status = got.status_code
        except netpolicy.AddressDenied as exc:
            raise self._fail("the registry's token realm address is not allowed", exc) from None
        except httpx.HTTPError as exc:
            raise self._fail("the registry's token service cannot be reached", f"{realm}: {exc!r}") from None
        try:
            answer = json.loads(body) if body else {}
        except ValueError:
            answer = {}
        token = answer.get("token") or answer.get("access_token") if isinstance(answer, dict) else None
        if not token or not isinstance(token, str):
            raise self._fail("the registry's token service refused an anonymous pull", f"{realm}: HTTP {status}")
        self.token = token

    def _next(self, url: httpx.URL, location: str) -> httpx.URL:
        try:
            target = url.join(location)
        except httpx.InvalidURL:
            target = httpx.URL()
        if not self._own(target) and (target.scheme != "https" or not target.host or target.userinfo):
            raise self._fail("the registry redirected to an address that is not https", f"{url} -> {location!r}")
        return target

    @contextlib.asynccontextmanager
    async def _open(self, url: httpx.URL, what: str, accept: str = "") -> AsyncIterator[httpx.Response]:
        """The final response for ``url``: logged in once when the registry asks, redirects followed."""
        logged_in = False
        try:
            for _ in range(MAX_REDIRECTS + 2):
                headers = {"Accept": accept} if accept else {}
                if self.token and self._own(url):  # the token goes to the registry and nowhere else
                    headers["Authorization"] = f"Bearer {self.token}"
                async with self.client.stream("GET", url, headers=headers) as resp:
                    if resp.status_code == 401 and self._own(url) and not logged_in:
                        await self._login(resp)
                        logged_in = True
                        continue
                    if resp.is_redirect:
                        url = self._next(url, resp.headers["location"])
                        continue
                    self._check(resp, what)
                    yield resp
                    return
            raise self._fail(f"the registry redirected {what} too many times", url)
        except netpolicy.AddressDenied as exc:
            where = "registry" if self._own(url) else "blob host"
            raise self._fail(f"the {where} address is not allowed (public addresses only)", exc) from None
        except httpx.HTTPError as exc:
            reason = "it timed out" if isinstance(exc, httpx.TimeoutException) else "the connection failed"
            where = f"the registry {self.ref.registry}" if self._own(url) else f"the blob host of {what}"
            raise self._fail(f"cannot reach {where}: {reason}", f"{url}: {exc!r}") from None

    def _check(self, resp: httpx.Response, what: str) -> None:
        status = resp.status_code
        detail = f"{resp.url}: HTTP {status}"
        if status == 404:
            raise self._fail(f"{what} not found in the registry: check the name and tag (ember pushes nothing)", detail)
        if status in (401, 403):
            raise self._fail(f"the registry denies access to {what} (Ember pulls anonymously)", detail)
        if status == 429:
            raise self._fail("the registry limits the rate of pulls: try again later", detail)
        if not resp.is_success:
            raise self._fail(f"the registry failed to serve {what}", detail)

    async def manifest(self, reference: str) -> tuple[bytes, str]:
        what = f"manifest {reference}"
        async with self._open(self._url(f"manifests/{reference}"), what, ACCEPT) as resp:
            body = await _read(resp, MAX_MANIFEST)
            if body is None:
                raise fail(self.name, f"{what} is larger than {MAX_MANIFEST} bytes")
            return body, resp.headers.get("content-type", "")

    async def chunks(self, desc: Descriptor) -> AsyncGenerator[bytes, None]:
        what = f"blob {desc.digest[:19]}"
        async with self._open(self._url(f"blobs/{desc.digest}"), what) as resp:
            async for chunk in resp.aiter_bytes():
                yield chunk


def client(settings: Settings, ca_file: Path = HOST_CA_BUNDLE) -> httpx.AsyncClient:
    """The HTTP client for registries: host CA bundle (TLS-inspecting proxies), each connection's address
    checked after DNS (the operator's insecure and trusted registries excepted), no redirects of its own
    and no proxy from the environment (a proxy would resolve names where the check cannot see)."""
    verify = ssl.create_default_context(cafile=str(ca_file) if ca_file.exists() else None)
    policy = netpolicy.AddressPolicy.trusting((*settings.insecure_registries, *settings.trusted_registries))
    return httpx.AsyncClient(
        transport=netpolicy.PinnedTransport(verify, policy), follow_redirects=False, trust_env=False,
        timeout=httpx.Timeout(30.0, read=120.0),
    )  # fmt: skip


# ---- OCI layouts in the build context ---------------------------------------


class Layout:
    """An OCI image layout directory at ``prefix`` in a tree, read only through that tree (confined)."""

    def __init__(self, tree: Tree, prefix: str, name: str) -> None:
        self.tree = tree
        self.prefix = prefix.strip("/")
        self.name = name
        try:
            self.index = self.tree.read_bytes(self._rel("index.json"), MAX_MANIFEST)
        except (OSError, ArchiveError):
            where = f"'{self.prefix}'" if self.prefix else "the archive"
            raise fail(name, f"{where} is not an OCI image layout in the build context (no index.json)") from None

    def _rel(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def index_reference(self, tag: str) -> str:
        """The digest of the manifest (or index) tagged ``tag``, or the only one when untagged."""
        index = _json(self.index, self.name, "index.json")
        entries = index.get("manifests") or []
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise fail(self.name, "index.json: 'manifests' is not a list of descriptors")
        named = {str((e.get("annotations") or {}).get("org.opencontainers.image.ref.name", "")): e for e in entries}
        if tag:
            entry = named.get(tag)
            if entry is None:
                tags = ", ".join(list(filter(None, named))[:20])
                raise fail(self.name, f"no image tagged '{tag}' in the layout (tags: {tags})")
        elif len(entries) == 1:
            entry = entries[0]
        else:
            raise fail(self.name, f"the layout holds {len(entries)} images: name one with :tag")
        return Descriptor.from_json(entry, self.name).digest

    def _open_blob(self, digest: str, what: str) -> BinaryIO:
        try:
            return self.tree.open_file(self._rel(f"blobs/sha256/{digest.removeprefix('sha256:')}"))
        except (OSError, ArchiveError):
            raise fail(self.name, f"{what} {digest[:19]} is missing from the layout") from None

    async def manifest(self, reference: str) -> tuple[bytes, str]:
        with self._open_blob(reference, "manifest") as f:
            body = f.read(MAX_MANIFEST + 1)
        if len(body) > MAX_MANIFEST:
            raise fail(self.name, f"manifest {reference[:19]} is larger than {MAX_MANIFEST} bytes")
        return body, ""

    async def chunks(self, desc: Descriptor) -> AsyncGenerator[bytes, None]:
        with self._open_blob(desc.digest, "blob") as f:
            while chunk := f.read(1 << 20):
                yield chunk


def split_local(ref: str) -> tuple[str, str, str]:
    """``oci-layout://dir:tag`` -> (scheme, path, tag)."""
    scheme, _, rest = ref.partition("://")
    path, _, tag = rest.rpartition(":") if ":" in rest.rsplit("/", 1)[-1] else (rest, "", "")
    return scheme, path, tag


def unpack_archive(archive: BinaryIO, into: Path, ref: str, limits: TarLimits, capacity: Capacity) -> None:
    """An OCI archive (tar of a layout) -> a layout directory, through Ember's confined, bounded reader."""
    try:
        with Tree(into, limits, capacity=capacity) as tree:
            tree.apply_stream(archive, layer=False)
    except ArchiveError as exc:
        raise fail(ref, f"not a readable OCI archive: {exc}") from None
