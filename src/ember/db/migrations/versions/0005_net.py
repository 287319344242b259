"""Per-VM egress: the policy a VM's network is set up with at every launch and resume (ember.network).

Every VM made before has none (no network), as it had.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"  # after 0004_imagecfg (main: 0003 idle, 0004 imagecfg)
branch_labels = None
depends_on = None

NONE = '{"mode": "none", "allow": []}'


def upgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.add_column(sa.Column("egress", sa.Text, nullable=False, server_default=NONE))


def downgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.drop_column("egress")
