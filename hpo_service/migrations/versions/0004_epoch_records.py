"""Per-epoch diagnostics of each trial (issue 14): one compact JSON record per epoch.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "hpo_epoch_records",
        sa.Column("trial_id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("epoch", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("record", sa.JSON(), nullable=False),
    )
    op.create_index("ix_hpo_epoch_records_study_id", "hpo_epoch_records", ["study_id"])


def downgrade() -> None:
    op.drop_index("ix_hpo_epoch_records_study_id", "hpo_epoch_records")
    op.drop_table("hpo_epoch_records")
