"""Site operating points (`screen calibrate`): one row per calibration, kept as history."""

import sqlalchemy as sa
from alembic import op

from worker.records.migrations.tables import create_table_if_missing

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    create_table_if_missing(
        "site_points",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("model_version", sa.String(128), nullable=False),
        sa.Column("level", sa.String(16), nullable=False),
        sa.Column("target", sa.String(16), nullable=False),
        sa.Column("target_value", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("women", sa.Integer(), nullable=False),
        sa.Column("units", sa.Integer(), nullable=False),
        sa.Column("figures", sa.Text(), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        indexes={"ix_site_points_name": ["name"]},
    )


def downgrade() -> None:
    op.drop_index("ix_site_points_name", table_name="site_points")
    op.drop_table("site_points")
