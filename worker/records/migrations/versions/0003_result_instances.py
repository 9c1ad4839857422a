"""The delivery queue of DICOM results sent to a PACS (worker/records/pacs_queue.py)."""

import sqlalchemy as sa
from alembic import op

from worker.records.migrations.tables import create_table_if_missing

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    create_table_if_missing(
        "result_instances",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("exam_result_id", sa.Integer(), sa.ForeignKey("exam_results.id"),
                  nullable=False),
        sa.Column("image_id", sa.Integer(), sa.ForeignKey("images.id"), nullable=True),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("series_uid", sa.String(64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("supersedes_uid", sa.String(64), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("path", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("built_at", sa.DateTime(), nullable=True),
        sa.Column("sent_at", sa.DateTime(), nullable=True),
        sa.Column("sent_to", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=False),
        sa.Column("claimed_until", sa.DateTime(), nullable=True),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("first_failed_at", sa.DateTime(), nullable=True),
        indexes={"ix_result_instances_exam_result_id": ["exam_result_id"],
                 "ix_result_instances_state": ["state"]},
    )


def downgrade() -> None:
    op.drop_table("result_instances")
