"""A lease's last sign of life, by the database clock, in the lease row itself.

The reaper finds every expired lease with one query on ``hpo_leases`` instead of reading Optuna's
heartbeat table study by study (which SQLite stores to the whole second). Leases still open at
the upgrade start their clock now.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("hpo_leases", sa.Column("beat_at_s", sa.Float(), nullable=True))
    op.create_index("ix_hpo_leases_outcome_beat", "hpo_leases", ["outcome", "beat_at_s"])
    if op.get_bind().dialect.name == "postgresql":
        now = "EXTRACT(EPOCH FROM clock_timestamp())"
    else:
        now = "(julianday('now') - 2440587.5) * 86400.0"
    op.execute(f"UPDATE hpo_leases SET beat_at_s = {now} WHERE outcome IS NULL")


def downgrade() -> None:
    op.drop_index("ix_hpo_leases_outcome_beat", "hpo_leases")
    op.drop_column("hpo_leases", "beat_at_s")
