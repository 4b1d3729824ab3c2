"""Alembic environment for the service's own tables, with its own version table.

Optuna stamps its schema in ``alembic_version``; ours lives in ``hpo_alembic_version`` so the two
migration histories never meet.
"""

from __future__ import annotations

from alembic import context

from hpo_service.db import VERSION_TABLE
from hpo_service.models import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    version_table=VERSION_TABLE,
    include_name=lambda name, type_, parent: type_ != "table" or (name or "").startswith("hpo_"),
)
with context.begin_transaction():
    context.run_migrations()
