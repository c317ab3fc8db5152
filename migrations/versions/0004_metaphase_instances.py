"""whole metaphase input: the source image of a cell, its count, and each chromosome's place in it

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 23:30:00

A cell that came from a whole metaphase keeps its (normalised) image, the file it came from, the number of
chromosomes counted in it and the segmentation's notes (segmenter, clusters flagged for review). A
chromosome cut from a metaphase keeps its instance number, bounding box and outline polygon in that image,
and flags such as "cluster" (an object that holds about N chromosomes and was kept, not guessed apart).
Crops delivered as crops leave all of these empty.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("cells", schema=None) as batch_op:
        batch_op.add_column(sa.Column("source_file", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("source_sha256", sa.String(64), nullable=True))
        batch_op.add_column(sa.Column("image_png", sa.LargeBinary(), nullable=True))
        batch_op.add_column(sa.Column("count", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("segmentation", sa.JSON(), nullable=True))
    with op.batch_alter_table("chromosomes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("instance", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("box", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("polygon", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("flags", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("chromosomes", schema=None) as batch_op:
        for name in ("flags", "polygon", "box", "instance"):
            batch_op.drop_column(name)
    with op.batch_alter_table("cells", schema=None) as batch_op:
        for name in ("segmentation", "count", "image_png", "source_sha256", "source_file"):
            batch_op.drop_column(name)
