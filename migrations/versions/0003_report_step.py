"""the report as a tracked step: when it was rendered, where, its last error and the next retry

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 21:55:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("cases", schema=None) as batch_op:
        batch_op.add_column(sa.Column("report_path", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("report_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("report_error", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("report_attempts", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("report_next_at", sa.DateTime(timezone=True), nullable=True))
    # Cases processed before this revision had their report rendered right after the commit; only those whose
    # rendering was recorded as failed are due again. Nothing else is re-rendered by an upgrade.
    op.execute("UPDATE cases SET report_at = processed_at WHERE status = 'done' AND processed_at IS NOT NULL "
               "AND (error IS NULL OR error NOT LIKE 'report rendering failed%')")


def downgrade() -> None:
    with op.batch_alter_table("cases", schema=None) as batch_op:
        for name in ("report_next_at", "report_attempts", "report_error", "report_at", "report_path"):
            batch_op.drop_column(name)
