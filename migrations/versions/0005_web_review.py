"""web review: users, sign-offs, review state, cell roles, "not a chromosome", review events

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 23:40:00

The review workstation (`chromobatch serve`) needs local accounts (password hashes only), a case's review
state (unreviewed / in review / signed) and the karyotypes a reviewer typed for the case and its cells, each
cell's role (counted only / analysed), objects marked "not a chromosome", and an append-only record of
every such decision (review_events) and of every sign-off and reopening (signoffs). Label changes keep
going to the labels table (rows that supersede, never overwrite).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("password_hash", sa.Text(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False, server_default=sa.true()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("password_changed_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "signoffs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("case_pk", sa.Integer(), sa.ForeignKey("cases.id", ondelete="CASCADE"), nullable=False,
                  index=True),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("user_name", sa.String(128), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("karyotype", sa.Text(), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
    )
    op.create_table(
        "review_events",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("case_pk", sa.Integer(), sa.ForeignKey("cases.id", ondelete="CASCADE"), nullable=False,
                  index=True),
        sa.Column("cell_id", sa.Integer(), sa.ForeignKey("cells.id", ondelete="CASCADE"), nullable=True),
        sa.Column("chromosome_id", sa.Integer(), sa.ForeignKey("chromosomes.id", ondelete="CASCADE"),
                  nullable=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("value", sa.Text(), nullable=True),
        sa.Column("previous", sa.Text(), nullable=True),
        sa.Column("user_name", sa.String(128), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    )
    with op.batch_alter_table("cases", schema=None) as batch_op:
        batch_op.add_column(sa.Column("review_state", sa.String(16), nullable=False, server_default="unreviewed"))
        batch_op.add_column(sa.Column("reviewed_karyotype", sa.Text(), nullable=True))
        batch_op.create_index("ix_cases_review_state", ["review_state"])
    with op.batch_alter_table("cells", schema=None) as batch_op:
        batch_op.add_column(sa.Column("role", sa.String(16), nullable=True))
        batch_op.add_column(sa.Column("reviewed_karyotype", sa.Text(), nullable=True))
    with op.batch_alter_table("chromosomes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("not_chromosome", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("chromosomes", schema=None) as batch_op:
        batch_op.drop_column("not_chromosome")
    with op.batch_alter_table("cells", schema=None) as batch_op:
        batch_op.drop_column("reviewed_karyotype")
        batch_op.drop_column("role")
    with op.batch_alter_table("cases", schema=None) as batch_op:
        batch_op.drop_index("ix_cases_review_state")
        batch_op.drop_column("reviewed_karyotype")
        batch_op.drop_column("review_state")
    op.drop_table("review_events")
    op.drop_table("signoffs")
    op.drop_table("users")
