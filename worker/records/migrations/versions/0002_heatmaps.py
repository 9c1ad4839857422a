"""Heatmaps: one small attention map per scored image (table `heatmaps`)."""

import sqlalchemy as sa
from alembic import op

from worker.records.migrations.tables import create_table_if_missing

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    create_table_if_missing(
        "heatmaps",
        sa.Column("image_id", sa.Integer(), sa.ForeignKey("images.id"), nullable=False),
        sa.Column("model_version", sa.String(length=128), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("cols", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("image_id"),
    )


def downgrade() -> None:
    op.drop_table("heatmaps")
