"""Workers record their devices with their heartbeat; runs keep their fit estimate.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 22:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("id", sa.String(length=200), primary_key=True),
        sa.Column("device_kind", sa.String(length=10), nullable=False),
        sa.Column("device_count", sa.Integer(), nullable=False),
        sa.Column("memory_per_device_bytes", sa.BigInteger(), nullable=False),
        sa.Column("device_name", sa.String(length=200), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_workers_heartbeat_at", "workers", ["heartbeat_at"])
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("estimate", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("estimate")
    op.drop_index("ix_workers_heartbeat_at", table_name="workers")
    op.drop_table("workers")
