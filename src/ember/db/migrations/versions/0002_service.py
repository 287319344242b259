"""A multi-tenant service: tenants and keys; every resource owned by a tenant; VM run options, TERMINATED
records, a closed set of state reasons; events, idempotency, webhooks and storage usage.

Everything an Ember 0.1 database holds belongs to the tenant ``default`` afterwards, except the built-in base
image ``debian`` (tenant "", visible to all). Old free-text state reasons become a reason and a message.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import secrets

import sqlalchemy as sa
from alembic import op
from alembic.operations import BatchOperations

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BUILTIN = "debian"  # ember.images.BASE_IMAGE in Ember 0.1
DEFAULT_TENANT = "default"


def _reason(state: str, old: str) -> tuple[str, str]:
    """(reason, message) for an Ember 0.1 ``state_reason`` (free text then)."""
    if old == "user":
        return {"SUSPENDED": "user_suspend", "TERMINATING": "user_terminate"}.get(state, "launch"), ""
    if old in ("vmm_exited", "daemon_restart"):
        return old, ""
    for prefix, reason in (
        ("unreachable after a daemon restart", "agent_unreachable"),
        ("suspend failed", "suspend_failed"),
        ("resume failed", "resume_failed"),
        ("recovery failed", "recovery_failed"),
    ):
        if old.startswith(prefix):
            return reason, old
    return ("launch" if state == "RUNNING" else "vmm_exited" if state == "FAILED" else "launch"), old


def _sizes_64_bit(batch: BatchOperations) -> None:
    """Byte counts need 64 bits: a 2 GiB disk is 2**31 (SQLite's INTEGER always had them; PostgreSQL's has 32)."""
    for column in ("disk_bytes", "memory_bytes"):
        batch.alter_column(column, existing_type=sa.Integer, type_=sa.BigInteger, existing_nullable=False)


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("account_id", sa.String(12), nullable=False, unique=True),
        sa.Column("quotas", sa.Text, nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
    )
    op.create_table(
        "api_keys",
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(63), nullable=True, index=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("access_key_id", sa.String(32), nullable=False, unique=True),
        sa.Column("secret_sealed", sa.Text, nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.Column("revoked_at", sa.String(32), nullable=False),
    )
    tenant = sa.Column("tenant", sa.String(63), nullable=False, server_default=DEFAULT_TENANT)
    with op.batch_alter_table("images") as batch:
        batch.add_column(tenant._copy())
        batch.create_index("ix_images_tenant", ["tenant"])
        _sizes_64_bit(batch)
    with op.batch_alter_table("builds") as batch:
        batch.add_column(tenant._copy())
        batch.create_index("ix_builds_tenant", ["tenant"])
        _sizes_64_bit(batch)
    with op.batch_alter_table("vms") as batch:
        batch.add_column(tenant._copy())
        batch.add_column(sa.Column("env", sa.Text, nullable=False, server_default="{}"))
        batch.add_column(sa.Column("tags", sa.Text, nullable=False, server_default="{}"))
        batch.add_column(sa.Column("state_message", sa.Text, nullable=False, server_default=""))
        batch.add_column(sa.Column("terminated_at", sa.String(32), nullable=False, server_default=""))
        batch.alter_column("uid", existing_type=sa.Integer, nullable=True)
        batch.create_index("ix_vms_tenant", ["tenant"])
    op.create_table(
        "events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("tenant", sa.String(63), nullable=False),
        sa.Column("vm_id", sa.String, nullable=False),
        sa.Column("at", sa.String(32), nullable=False),
        sa.Column("from_state", sa.String(16), nullable=False),
        sa.Column("to_state", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
    )
    op.create_index("ix_events_tenant_id", "events", ["tenant", "id"])
    op.create_index("ix_events_vm_id_id", "events", ["vm_id", "id"])
    op.create_index("ix_events_at", "events", ["at"])
    op.create_table(
        "idempotency",
        sa.Column("tenant", sa.String(63), primary_key=True),
        sa.Column("kind", sa.String(16), primary_key=True),
        sa.Column("token", sa.String(64), primary_key=True),
        sa.Column("body_hash", sa.String(64), nullable=False),
        sa.Column("resource_id", sa.String, nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
    )
    op.create_table(
        "webhooks",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(63), nullable=False, index=True),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("secret_sealed", sa.Text, nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("webhook_id", sa.String(32), nullable=False, index=True),
        sa.Column("event_id", sa.Integer, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("at", sa.String(32), nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("duration_ms", sa.Float, nullable=False),
        sa.Column("next_at", sa.String(32), nullable=False),
    )
    op.create_table(
        "storage_usage",
        sa.Column("tenant", sa.String(63), primary_key=True),
        sa.Column("hour", sa.String(13), primary_key=True),
        sa.Column("image_byte_seconds", sa.Float, nullable=False),
        sa.Column("snapshot_byte_seconds", sa.Float, nullable=False),
    )

    bind = op.get_bind()
    tenants = sa.table("tenants", sa.column("name"), sa.column("account_id"), sa.column("quotas"),
                       sa.column("created_at"))  # fmt: skip
    created = bind.execute(sa.text("SELECT COALESCE(MIN(created_at), '') FROM images")).scalar() or ""
    account = f"{secrets.randbelow(10**12):012d}"
    bind.execute(tenants.insert().values(name=DEFAULT_TENANT, account_id=account, quotas="{}", created_at=created))
    bind.execute(sa.text("UPDATE images SET tenant = '' WHERE name = :name"), {"name": BUILTIN})
    vms = sa.table("vms", sa.column("id"), sa.column("state"), sa.column("state_reason"),
                   sa.column("state_message"))  # fmt: skip
    for vm_id, state, old in bind.execute(sa.select(vms.c.id, vms.c.state, vms.c.state_reason)).all():
        reason, message = _reason(state, old)
        bind.execute(vms.update().where(vms.c.id == vm_id).values(state_reason=reason, state_message=message))


def downgrade() -> None:
    for table in ("storage_usage", "webhook_deliveries", "webhooks", "idempotency", "events", "api_keys", "tenants"):
        op.drop_table(table)
    with op.batch_alter_table("vms") as batch:
        batch.drop_index("ix_vms_tenant")
        for column in ("tenant", "env", "tags", "state_message", "terminated_at"):
            batch.drop_column(column)
    for table in ("images", "builds"):
        with op.batch_alter_table(table) as batch:
            batch.drop_index(f"ix_{table}_tenant")
            batch.drop_column("tenant")
