"""Idle policy and lifetime of a VM (ember.lifecycle): idle timeout, auto-resume, suspended TTL, maximum
duration (optionally of running time only), and the suspended spans the last two count from. VMs an earlier
release made have no limits.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.add_column(sa.Column("idle_timeout_s", sa.Integer, nullable=True))
        batch.add_column(sa.Column("auto_resume", sa.Boolean, nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("suspended_ttl_s", sa.Integer, nullable=True))
        batch.add_column(sa.Column("max_duration_s", sa.Integer, nullable=True))
        batch.add_column(sa.Column("max_duration_running_only", sa.Boolean, nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("suspended_at", sa.String(32), nullable=False, server_default=""))
        batch.add_column(sa.Column("suspended_s", sa.Float, nullable=False, server_default="0"))
    # a VM suspended before this release: its suspended TTL counts from its last change
    op.execute("UPDATE vms SET suspended_at = updated_at WHERE state = 'SUSPENDED'")


def downgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        for column in ("suspended_s", "suspended_at", "max_duration_running_only", "max_duration_s",
                       "suspended_ttl_s", "auto_resume", "idle_timeout_s"):  # fmt: skip
            batch.drop_column(column)
