"""The schema of Ember 0.1 (images, builds, vms), which made its tables without Alembic.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "images",
        sa.Column("name", sa.String, primary_key=True),
        sa.Column("machine", sa.Text, nullable=False),
        sa.Column("gid", sa.Integer, nullable=False, unique=True),
        sa.Column("token", sa.String, nullable=False),
        sa.Column("disk_bytes", sa.Integer, nullable=False),
        sa.Column("memory_bytes", sa.Integer, nullable=False),
        sa.Column("created_at", sa.String, nullable=False),
        sa.Column("parent", sa.String, nullable=False),
    )
    op.create_table(
        "builds",
        sa.Column("name", sa.String, primary_key=True),
        sa.Column("repo", sa.String, nullable=False, index=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("state", sa.String, nullable=False),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("step", sa.Text, nullable=False),
        sa.Column("config", sa.Text, nullable=False),
        sa.Column("steps", sa.Text, nullable=False),
        sa.Column("disk_bytes", sa.Integer, nullable=False),
        sa.Column("memory_bytes", sa.Integer, nullable=False),
        sa.Column("seconds", sa.Float, nullable=False),
        sa.Column("created_at", sa.String, nullable=False),
        sa.Column("finished_at", sa.String, nullable=False),
    )
    op.create_table(
        "vms",
        sa.Column("id", sa.String, primary_key=True),
        sa.Column("image", sa.String, nullable=False),
        sa.Column("state", sa.String, nullable=False),
        sa.Column("machine", sa.Text, nullable=False),
        sa.Column("uid", sa.Integer, nullable=False, unique=True),
        sa.Column("token", sa.String, nullable=False),
        sa.Column("ram", sa.String, nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("state_reason", sa.String, nullable=False),
        sa.Column("next_token", sa.String, nullable=False),
        sa.Column("created_at", sa.String, nullable=False),
        sa.Column("updated_at", sa.String, nullable=False),
    )


def downgrade() -> None:
    for table in ("vms", "builds", "images"):
        op.drop_table(table)
