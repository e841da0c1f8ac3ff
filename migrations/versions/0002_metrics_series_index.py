"""Index metrics by (run, stage, split, step) for series reads and downsampling.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21 08:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_metrics_series", "metrics", ["run_id", "stage_index", "split", "step"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_metrics_series", table_name="metrics")
