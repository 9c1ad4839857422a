"""Baseline: the schema of the first release with Alembic.

images (with the identity columns and claimed_by), events (with exam_id), outcomes,
outcome_changes, workers, exams, exam_results, breast_results. A new database gets it from
the models (create_all) and is stamped here; a database made before Alembic is brought to it by
the pre-Alembic step (worker/records/store.py `Store._upgrade`: missing tables, missing nullable
columns) and then stamped. So this revision itself changes nothing; later ones will.
"""

revision = "0001"
down_revision = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
