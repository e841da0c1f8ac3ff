"""Evals get a lease (attempt, owner, heartbeat, queued_at); runs, datasets and evals remember when
the reaper last re-sent their message.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21 09:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _when(name: str) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=True)


def upgrade() -> None:
    for table in ("runs", "datasets"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(_when("resent_at"))
    with op.batch_alter_table("evals") as batch:
        # Existing evals start at attempt 0; the default exists only to fill them.
        batch.add_column(sa.Column("attempt", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("lease_owner", sa.String(length=200), nullable=True))
        batch.add_column(_when("heartbeat_at"))
        batch.add_column(_when("queued_at"))
        batch.add_column(_when("resent_at"))
    op.execute("UPDATE evals SET queued_at = created_at")
    with op.batch_alter_table("evals") as batch:
        batch.alter_column("attempt", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("evals") as batch:
        for column in ("resent_at", "queued_at", "heartbeat_at", "lease_owner", "attempt"):
            batch.drop_column(column)
    for table in ("datasets", "runs"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("resent_at")
