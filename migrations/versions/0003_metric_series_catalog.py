"""Catalog of metric series names per (run, stage, split), filled from existing metric rows.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21 08:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "metric_series",
        sa.Column("run_id", sa.String(length=40), nullable=False),
        sa.Column("stage_index", sa.Integer(), nullable=False),
        sa.Column("split", sa.String(length=20), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_metric_series_run_id_runs"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("run_id", "stage_index", "split", "name", name=op.f("pk_metric_series")),
    )
    keys = ("json_object_keys(m.\"values\") AS k" if op.get_bind().dialect.name == "postgresql"
            else "json_each(m.\"values\") AS k")
    key = "k" if op.get_bind().dialect.name == "postgresql" else "k.key"
    op.execute(f"INSERT INTO metric_series (run_id, stage_index, split, name) "
               f"SELECT DISTINCT m.run_id, m.stage_index, m.split, {key} FROM metrics m, {keys}")


def downgrade() -> None:
    op.drop_table("metric_series")
