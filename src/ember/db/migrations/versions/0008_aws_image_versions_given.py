"""Images created through the AWS Lambda MicroVMs API: the highest version number each has given (its repo's
high-water mark), so that a version number is never given twice, not even after the image is deleted and made
again. Images made before count from their versions' numbers. A version is recorded once its build's record
exists (a build refused before it records no version), so a version's ``error`` (never written) goes.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("aws_images") as batch:
        batch.add_column(sa.Column("last_version", sa.Integer, nullable=False, server_default="0"))
    op.execute(
        "UPDATE aws_images SET last_version = (SELECT COALESCE(MAX(v.version), 0) FROM aws_image_versions v "
        "WHERE v.tenant = aws_images.tenant AND v.name = aws_images.name)"
    )
    with op.batch_alter_table("aws_image_versions") as batch:
        batch.drop_column("error")


def downgrade() -> None:
    with op.batch_alter_table("aws_image_versions") as batch:
        batch.add_column(sa.Column("error", sa.Text, nullable=False, server_default=""))
    with op.batch_alter_table("aws_images") as batch:
        batch.drop_column("last_version")
