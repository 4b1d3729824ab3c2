"""Recurring sweeps: schedules and their firings.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "hpo_schedules",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(80), nullable=False),
        sa.Column("cron", sa.String(100), nullable=False),
        sa.Column("timezone", sa.String(64), nullable=False),
        sa.Column("template", sa.JSON(), nullable=False),
        sa.Column("warm_start_top_k", sa.Integer(), nullable=False),
        sa.Column("seed_policy", sa.String(20), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("catchup_grace_s", sa.Float(), nullable=True),
        sa.Column("regression_threshold", sa.Float(), nullable=False),
        sa.Column("active_since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_hpo_schedules_name", "hpo_schedules", ["name"], unique=True)
    op.create_table(
        "hpo_firings",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "schedule_id",
            sa.Integer(),
            sa.ForeignKey("hpo_schedules.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("fire_key", sa.String(120), nullable=False),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("scheduled_for", sa.DateTime(timezone=True), nullable=False),
        sa.Column("local_time", sa.String(32), nullable=False),
        sa.Column("study_name", sa.String(200), nullable=True),
        sa.Column("seed", sa.Integer(), nullable=True),
        sa.Column("warm_started", sa.Integer(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        # Exactly once: the INSERT of a fire time's row wins or loses on this constraint.
        sa.UniqueConstraint("schedule_id", "fire_key", name="uq_hpo_firings_schedule_key"),
    )
    op.create_index("ix_hpo_firings_schedule_time", "hpo_firings", ["schedule_id", "scheduled_for"])


def downgrade() -> None:
    op.drop_table("hpo_firings")
    op.drop_table("hpo_schedules")
