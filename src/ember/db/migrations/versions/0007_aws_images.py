"""Images created through the AWS Lambda MicroVMs API (ember.aws.images): the AWS name of each (which allows
uppercase, unlike an Ember repo) and its tags, and its versions' request, build id and ACTIVE/INACTIVE status.
Nothing made before has any.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "aws_images",
        sa.Column("tenant", sa.String(63), primary_key=True),
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("repo", sa.String, nullable=False, unique=True),
        sa.Column("tags", sa.Text, nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.Column("updated_at", sa.String(32), nullable=False),
        sa.Column("deleted_at", sa.String(32), nullable=False),
    )
    op.create_table(
        "aws_image_versions",
        sa.Column("tenant", sa.String(63), primary_key=True),
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("build_id", sa.String(40), nullable=False, unique=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("spec", sa.Text, nullable=False),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.Column("updated_at", sa.String(32), nullable=False),
        sa.Column("deleted_at", sa.String(32), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("aws_image_versions")
    op.drop_table("aws_images")
