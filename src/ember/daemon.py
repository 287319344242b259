"""Assemble Ember's parts and serve the API (``ember serve``)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import socket
import stat
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import uvicorn

from ember.build.service import BuildService
from ember.config import Settings
from ember.db.store import Store, connect
from ember.db.tenants import TenantStore
from ember.db.webhooks import WebhookStore
from ember.engine import Engine
from ember.errors import HostSetupError
from ember.guest.artifacts import ensure_artifacts
from ember.host import cgroup
from ember.host.binaries import ensure_jailer
from ember.images import BASE_IMAGE, ImageStore
from ember.ingress.tokens import TokenSigner
from ember.lifecycle.scheduler import Scheduler
from ember.recovery import recover
from ember.runtime import Host, UidPool
from ember.tenancy.idempotency import KEPT_S
from ember.tenancy.keys import token_hash
from ember.tenancy.quotas import QuotaGate
from ember.tenancy.secrets import SecretBox
from ember.usage import StorageSampler
from ember.vmm import accel as accel_mod
from ember.webhooks import WebhookDispatcher

log = logging.getLogger("ember")
ADMIN_FILE_KEY = "key-admin-file"  # the api-token file's admin key


@dataclass
class Daemon:
    settings: Settings
    engine: Engine
    images: ImageStore
    builds: BuildService
    tenants: TenantStore
    secrets: SecretBox
    quotas: QuotaGate
    uid_lock: int  # held for the daemon's lifetime
    webhooks: WebhookDispatcher  # started here; the API's lifespan closes it
    tokens: TokenSigner  # VM auth tokens of the ingress
    listeners: list[uvicorn.Server] = field(default_factory=list)  # the uvicorn servers: drained before VMs are let go

    async def drain(self) -> None:
        """Every listener stops taking requests and finishes those in flight, for at most DRAIN_S. uvicorn
        shuts its servers down one after another (a SIGTERM reaches one, which re-raises it for the next),
        and the first one's shutdown must not detach VMs under requests another one is still serving (a
        suspend on the socket while the TCP listener stopped first ended FAILED)."""
        for server in self.listeners:
            server.should_exit = True
        deadline = time.monotonic() + DRAIN_S
        while any(server.server_state.tasks for server in self.listeners) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


def lock_uid_range(settings: Settings) -> int:
    """Two daemons must never give the same uid to two VMMs: one daemon per uid range."""
    path = Path("/run/ember") / f"uids-{settings.uid_base}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise HostSetupError(
            f"another Ember daemon uses VMM uids from {settings.uid_base}: stop it, or give this one "
            "its own range with EMBER_UID_BASE"
        ) from None
    return fd


async def assemble(settings: Settings) -> Daemon:
    if os.geteuid() != 0:
        raise HostSetupError("the Ember daemon must run as root (it gives every VMM its own uid and cgroup)")
    os.umask(0o077)  # build logs, layer configs, tokens: root-only unless opened up on purpose
    run_dirs, layers = settings.data_dir / "run", settings.data_dir / "layers"  # VMM control dirs, build layers
    for d in (settings.data_dir, settings.images_dir, settings.vms_dir, settings.guest_dir, settings.cache_dir,
              run_dirs, layers):  # fmt: skip
        d.mkdir(parents=True, exist_ok=True)
        # VMMs reach their files through binds in their own mount namespace, never through these
        os.chmod(d, 0o700)
    # build VMMs (bound to this directory in their jail) reach their layer chain through the layer group
    os.chown(layers, 0, settings.layer_gid)
    os.chmod(layers, 0o710)
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)  # start-up races are retried and reported by us
    for chatty in ("httpx", "httpcore", "botocore", "s3transfer"):  # a line per webhook request, connection, S3 event
        logging.getLogger(chatty).setLevel(logging.WARNING)
    db = await asyncio.to_thread(connect, settings.db_url)  # migrated to this release's schema
    if not settings.database_url:
        os.chmod(settings.db_path, 0o600)
    store, tenants = Store(db), TenantStore(db)
    box = SecretBox.from_file(settings.secret_key_path)
    guest = await asyncio.to_thread(ensure_artifacts, settings.guest_dir)
    for path in (guest.initramfs, guest.build_initramfs, guest.initramfs.parent):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    jailer = await asyncio.to_thread(ensure_jailer, settings.data_dir / "bin")
    choice = await asyncio.to_thread(accel_mod.choose, settings.accel, settings.qemu_binary)
    if choice.accel.is_security_boundary:
        log.info("accelerator: KVM (%s)", choice.reason)
    else:
        log.warning("accelerator: TCG (%s); %s", choice.reason, accel_mod.TCG_WARNING)
    uid_lock = lock_uid_range(settings)
    uids = UidPool(lambda taken: store.free_uid(settings.vmm_uids, exclude=taken))
    cgroups = cgroup.detect(cgroup.group_for(settings.data_dir), cpu_weight=settings.vmm_cpu_weight)
    host = Host(settings, cgroups, jailer, uids)
    images = ImageStore(settings, store, host, guest, choice)
    engine = Engine(settings, store, host, images)
    builds = BuildService(store, images, allocate_uid=uids.allocate, release_uid=uids.release)
    await recover(engine)  # first: it kills a killed daemon's build VMMs before the egress filter is renewed
    builds.interrupted()
    engine.spawn_chore(forget_terminated(store, tenants, settings.terminated_retention_s))
    engine.spawn_chore(StorageSampler(settings, store).run())  # storage GiB-hours (ember.usage)
    engine.spawn_chore(Scheduler(engine).run())  # idle suspends, suspended TTLs, maximum durations
    base = store.get_image(BASE_IMAGE)
    if base is not None:
        engine.warm_up(base)
    webhooks = WebhookDispatcher(settings, WebhookStore(db), box)
    store.listeners.append(webhooks.on_event)
    webhooks.start()  # what was pending before a restart, and every event since, is sent
    tokens = TokenSigner.from_file(settings.ingress_key_path)
    return Daemon(settings, engine, images, builds, tenants, box, QuotaGate(), uid_lock, webhooks, tokens)


PURGE_EVERY_S = 3600.0
DRAIN_S = 60.0  # what a stopping daemon gives requests in flight on its other listeners


def forget_before(now: datetime, retention_s: float) -> str:
    """Terminated VMs are listed for the retention period, but their records and events (what usage is
    computed from) are kept until the previous month can no longer be billed: the later of the two."""
    listed = now - timedelta(seconds=retention_s)
    this_month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    previous_month = (this_month - timedelta(days=1)).replace(day=1)
    return min(listed, previous_month).isoformat(timespec="milliseconds")


async def forget_terminated(store: Store, tenants: TenantStore, retention_s: float) -> None:
    """Every hour, forget VMs terminated before :func:`forget_before` (and their events), and client tokens
    past the day they answer retries."""
    while True:
        now = datetime.now(UTC)
        cutoff = forget_before(now, retention_s)
        try:
            gone = await asyncio.to_thread(store.purge_terminated, cutoff)
            if gone:
                log.info("forgot %d VMs terminated before %s", gone, cutoff)
            tokens_before = (now - timedelta(seconds=KEPT_S)).isoformat(timespec="milliseconds")
            await asyncio.to_thread(tenants.purge_tokens, tokens_before)
        except Exception:  # a busy or full database: try again next time
            log.exception("forgetting terminated VMs failed")
        await asyncio.sleep(PURGE_EVERY_S)


def bind_unix_socket(path: Path) -> socket.socket:
    """The API socket: anyone on the host may connect; root is known by its peer credentials, everyone
    else needs an API key (ember.api.auth). Made 0600 and opened up only once it listens."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    sock.listen(128)
    os.chmod(path, 0o666)
    return sock


def api_token(path: Path) -> str:
    """The TCP listener's bearer token, in a root-only 0600 file: made once (atomically), then
    reused across restarts. Delete the file and restart the daemon to rotate it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, secrets.token_urlsafe(32).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            with contextlib.suppress(FileExistsError):  # another daemon made it first: use theirs
                os.link(tmp, path)
        finally:
            tmp.unlink()
        return api_token(path)
    except OSError as exc:
        raise HostSetupError(f"the API token file {path} cannot be opened ({exc.strerror}): remove it") from None
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        token = f.read(256).strip()
    if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o077 or len(token) < 32:
        raise HostSetupError(
            f"the API token file {path} must be a root-only (0600) file holding a token: remove it, "
            "the daemon makes a new one"
        )
    return token


async def serve(settings: Settings) -> None:
    from ember.api.app import create_app
    from ember.api.auth import Authenticator, PeerCredProtocol, PeerCredWSProtocol
    from ember.api.guard import BodyCaps, RequestGuard, TcpPolicy, tcp_listener
    from ember.tenancy.ratelimit import RateLimiter

    tcp = tcp_listener(settings.listen) if settings.listen else None
    daemon = await assemble(settings)
    auth = Authenticator(daemon.tenants, RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst))
    app = create_app(daemon, auth)
    caps = BodyCaps.from_settings(settings)
    if settings.ingress_listen:  # HTTP into VMs; its connections end with the daemon's chores
        from ember.ingress.proxy import IngressServer

        shell = RequestGuard(app, caps, None, auth, daemon.tokens)  # /ember/shell: shell tokens only
        ingress = IngressServer(settings, daemon.engine, auth, daemon.tokens, shell=shell)
        await ingress.start()
        daemon.engine.spawn_chore(ingress.run())
    if tcp is not None:  # before the socket is bound: a caller that can connect finds the key file written
        daemon.tenants.put_admin_key(ADMIN_FILE_KEY, token_hash(api_token(settings.api_token_path)))
    unix = bind_unix_socket(settings.socket_path)
    # WebSockets (the shell): wsproto, each message at most EMBER_SHELL_MAX_MESSAGE_BYTES before it is read
    ws_max = settings.shell_max_message_bytes
    on_socket = uvicorn.Config(
        RequestGuard(app, caps, None, auth, daemon.tokens),
        http=PeerCredProtocol,
        log_level="warning",
        proxy_headers=False,  # no X-Forwarded-For decides who a peer is
        ws=PeerCredWSProtocol,
        ws_max_size=ws_max,
    )
    servers: list[tuple[uvicorn.Server, list[socket.socket] | None]] = [(uvicorn.Server(on_socket), [unix])]
    if tcp is not None:
        log.info("TCP listener %s; the admin key is in %s", settings.listen, settings.api_token_path)
        guarded = RequestGuard(app, caps, TcpPolicy.for_listener(settings.listen), auth, daemon.tokens)
        config = uvicorn.Config(
            guarded, host=tcp[0], port=tcp[1], log_level="warning", ws="wsproto", ws_max_size=ws_max,
            proxy_headers=False,  # a loopback client's X-Forwarded-For would choose its address (refusal limits)
        )  # fmt: skip
        servers.append((uvicorn.Server(config), None))
    daemon.listeners.extend(server for server, _ in servers)
    log.info("listening on %s%s", settings.socket_path, f" and {settings.listen}" if settings.listen else "")
    await asyncio.gather(*(server.serve(sockets=sockets) for server, sockets in servers))
