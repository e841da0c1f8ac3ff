"""Run stages keep their recent seconds per step (written by the worker's reporter), so a run's
progress and ETA read the stage rows instead of aggregating its metrics on every status request.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 22:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("run_stages") as batch:
        batch.add_column(sa.Column("seconds_per_step", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("run_stages") as batch:
        batch.drop_column("seconds_per_step")
