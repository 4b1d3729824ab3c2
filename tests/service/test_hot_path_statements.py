"""The hot path's statement counts (issue 12): a batched report costs the same statements
whatever the number of trials in it, first epoch included, and a new trial a few statements,
not Optuna's three per parameter. Counts, not times: they do not depend on the machine's load.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from helpers import spec
from sqlalchemy import event

from hpo_service.config import Settings
from hpo_service.schemas import StudySpec
from hpo_service.studies import EpochReport, StudyService

T = TypeVar("T")


@contextmanager
def counted(service: StudyService) -> Iterator[list[str]]:
    seen: list[str] = []

    def on_statement(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        # A report writes a beat when the last is half an interval old: a matter of time, not
        # of the batch, so not counted.
        if not statement.startswith("UPDATE hpo_leases SET beat_at_s"):
            seen.append(statement)

    engine = service.storage.engine
    event.listen(engine, "before_cursor_execute", on_statement)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", on_statement)


def statements(service: StudyService, call: Callable[[], T]) -> tuple[int, T]:
    with counted(service) as seen:
        result = call()
    return len(seen), result


def test_a_batched_report_costs_the_same_statements_for_2_trials_as_for_8(
    settings: Settings,
) -> None:
    service = StudyService(settings)
    budget = {"n_trials": 10, "max_concurrent": 10}
    service.create_study(StudySpec.model_validate(spec(name="hot", budget=budget)))
    counts: dict[int, list[int]] = {}
    leases = {2: service.lease_many("a", 2), 8: service.lease_many("b", 8)}
    for size, batch in leases.items():
        assert len(batch) == size
        for epoch in (1, 2):  # the first epoch too: a trial leased here is not re-read
            reports = [EpochReport(t.trial_id, t.lease_token, epoch, 100.0, {}) for t in batch]
            n, answers = statements(service, lambda r=reports: service.report_many(r))
            assert all(a.action == "continue" for a in answers)  # type: ignore[union-attr]
            counts.setdefault(size, []).append(n)
    assert counts[2] == counts[8], counts
    service.storage.engine.dispose()


def test_a_new_trial_is_a_few_statements_whatever_its_parameters(settings: Settings) -> None:
    service = StudyService(settings)
    budget = {"n_trials": 10, "max_concurrent": 10}
    service.create_study(StudySpec.model_validate(spec(name="few", budget=budget)))
    service.lease("warm-up")  # loads the study
    n, lease = statements(service, lambda: service.lease("w"))
    assert lease is not None and len(lease.params) >= 8
    # Optuna's create_new_trial alone: three per parameter (38 for 10); ours: 4-5 in all, plus
    # the service's own lease queries and the read of the study's running trials.
    assert n < 2 * len(lease.params), n
    service.storage.engine.dispose()
