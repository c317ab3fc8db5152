"""cases.karyotype as text: mosaic karyotypes of many cells exceed 256 characters

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 04:06:05.151815
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("cases", schema=None) as batch_op:
        batch_op.alter_column("karyotype", existing_type=sa.String(length=256), type_=sa.Text(),
                              existing_nullable=True)


def downgrade() -> None:
    with op.batch_alter_table("cases", schema=None) as batch_op:
        batch_op.alter_column("karyotype", existing_type=sa.Text(), type_=sa.String(length=256),
                              existing_nullable=True)
