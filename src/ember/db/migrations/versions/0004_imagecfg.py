"""Images record the exec/file defaults of their Dockerfile config (ENV, WORKDIR, USER: ember.imagecfg).

An image built before this gets them from its build's config; a fork from the image it was forked from
(its ``parent``, followed up the chain); the built-in bases and their forks get none ("").

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _defaults(config: str) -> str:
    data = json.loads(config) if config else None
    if not isinstance(data, dict):
        return ""
    env, workdir, user = data.get("env") or [], data.get("workdir") or "/", data.get("user") or ""
    if isinstance(env, dict):  # Ember 0.1 kept ENV as an object
        env = [f"{k}={v}" for k, v in env.items()]
    return json.dumps({"env": env, "workdir": workdir, "user": user})


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("defaults", sa.Text, nullable=False, server_default=""))
    conn = op.get_bind()
    images = sa.table("images", sa.column("name", sa.String), sa.column("parent", sa.String),
                      sa.column("defaults", sa.Text))  # fmt: skip
    builds = sa.table("builds", sa.column("name", sa.String), sa.column("config", sa.Text))
    configs = {row.name: _defaults(row.config) for row in conn.execute(sa.select(builds.c.name, builds.c.config))}
    parents = {row.name: row.parent for row in conn.execute(sa.select(images.c.name, images.c.parent))}
    for name in parents:
        seen, at = set(), name
        while at and at not in configs and at not in seen:  # a fork: its parent's, up the chain
            seen.add(at)
            at = parents.get(at, "")
        found = configs.get(at, "")
        if found:
            conn.execute(sa.update(images).where(images.c.name == name).values(defaults=found))


def downgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.drop_column("defaults")
