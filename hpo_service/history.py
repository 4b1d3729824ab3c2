"""Every epoch's diagnostics of a trial, kept compactly in the service's own table.

Optuna's ``metrics`` user attribute holds only the latest epoch (and ``complete`` replaces it
with the final scalars), so nobody could look back at how a trial went. Each report's metrics
are also kept here as one JSON record per (trial, epoch) in ``hpo_epoch_records``:

* **compact**: numbers rounded to ``SIGNIFICANT_DIGITS`` significant digits (losses in nats
  need no more; a float32 holds about 7);
* **bounded**: a record is at most ``MAX_RECORD_BYTES`` of JSON. A bigger one sheds its largest
  lists first, then other names, never the diagnostics the plot draws before anything else,
  and lists what it shed under ``"_dropped"``; a trial keeps at most ``MAX_HISTORY_EPOCHS``
  records (epochs beyond are not stored). So one trial holds at most 80 MiB of history, and a
  typical one (30 scalars and a 32-dim ``kl_per_dim``, about 1 KiB a record) ~1 KiB per epoch;
* **once per epoch**: a repeated report of an epoch keeps the first record (``ON CONFLICT DO
  NOTHING``), as Optuna keeps the first intermediate value.

All of a request's records are written in one statement (``record_many``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, literal, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from hpo_service.db import Database
from hpo_service.models import EpochRecordRow

#: Largest JSON record kept per epoch, in bytes (UTF-8, compact separators).
MAX_RECORD_BYTES = 8192
#: Most epochs kept per trial; reports of later epochs are not stored.
MAX_HISTORY_EPOCHS = 10_000
SIGNIFICANT_DIGITS = 6
#: What the diagnostics plot draws (``hpo_service.diagnostics_plot``): shed last.
DIAGNOSTIC_KEYS = (
    "train_neg_elbo",
    "val_neg_elbo",
    "train_recon",
    "val_recon",
    "train_kl",
    "val_kl",
    "kl_per_dim",
    "active_units",
    "posterior_collapse",
    "beta",
    "lr",
    "grad_norm_mean",
    "grad_norm_max",
    "clip_fraction",
)
DROPPED_KEY = "_dropped"


def _round(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            return None  # JSON has no NaN; the wire already sends null for these
        return float(f"{value:.{SIGNIFICANT_DIGITS}g}")
    if isinstance(value, list):
        return [_round(item) for item in value]
    return value


def _json_len(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":")).encode())


def compact_record(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics`` as the record kept for one epoch: rounded, and at most ``MAX_RECORD_BYTES``.

    Over the bound, names are shed in this order until it fits: list-valued metrics that the
    plot does not draw (largest first), other metrics the plot does not draw (last name first),
    then the plot's own (``kl_per_dim`` first). The shed names are listed under ``_dropped``
    (or counted, when even their names do not fit).
    """
    record = {key: _round(value) for key, value in metrics.items() if key != DROPPED_KEY}
    # The size of the JSON object, kept up to date as entries go: `{` + entries + commas + `}`,
    # each entry `"key":value` measured once (re-serialising per drop is quadratic).
    entry = {key: _json_len(key) + 1 + _json_len(value) for key, value in record.items()}
    size = 2 + sum(entry.values()) + max(0, len(entry) - 1)
    if size <= MAX_RECORD_BYTES:
        return record
    others = [k for k in record if k not in DIAGNOSTIC_KEYS]
    lists = sorted((k for k in others if isinstance(record[k], list)), key=lambda k: -entry[k])
    scalars = sorted((k for k in others if k not in lists), reverse=True)
    ours = sorted((k for k in DIAGNOSTIC_KEYS if k in record), key=lambda k: k != "kl_per_dim")
    dropped: list[str] = []
    names = 2  # the JSON list of shed names: `[` + names + commas + `]`
    note = _json_len(DROPPED_KEY) + 1  # `"_dropped":`
    for key in [*lists, *scalars, *ours]:
        del record[key]
        size -= entry[key] + (1 if record else 0)
        dropped.append(key)
        names += _json_len(key) + (1 if len(dropped) > 1 else 0)
        if size + (1 if record else 0) + note + names <= MAX_RECORD_BYTES:
            return {**record, DROPPED_KEY: dropped}
    # Only names too many and too long to list are left: say how many were shed.
    return {DROPPED_KEY: len(dropped)}


@dataclass(frozen=True)
class EpochRecord:
    """One report's metrics to keep: which trial, which epoch, what it said."""

    study_id: int
    trial_id: int
    epoch: int
    metrics: Mapping[str, Any]


class EpochHistory:
    """Reads and writes ``hpo_epoch_records`` (the table is created by migration 0004)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        dialect = db.engine.dialect.name
        self._insert = postgresql.insert if dialect == "postgresql" else sqlite.insert

    def record_many(self, records: Sequence[EpochRecord]) -> None:
        """Keep each record (one statement for all); an epoch already kept is left as it is,
        and epochs beyond ``MAX_HISTORY_EPOCHS`` are not stored."""
        rows = [
            {
                "trial_id": r.trial_id,
                "epoch": r.epoch,
                "study_id": r.study_id,
                "record": compact_record(r.metrics),
            }
            for r in records
            if r.epoch <= MAX_HISTORY_EPOCHS
        ]
        if not rows:
            return
        statement = self._insert(EpochRecordRow).values(rows).on_conflict_do_nothing()
        with self.db.session() as session:
            session.execute(statement)

    def copy_epochs(self, source_id: int, trial_id: int, study_id: int, up_to: int) -> int:
        """Copy ``source_id``'s records of epochs 1..``up_to`` onto ``trial_id`` (a retry
        resumed from its checkpoint of ``up_to``), in one ``INSERT … SELECT``: the retry's
        history reads as one run. Epochs it already holds are left as they are. Returns how
        many records ``source_id`` had in that range."""
        rows = (
            select(
                literal(trial_id),
                EpochRecordRow.epoch,
                literal(study_id),
                EpochRecordRow.record,
            )
            .where(EpochRecordRow.trial_id == source_id)
            .where(EpochRecordRow.epoch <= up_to)
        )
        statement = (
            self._insert(EpochRecordRow)
            .from_select(["trial_id", "epoch", "study_id", "record"], rows)
            .on_conflict_do_nothing()
        )
        with self.db.session() as session:
            session.execute(statement)
            count = session.scalar(
                select(func.count())
                .select_from(EpochRecordRow)
                .where(EpochRecordRow.trial_id == source_id, EpochRecordRow.epoch <= up_to)
            )
        return int(count or 0)

    def records(self, trial_id: int) -> list[dict[str, Any]]:
        """The trial's records, oldest epoch first, each with its ``epoch``."""
        with self.db.session() as session:
            rows = session.execute(
                select(EpochRecordRow.epoch, EpochRecordRow.record)
                .where(EpochRecordRow.trial_id == trial_id)
                .order_by(EpochRecordRow.epoch)
            ).all()
        return [{**record, "epoch": epoch} for epoch, record in rows]

    def latest_epoch(self, trial_id: int) -> int | None:
        with self.db.session() as session:
            return session.scalar(
                select(EpochRecordRow.epoch)
                .where(EpochRecordRow.trial_id == trial_id)
                .order_by(EpochRecordRow.epoch.desc())
                .limit(1)
            )

    @staticmethod
    def delete_study(session: Session, study_id: int) -> None:
        """Drop a deleted study's records, in the caller's transaction."""
        session.execute(delete(EpochRecordRow).where(EpochRecordRow.study_id == study_id))
