"""Ember's one database schema (SQLAlchemy Core): SQLite by default, PostgreSQL when EMBER_DATABASE_URL says so.

Timestamps are ISO-8601 UTC strings (:func:`ember.models.utcnow`). The schema evolves only through the
Alembic migrations in ``ember/db/migrations/versions``; their head must equal these tables
(``tests/unit/test_db_schema.py`` checks it).
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Column, Float, Index, Integer, MetaData, String, Table, Text

metadata = MetaData()

tenants = Table(
    "tenants",
    metadata,
    Column("name", String(63), primary_key=True),
    Column("account_id", String(12), nullable=False, unique=True),
    Column("quotas", Text, nullable=False),  # JSON: the tenant's overrides of the Settings defaults
    Column("created_at", String(32), nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("key_id", String(32), primary_key=True),
    Column("tenant", String(63), nullable=True, index=True),  # NULL: an admin key
    Column("name", String(200), nullable=False),
    Column("token_hash", String(64), nullable=False, unique=True),  # SHA-256 of the bearer token
    Column("access_key_id", String(32), nullable=False, unique=True),
    Column("secret_sealed", Text, nullable=False),  # the SigV4 secret, sealed (ember.tenancy.secrets)
    Column("created_at", String(32), nullable=False),
    Column("revoked_at", String(32), nullable=False),
)

images = Table(
    "images",
    metadata,
    Column("name", String, primary_key=True),  # internal: ember.tenancy.names
    Column("machine", Text, nullable=False),
    Column("gid", Integer, nullable=False, unique=True),
    Column("token", String, nullable=False),
    Column("disk_bytes", BigInteger, nullable=False),  # 64-bit: a 2 GiB disk is 2**31 bytes
    Column("memory_bytes", BigInteger, nullable=False),
    Column("created_at", String, nullable=False),
    Column("parent", String, nullable=False),
    Column("tenant", String(63), nullable=False, index=True),  # "": a built-in base, visible to all
    Column("defaults", Text, nullable=False),  # JSON: exec/file defaults (ember.imagecfg); "": none
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
    Column("disk_bytes", BigInteger, nullable=False),  # 64-bit: a 2 GiB disk is 2**31 bytes
    Column("memory_bytes", BigInteger, nullable=False),
    Column("seconds", Float, nullable=False),
    Column("created_at", String, nullable=False),
    Column("finished_at", String, nullable=False),
    Column("tenant", String(63), nullable=False, index=True),
)

vms = Table(
    "vms",
    metadata,
    Column("id", String, primary_key=True),
    Column("image", String, nullable=False),
    Column("state", String, nullable=False),
    Column("machine", Text, nullable=False),
    Column("uid", Integer, nullable=True, unique=True),  # NULL once TERMINATED: the uid is free again
    Column("token", String, nullable=False),
    Column("ram", String, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("state_reason", String, nullable=False),
    Column("next_token", String, nullable=False),
    Column("created_at", String, nullable=False),
    Column("updated_at", String, nullable=False),
    Column("tenant", String(63), nullable=False, index=True),
    Column("env", Text, nullable=False),  # JSON object
    Column("tags", Text, nullable=False),  # JSON object
    Column("state_message", Text, nullable=False),
    Column("terminated_at", String(32), nullable=False),
    # idle policy and lifetime (ember.models.IdlePolicy; NULL: no limit), and the suspended spans they count
    Column("idle_timeout_s", Integer, nullable=True),
    Column("auto_resume", Boolean, nullable=False),
    Column("suspended_ttl_s", Integer, nullable=True),
    Column("max_duration_s", Integer, nullable=True),
    Column("max_duration_running_only", Boolean, nullable=False),
    Column("suspended_at", String(32), nullable=False),
    Column("suspended_s", Float, nullable=False),
    Column("egress", Text, nullable=False, server_default='{"mode": "none", "allow": []}'),  # JSON: ember.network
    Column("aws", Text, nullable=False, server_default="{}"),  # JSON: a VM run through the AWS API (ember.aws)
)

events = Table(
    "events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("tenant", String(63), nullable=False),
    Column("vm_id", String, nullable=False),
    Column("at", String(32), nullable=False),
    Column("from_state", String(16), nullable=False),
    Column("to_state", String(16), nullable=False),
    Column("reason", String(32), nullable=False),
    Column("message", Text, nullable=False),
    Column("actor", String(64), nullable=False),
    Index("ix_events_tenant_id", "tenant", "id"),
    Index("ix_events_vm_id_id", "vm_id", "id"),
    Index("ix_events_at", "at"),  # usage: each VM's last state before a window
)

idempotency = Table(
    "idempotency",
    metadata,
    Column("tenant", String(63), primary_key=True),
    Column("kind", String(16), primary_key=True),
    Column("token", String(64), primary_key=True),
    Column("body_hash", String(64), nullable=False),
    Column("resource_id", String, nullable=False),
    Column("created_at", String(32), nullable=False),
)

webhooks = Table(
    "webhooks",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("tenant", String(63), nullable=False, index=True),
    Column("url", Text, nullable=False),
    Column("secret_sealed", Text, nullable=False),
    Column("created_at", String(32), nullable=False),
)

webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("webhook_id", String(32), nullable=False, index=True),
    Column("event_id", Integer, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("at", String(32), nullable=False),
    Column("status", Integer, nullable=False),  # the receiver's HTTP status; 0: no answer
    Column("error", Text, nullable=False),
    Column("state", String(16), nullable=False),  # PENDING, DELIVERED, FAILED
    Column("duration_ms", Float, nullable=False),
    Column("next_at", String(32), nullable=False),
)

storage_usage = Table(
    "storage_usage",
    metadata,
    Column("tenant", String(63), primary_key=True),
    Column("hour", String(13), primary_key=True),  # YYYY-MM-DDTHH (UTC)
    Column("image_byte_seconds", Float, nullable=False),
    Column("snapshot_byte_seconds", Float, nullable=False),
)

# Images created through the AWS Lambda MicroVMs API (ember.aws.images): each is an Ember image repo of its
# tenant (``repo``, internal: ember.tenancy.names), with what that API must show back. ``deleted_at`` marks a
# deleted one (its repo is gone), so that deleting it again succeeds, as the API says.
aws_images = Table(
    "aws_images",
    metadata,
    Column("tenant", String(63), primary_key=True),
    Column("name", String(64), primary_key=True),  # the AWS name: [A-Za-z0-9_-]{1,64}, case-sensitive
    Column("repo", String, nullable=False, unique=True),
    Column("tags", Text, nullable=False),  # JSON object
    Column("created_at", String(32), nullable=False),
    Column("updated_at", String(32), nullable=False),
    Column("deleted_at", String(32), nullable=False),  # "": live
    Column("last_version", Integer, nullable=False, server_default="0"),  # the highest version number it gave
)

# Their versions: one build each (the Ember build ``repo:version``), the request that made it and its status.
aws_image_versions = Table(
    "aws_image_versions",
    metadata,
    Column("tenant", String(63), primary_key=True),
    Column("name", String(64), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("build_id", String(40), nullable=False, unique=True),
    Column("status", String(16), nullable=False),  # ACTIVE or INACTIVE (RunMicrovm refuses an INACTIVE one)
    Column("spec", Text, nullable=False),  # JSON: the create/update request's members (ember.aws.images)
    Column("created_at", String(32), nullable=False),
    Column("updated_at", String(32), nullable=False),
    Column("deleted_at", String(32), nullable=False),  # "": live
)
