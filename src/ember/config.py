"""Ember's configuration: one object, each field beside its variable and default."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (2.5 ms of the CLI's start, ember.cli)
if TYPE_CHECKING:
    from typing import Any


def _env(name: str, default: object) -> Any:
    return field(default=default, metadata={"env": name})


@dataclass(frozen=True)
class Settings:
    # Where Ember keeps its database, images, VM disks and snapshots.
    data_dir: Path = _env("EMBER_DATA_DIR", Path("/var/lib/ember"))
    # Downloaded/built inputs that can be rebuilt (base root filesystem tarballs).
    cache_dir_override: str = _env("EMBER_CACHE_DIR", "")
    # The daemon's Unix socket (the CLI's default endpoint).
    socket_path: Path = _env("EMBER_SOCKET", Path("/run/ember/ember.sock"))
    # The database: empty = SQLite at <data_dir>/ember.db; else a SQLAlchemy URL such as
    # "postgresql+psycopg://ember@/ember?host=/run/postgresql".
    database_url: str = _env("EMBER_DATABASE_URL", "")
    # The key sealing secrets Ember must read back (SigV4 secret keys, webhook secrets); empty = <data_dir>/secret.key.
    secret_key_file_override: str = _env("EMBER_SECRET_KEY_FILE", "")
    # Per-tenant quota defaults (a tenant's own limits override them: 'ember tenant set').
    quota_running_vms: int = _env("EMBER_QUOTA_RUNNING_VMS", 50)
    quota_running_vcpus: int = _env("EMBER_QUOTA_RUNNING_VCPUS", 100)
    quota_running_memory_mib: int = _env("EMBER_QUOTA_RUNNING_MEMORY_MIB", 64 * 1024)
    quota_suspended_vms: int = _env("EMBER_QUOTA_SUSPENDED_VMS", 500)
    quota_images: int = _env("EMBER_QUOTA_IMAGES", 100)
    quota_storage_bytes: int = _env("EMBER_QUOTA_STORAGE_BYTES", 500 * 1024**3)
    quota_concurrent_builds: int = _env("EMBER_QUOTA_CONCURRENT_BUILDS", 1)  # below EMBER_MAX_BUILDS: one tenant
    # cannot hold every build slot
    # Live (unrevoked) API keys one tenant may hold: each key has its own rate limit.
    keys_per_tenant: int = _env("EMBER_KEYS_PER_TENANT", 20)
    # Requests per second each API key may make on average, and its burst (a token bucket); root on the socket
    # is not limited.
    rate_limit_per_s: float = _env("EMBER_RATE_LIMIT_PER_S", 200.0)
    rate_limit_burst: int = _env("EMBER_RATE_LIMIT_BURST", 400)
    # How long a removed (TERMINATED) VM stays listable with its events, in seconds.
    terminated_retention_s: float = _env("EMBER_TERMINATED_RETENTION", 7 * 86400.0)
    # Seconds between storage usage samples (image and suspended-VM snapshot bytes per tenant, ember.usage).
    usage_sample_s: float = _env("EMBER_USAGE_SAMPLE_S", 60.0)
    # Optional TCP listener, e.g. "127.0.0.1:7070"; empty = Unix socket only.
    listen: str = _env("EMBER_LISTEN", "")
    # Bearer token the TCP listener requires (root-only 0600, made once); empty = <data_dir>/api-token.
    api_token_file_override: str = _env("EMBER_API_TOKEN_FILE", "")
    # The daemon the SDK and CLI talk to, e.g. "http://127.0.0.1:7070"; empty = the Unix socket above.
    url: str = _env("EMBER_URL", "")
    # The SDK's and CLI's bearer key ("ember_..."); empty = none (root on the socket), or the token file above.
    api_key: str = _env("EMBER_API_KEY", "")
    # Largest request body of a JSON route; refused (413) before it is read.
    max_json_body_bytes: int = _env("EMBER_MAX_JSON_BODY_BYTES", 1024 * 1024)
    # Largest build context upload (the tar as sent); refused (413) before or while it streams.
    max_build_context_bytes: int = _env("EMBER_MAX_BUILD_CONTEXT_BYTES", 2 * 1024**3)
    # Largest file copied into a VM in one request ('ember cp'), and largest stdin streamed to one exec.
    max_file_upload_bytes: int = _env("EMBER_MAX_FILE_UPLOAD_BYTES", 16 * 1024**3)
    # "auto" (hardware KVM if present and it boots, else TCG), "kvm" or "tcg".
    accel: str = _env("EMBER_ACCEL", "auto")
    qemu_binary: str = _env("EMBER_QEMU", "qemu-system-x86_64")
    # Guest size defaults; TCG gets one vCPU (two showed soft lockups here).
    memory_mib: int = _env("EMBER_MEMORY_MIB", 256)
    vcpus: int = _env("EMBER_VCPUS", 0)  # 0 = 1 on TCG, 2 on KVM
    disk_gib: int = _env("EMBER_DISK_GIB", 2)
    # Image-build VMs (RUN steps: package installs, compilers) get more memory than app VMs.
    build_memory_mib: int = _env("EMBER_BUILD_MEMORY_MIB", 1024)
    # All host ids of this daemon come from [uid_base, uid_base + uid_count): the lower half are
    # VMM uids (every VMM, build and capture VMs too, its own uid and primary gid), the upper half
    # image group ids, then the layer cache's group and qemu-img's uid (the last id is unused).
    # Daemons on one host need ranges that do not overlap.
    uid_base: int = _env("EMBER_UID_BASE", 640000)
    uid_count: int = _env("EMBER_UID_COUNT", 65536)
    vmm_pids_max: int = _env("EMBER_VMM_PIDS_MAX", 64)
    # VM egress: each running VM with egress gets one address of this IPv4 range for its namespace's
    # veth (routed on the host; daemons on one host need ranges that do not overlap).
    net_cidr: str = _env("EMBER_NET_CIDR", "10.200.0.0/16")
    # Most entries (CIDRs and domain names) in one VM's egress allowlist.
    egress_max_allow: int = _env("EMBER_EGRESS_MAX_ALLOW", 32)
    # Extra host memory a VMM may use beyond guest RAM (QEMU itself, TCG code cache).
    vmm_overhead_mib: int = _env("EMBER_VMM_OVERHEAD_MIB", 256)
    # CPU time a VMM may use beyond one core per vCPU (QEMU's I/O thread), in cores (cgroup cpu quota).
    vmm_cpu_overhead: float = _env("EMBER_VMM_CPU_OVERHEAD", 0.5)
    # What all VMMs together weigh against the daemon (100) when the CPU is contended (cgroup cpu.weight;
    # cpu.shares on v1): the API stays responsive while VMs boot and builds run.
    vmm_cpu_weight: int = _env("EMBER_VMM_CPU_WEIGHT", 25)
    # Throttles on a VMM's I/O to the disk holding data_dir (cgroup io.max / blkio); 0 = unlimited.
    # The defaults are above what one VM needs, so they only stop a single VM from saturating the disk.
    vmm_io_read_bps: int = _env("EMBER_VMM_IO_READ_BPS", 2 * 1024**3)
    vmm_io_write_bps: int = _env("EMBER_VMM_IO_WRITE_BPS", 1024**3)
    vmm_io_read_iops: int = _env("EMBER_VMM_IO_READ_IOPS", 100_000)
    vmm_io_write_iops: int = _env("EMBER_VMM_IO_WRITE_IOPS", 50_000)
    # Builds running at once (each needs build_memory_mib; fewer when MemAvailable is short); the rest queue.
    max_builds: int = _env("EMBER_MAX_BUILDS", 2)
    # Host-side deadline of one RUN step; the build VM is killed when it passes.
    build_step_timeout_s: float = _env("EMBER_BUILD_STEP_TIMEOUT", 1800.0)
    # Host-side deadline of one of Ember's own build-VM tools (mkdir, tar unpack of a COPY, fsfreeze).
    build_tool_timeout_s: float = _env("EMBER_BUILD_TOOL_TIMEOUT", 600.0)
    # Host-side deadline of one qemu-img run (checking, creating or flattening a disk).
    qemu_img_timeout_s: float = _env("EMBER_QEMU_IMG_TIMEOUT", 300.0)
    # Host-side deadline of a snapshot migration (saving or loading a template VM's state).
    migration_timeout_s: float = _env("EMBER_MIGRATION_TIMEOUT", 300.0)
    # Host-side deadline of pulling one FROM image from a registry (manifests and every layer).
    pull_timeout_s: float = _env("EMBER_PULL_TIMEOUT", 1800.0)
    # A build's log file stops (with one "log truncated" line) at this size.
    build_log_max_bytes: int = _env("EMBER_BUILD_LOG_MAX_BYTES", 16 * 1024 * 1024)
    # Bytes of progress a streamed job keeps for a slow or gone client; older lines become one "dropped" line.
    stream_backlog_bytes: int = _env("EMBER_STREAM_BACKLOG_BYTES", 1024 * 1024)
    # Each VM's app log (`ember logs`): its newest bytes, kept in the guest (4 KiB-64 MiB; fixed at image build).
    app_log_bytes: int = _env("EMBER_APP_LOG_BYTES", 1024 * 1024)
    # Pre-started VMMs kept per launched image (0 disables the pool).
    pool_size: int = _env("EMBER_POOL_SIZE", 2)
    # Pre-started VMMs kept for all images together; past it, the least recently launched image gives one up.
    pool_max_vmms: int = _env("EMBER_POOL_MAX_VMMS", 16)
    # App hooks (ember.hooks): the timeout of a runtime hook (run, resume, suspend, terminate; 1-60 s) and of
    # validate (1-3600 s) when the image declares none (LABEL ember.hooks.<hook>.timeout).
    hook_timeout_s: float = _env("EMBER_HOOK_TIMEOUT", 10.0)
    validate_timeout_s: float = _env("EMBER_VALIDATE_TIMEOUT", 300.0)
    # The most a pool pre-start spends warming the app (its validate hook, else its readiness check).
    pool_warm_timeout_s: float = _env("EMBER_POOL_WARM_TIMEOUT", 30.0)
    # Largest run payload (the run hook's body; 400 beyond), at most 65536 (the agent's bound).
    run_payload_max_bytes: int = _env("EMBER_RUN_PAYLOAD_MAX_BYTES", 16 * 1024)
    agent_timeout_s: float = _env("EMBER_AGENT_TIMEOUT", 30.0)
    # A restored guest's first answer (launch, pool pre-start, resume): under TCG on a loaded host a
    # fresh QEMU translates the guest's code again first, which can take far longer than one request.
    restore_answer_timeout_s: float = _env("EMBER_RESTORE_ANSWER_TIMEOUT", 120.0)
    # Guest-agent frames one VM may have queued in the daemon; when spent, its channel is not read.
    agent_vm_buffer_bytes: int = _env("EMBER_AGENT_VM_BUFFER_BYTES", 16 * 1024 * 1024)
    # The same for all VMs of the daemon together.
    agent_daemon_buffer_bytes: int = _env("EMBER_AGENT_DAEMON_BUFFER_BYTES", 256 * 1024 * 1024)
    # A VM's first queued bytes that never wait for the daemon-wide budget (other VMs cannot pause its replies).
    agent_vm_reserved_bytes: int = _env("EMBER_AGENT_VM_RESERVED_BYTES", 1024 * 1024)
    # The largest WebSocket message a shell client may send (terminal input or a control message); larger: closed.
    shell_max_message_bytes: int = _env("EMBER_SHELL_MAX_MESSAGE_BYTES", 64 * 1024)
    # A shell with neither input nor output for this long is closed (its command is killed).
    shell_idle_timeout_s: float = _env("EMBER_SHELL_IDLE_TIMEOUT", 3600.0)
    # Ingress: the HTTP listener that reaches apps in VMs ("" = none), and the domain of VM endpoints
    # (http://<vm-id>.<domain>:<port>/; "localhost" names 127.0.0.1 in browsers).
    ingress_listen: str = _env("EMBER_INGRESS_LISTEN", "127.0.0.1:7080")
    ingress_domain: str = _env("EMBER_INGRESS_DOMAIN", "localhost")
    # The key signing ingress auth tokens (32 bytes, root-only, made once); empty = <data_dir>/ingress.key.
    # Replacing it revokes every token.
    ingress_key_file_override: str = _env("EMBER_INGRESS_KEY_FILE", "")
    # Client connections the ingress serves at once; more are answered 503 (ember.ingress.admission).
    ingress_max_connections: int = _env("EMBER_INGRESS_MAX_CONNECTIONS", 1024)
    # Of those, connections from one client address (an IPv6 client's /64); more are answered 503.
    ingress_max_per_address: int = _env("EMBER_INGRESS_MAX_PER_ADDRESS", 128)
    # Of those, connections with no request authorised yet (idle, head arriving); past it the oldest is closed.
    ingress_max_unauthenticated: int = _env("EMBER_INGRESS_MAX_UNAUTHENTICATED", 256)
    # A request body must average this many bytes/s of client time after EMBER_INGRESS_HEAD_TIMEOUT (else 408).
    ingress_body_min_rate: int = _env("EMBER_INGRESS_BODY_MIN_RATE", 1024)
    # TCP relays (ingress connections into the guest) one VM may have open at once; each holds at most
    # 256 KiB of the VM's agent buffer, and all together at most half of it (fewer are allowed if need be).
    ingress_vm_connections: int = _env("EMBER_INGRESS_VM_CONNECTIONS", 32)
    # Seconds a client has to send a request head (slowloris), and a kept-alive connection may wait for the next.
    ingress_head_timeout_s: float = _env("EMBER_INGRESS_HEAD_TIMEOUT", 10.0)
    # Seconds a request or response (or WebSocket) may pass without a byte either way before it is cut.
    ingress_idle_timeout_s: float = _env("EMBER_INGRESS_IDLE_TIMEOUT", 300.0)
    # Seconds the app in the guest has to accept a connection.
    ingress_connect_timeout_s: float = _env("EMBER_INGRESS_CONNECT_TIMEOUT", 10.0)
    # Most entries one directory listing ('ember ls') returns; more are reported as truncated.
    ls_max_entries: int = _env("EMBER_LS_MAX_ENTRIES", 50_000)
    boot_timeout_s: float = _env("EMBER_BOOT_TIMEOUT", 120.0)
    debian_mirror: str = _env("EMBER_DEBIAN_MIRROR", "http://deb.debian.org/debian")
    # Every untrusted tar (build context, layer, oci-archive, ADD archive, COPY --from) is read with these
    # limits (ember.build.tarread): decompressed bytes, members, one PAX/GNU long-name header, path depth
    # (also of anything a tree gets through symlinks), and one file's data.
    tar_max_bytes: int = _env("EMBER_TAR_MAX_BYTES", 8 << 30)
    tar_max_members: int = _env("EMBER_TAR_MAX_MEMBERS", 1_000_000)
    tar_max_header_bytes: int = _env("EMBER_TAR_MAX_HEADER_BYTES", 1 << 20)
    tar_max_depth: int = _env("EMBER_TAR_MAX_DEPTH", 256)
    tar_max_file_bytes: int = _env("EMBER_TAR_MAX_FILE_BYTES", 4 << 30)
    # The AWS API's code artifacts (ember.aws.artifacts): the S3-compatible store that s3:// URIs name (its URL,
    # e.g. "http://127.0.0.1:8333"; empty = s3:// refused), the credentials and region Ember signs with, and the
    # deadline of one download (the object's size is capped by EMBER_MAX_BUILD_CONTEXT_BYTES).
    s3_endpoint: str = _env("EMBER_S3_ENDPOINT", "")
    s3_access_key_id: str = _env("EMBER_S3_ACCESS_KEY_ID", "")
    s3_secret_access_key: str = field(default="", metadata={"env": "EMBER_S3_SECRET_ACCESS_KEY"}, repr=False)
    s3_region: str = _env("EMBER_S3_REGION", "us-east-1")
    s3_timeout_s: float = _env("EMBER_S3_TIMEOUT", 300.0)
    # The host directory under which file:// code artifacts may be read (every component opened without following
    # a symlink); empty = file:// refused. Which part of it (and of the store) a tenant may name: the next one.
    aws_file_artifact_root: str = _env("EMBER_AWS_FILE_ARTIFACT_ROOT", "")
    # "account": a tenant's code artifacts are s3://BUCKET/<its account id>/... and <root>/<its account id>/...
    # only; "shared" (one tenant, or tenants who trust each other): any object of the store, any file under the root.
    aws_artifact_scope: str = _env("EMBER_AWS_ARTIFACT_SCOPE", "account")
    # A code artifact zip's most entries, and the most one entry may expand its compressed bytes (entries under
    # 1 MiB excepted); its total unpacked bytes are capped by EMBER_MAX_BUILD_CONTEXT_BYTES, its depth by
    # EMBER_TAR_MAX_DEPTH, one file by EMBER_TAR_MAX_FILE_BYTES.
    zip_max_entries: int = _env("EMBER_ZIP_MAX_ENTRIES", 100_000)
    zip_max_ratio: int = _env("EMBER_ZIP_MAX_RATIO", 200)
    # Registries (host[:port], comma-separated) pulled from over plain HTTP; loopback ones always are.
    insecure_registries: tuple[str, ...] = _env("EMBER_INSECURE_REGISTRIES", ())
    # Registry hosts (comma-separated; any port) the daemon may reach at loopback or private addresses, as
    # it may those above; any other registry, token realm or blob host must resolve to public addresses only.
    trusted_registries: tuple[str, ...] = _env("EMBER_TRUSTED_REGISTRIES", ())
    # One webhook delivery attempt's whole deadline (connect, send, the receiver's answer).
    webhook_timeout_s: float = _env("EMBER_WEBHOOK_TIMEOUT", 10.0)
    # Attempts per event and webhook before the delivery is FAILED (the first one included).
    webhook_max_attempts: int = _env("EMBER_WEBHOOK_MAX_ATTEMPTS", 8)
    # Delay before a delivery's second attempt; each later one doubles it, up to webhook_backoff_max_s.
    webhook_backoff_s: float = _env("EMBER_WEBHOOK_BACKOFF", 1.0)
    webhook_backoff_max_s: float = _env("EMBER_WEBHOOK_BACKOFF_MAX", 300.0)
    # Webhook hosts (comma-separated; any port) the daemon may reach at loopback or private addresses; any
    # other webhook URL must resolve to public addresses only (checked at creation and at every delivery).
    webhook_trusted_hosts: tuple[str, ...] = _env("EMBER_WEBHOOK_TRUSTED_HOSTS", ())
    # Webhooks one tenant may register.
    webhooks_per_tenant: int = _env("EMBER_WEBHOOKS_PER_TENANT", 10)
    # Finished delivery-log rows kept per webhook (the newest; older ones are pruned).
    webhook_log_rows: int = _env("EMBER_WEBHOOK_LOG_ROWS", 1000)
    # Idle policy (ember.lifecycle): the shortest idle timeout a run may ask (60 s, as AWS's; tests lower it).
    min_idle_s: int = _env("EMBER_MIN_IDLE_SECONDS", 60)
    # The longest maximum duration a run may ask, in seconds (30 days; AWS allows 8 hours).
    max_duration_limit_s: int = _env("EMBER_MAX_DURATION_LIMIT", 30 * 86400)
    # The AWS Lambda MicroVMs API (ember.aws): the largest request body it reads (before verifying its signature),
    aws_max_body_bytes: int = _env("EMBER_AWS_MAX_BODY_BYTES", 1024 * 1024)
    # how far a request's X-Amz-Date may be from the daemon's clock, in seconds (AWS's SigV4 allows 5 minutes),
    aws_clock_skew_s: float = _env("EMBER_AWS_CLOCK_SKEW_S", 300.0)
    # and the longest maximumDurationInSeconds RunMicrovm takes (AWS's 8 hours; up to EMBER_MAX_DURATION_LIMIT).
    aws_max_duration_s: int = _env("EMBER_AWS_MAX_DURATION_S", 8 * 3600)
    # Refused AWS API requests (AccessDenied) per second, and their burst, that one peer address (an IPv6 /64)
    # may cause naming no live key, and again for each live key it sends bad signatures for; past them such
    # requests answer ThrottlingException before any key is looked up or body read (ember.aws.router).
    aws_denied_per_s: float = _env("EMBER_AWS_DENIED_PER_S", 2.0)
    aws_denied_burst: int = _env("EMBER_AWS_DENIED_BURST", 50)
    # Seconds between the idle scheduler's passes (idle checks, suspended TTLs, maximum durations, guest
    # "suspend now" requests): an automatic transition comes at most this late.
    idle_check_s: float = _env("EMBER_IDLE_CHECK_S", 5.0)
    # A VMM using more host CPU than this (cores, over one pass) is busy, not idle. An idle TCG guest costs
    # 0.00-0.04 here (its timer ticks; measured over 0.5 s passes); a guest process that computes, ~1.
    idle_cpu_threshold: float = _env("EMBER_IDLE_CPU_THRESHOLD", 0.1)
    # Host-side deadline of asking a guest whether it holds itself awake or asks to be suspended (ember-idle).
    idle_guest_answer_s: float = _env("EMBER_IDLE_GUEST_ANSWER_S", 5.0)
    # Idle checks (a CPU sample and the guest's answer) the scheduler runs at once, across all tenants.
    idle_check_concurrency: int = _env("EMBER_IDLE_CHECK_CONCURRENCY", 16)
    # Hand the host's CA bundle to every build's RUN steps, as if each asked --host-ca-certs (TLS-inspecting proxy).
    build_host_ca_certs: bool = _env("EMBER_BUILD_HOST_CA_CERTS", False)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.metadata["env"] in env:
                values[f.name] = _coerce(type(f.default), env[f.metadata["env"]], f.metadata["env"])
        return replace(cls(**values), **overrides)

    @property
    def vmm_uids(self) -> range:
        return range(self.uid_base, self.uid_base + self.uid_count // 2)

    @property
    def image_gids(self) -> range:
        return range(self.uid_base + self.uid_count // 2, self.uid_base + self.uid_count - 3)

    @property
    def layer_gid(self) -> int:
        """The group of cached build layers (root-owned, 0440): build VMMs and qemu-img get it."""
        return self.uid_base + self.uid_count - 3

    @property
    def qemu_img_uid(self) -> int:
        """The uid (and gid) every qemu-img runs as (ember.host.qemuimg); no VMM has it."""
        return self.uid_base + self.uid_count - 2

    @property
    def db_path(self) -> Path:
        return self.data_dir / "ember.db"

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.db_path}"

    @property
    def secret_key_path(self) -> Path:
        return Path(self.secret_key_file_override) if self.secret_key_file_override else self.data_dir / "secret.key"

    @property
    def ingress_key_path(self) -> Path:
        return Path(self.ingress_key_file_override) if self.ingress_key_file_override else self.data_dir / "ingress.key"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def vms_dir(self) -> Path:
        return self.data_dir / "vms"

    @property
    def guest_dir(self) -> Path:
        return self.data_dir / "guest"

    @property
    def api_token_path(self) -> Path:
        return Path(self.api_token_file_override) if self.api_token_file_override else self.data_dir / "api-token"

    @property
    def cache_dir(self) -> Path:
        return Path(self.cache_dir_override) if self.cache_dir_override else self.data_dir / "cache"


TRUE = frozenset({"1", "true", "yes", "on"})
FALSE = frozenset({"0", "false", "no", "off"})


def _coerce(kind: type, raw: str, env_name: str) -> Any:
    if kind is bool:  # bool("0") is True: only these words say yes or no
        word = raw.strip().lower()
        if word not in TRUE | FALSE:
            raise ValueError(f"{env_name}={raw!r} is not a valid bool: use 1/true/yes/on or 0/false/no/off")
        return word in TRUE
    if kind is tuple:
        return tuple(item.strip() for item in raw.split(",") if item.strip())
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{env_name}={raw!r} is not a valid {kind.__name__}") from None
