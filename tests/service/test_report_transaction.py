"""A batched report is written in one transaction (issue 12), yet each trial is refused alone:
a trial that finished behind the service's back is refused, the others of the batch are stored.
"""

from __future__ import annotations

from typing import Any

import optuna
from helpers import spec
from optuna.trial import TrialState
from sqlalchemy import event

from hpo_service.config import Settings
from hpo_service.errors import TrialReaped
from hpo_service.schemas import StudySpec
from hpo_service.studies import EpochReport, StudyService


def test_a_batch_is_one_transaction_and_a_finished_trial_is_refused_alone(
    settings: Settings,
) -> None:
    service = StudyService(settings)
    body = spec(name="tx", budget={"n_trials": 3, "max_concurrent": 3})
    service.create_study(StudySpec.model_validate(body))
    a, b, c = service.lease_many("w", 3)
    # b finishes by Optuna's own hand, which the service's lease table does not see.
    service.storage.set_trial_state_values(b.trial_id, TrialState.FAIL)
    # Transactions that wrote a report's tables (metrics attribute, intermediate values).
    writing: list[int] = []
    dirty = {"now": False}

    def on_statement(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith(("INSERT", "UPDATE")) and (
            "trial_user_attributes" in statement or "trial_intermediate_values" in statement
        ):
            dirty["now"] = True

    def on_commit(connection: Any) -> None:
        if dirty["now"]:
            writing.append(1)
        dirty["now"] = False

    engine = service.storage.engine
    event.listen(engine, "before_cursor_execute", on_statement)
    event.listen(engine, "commit", on_commit)
    try:
        answers = service.report_many(
            [EpochReport(t.trial_id, t.lease_token, 1, 100.0 + i, {"val_kl": 1.0}) for i, t in
             enumerate((a, b, c))]
        )  # fmt: skip
    finally:
        event.remove(engine, "before_cursor_execute", on_statement)
        event.remove(engine, "commit", on_commit)
    assert isinstance(answers[1], TrialReaped)
    assert [answers[0].action, answers[2].action] == ["continue", "continue"]  # type: ignore[union-attr]
    assert len(writing) == 1  # a's and c's metrics and values: one transaction, not four
    study = optuna.load_study(study_name="tx", storage=service.storage)
    by_id = {t._trial_id: t for t in study.trials}
    assert by_id[a.trial_id].intermediate_values == {1: 100.0}
    assert by_id[c.trial_id].intermediate_values == {1: 102.0}
    assert by_id[a.trial_id].user_attrs["metrics"] == {"epoch": 1, "val_kl": 1.0}
    assert by_id[b.trial_id].intermediate_values == {}  # refused: nothing written
    assert "metrics" not in by_id[b.trial_id].user_attrs
    service.storage.engine.dispose()
