"""Study control state and trial leases.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "hpo_studies",
        sa.Column("study_id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("n_trials", sa.Integer(), nullable=False),
        sa.Column("max_concurrent", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
        sa.Column("last_leased_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_hpo_studies_name", "hpo_studies", ["name"], unique=True)
    op.create_index("ix_hpo_studies_state", "hpo_studies", ["state"])
    op.create_table(
        "hpo_leases",
        sa.Column("trial_id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("trial_number", sa.Integer(), nullable=False),
        sa.Column("token", sa.String(64), nullable=False),
        sa.Column("worker_id", sa.String(200), nullable=False),
        sa.Column("leased_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
        sa.Column("outcome", sa.String(20), nullable=True),
        sa.Column("fingerprint", sa.String(64), nullable=True),
        sa.Column("answer", sa.JSON(), nullable=True),
    )
    op.create_index("ix_hpo_leases_study_id", "hpo_leases", ["study_id"])
    op.create_index("ix_hpo_leases_worker_id", "hpo_leases", ["worker_id"])


def downgrade() -> None:
    op.drop_table("hpo_leases")
    op.drop_table("hpo_studies")
