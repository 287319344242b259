"""VMs run through the AWS Lambda MicroVMs API (ember.aws.microvms): what that API must show back (its network
connectors, the image ARN and version it named, the role and KMS key it recorded), as JSON. Every VM made
before, or through Ember's own API, has none ("{}").

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.add_column(sa.Column("aws", sa.Text, nullable=False, server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.drop_column("aws")
