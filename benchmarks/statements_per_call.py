"""SQL statements (and transactions) the service runs per lease, report, heartbeat and completion.

Run from the repository root::

    .venv/bin/python benchmarks/statements_per_call.py [--backends sqlite,postgresql] \
        [--trials 12] [--epochs 6] [--batch 8]

In process (no HTTP): one ``StudyService`` on a fresh database, every statement the storage's
engine sends counted with SQLAlchemy's ``before_cursor_execute`` event and every transaction with
``commit``/``rollback`` events — Optuna's writes and the service's own alike, as they share one
engine. Per backend: a median-pruned random-sampler study; ``--trials`` trials leased one at a
time, each reporting ``--epochs`` epochs and completing (the per-trial routes), then the same
through the batched calls, ``--batch`` trials per call. Figures are statements per call and, for
the batched rows, per trial. The first trial of each phase is a warm-up (the study is loaded, the
caches filled) and not counted. Counts do not depend on the machine's load; exits 0.
"""

from __future__ import annotations

import argparse
import random
import sys
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import optuna
from sqlalchemy import event
from sqlalchemy.engine import Engine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _service_common import database, machine_header

from hpo_service.config import Settings
from hpo_service.schemas import StudySpec
from hpo_service.studies import EpochReport, StudyService, TrialResult

T = TypeVar("T")
STUDY = "statements"


@dataclass
class Counter:
    """Statements and transactions seen on one engine since the last ``take``."""

    statements: int = 0
    transactions: int = 0

    def take(self) -> tuple[int, int]:
        seen = (self.statements, self.transactions)
        self.statements = self.transactions = 0
        return seen


@contextmanager
def counting(engine: Engine) -> Iterator[Counter]:
    counter = Counter()

    def on_statement(*args: Any) -> None:
        counter.statements += 1

    def on_transaction(*args: Any) -> None:
        counter.transactions += 1

    event.listen(engine, "before_cursor_execute", on_statement)
    event.listen(engine, "commit", on_transaction)
    event.listen(engine, "rollback", on_transaction)
    try:
        yield counter
    finally:
        event.remove(engine, "before_cursor_execute", on_statement)
        event.remove(engine, "commit", on_transaction)
        event.remove(engine, "rollback", on_transaction)


@dataclass
class Tally:
    """Per operation: the calls counted, their statements and transactions, the trials served."""

    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    statements: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    transactions: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    trials: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def measure(
        self, counter: Counter, op: str, call: Callable[[], T], trials: int = 1, keep: bool = True
    ) -> T:
        counter.take()
        result = call()
        statements, transactions = counter.take()
        if keep:
            self.calls[op] += 1
            self.statements[op] += statements
            self.transactions[op] += transactions
            self.trials[op] += trials
        return result


def make_spec(trials: int, epochs: int) -> StudySpec:
    return StudySpec.model_validate(
        {
            "name": STUDY,
            "dataset": "synthetic",
            "epochs": epochs,
            "budget": {"n_trials": trials, "max_concurrent": trials, "max_failed": trials},
            "sampler": {"name": "random", "seed": 0},
            # Pruning decided at every report past the first (what costs the snapshot reads).
            "pruner": {
                "name": "median",
                "n_startup_trials": 1,
                "n_warmup_steps": 1,
                "phase_aware": False,
            },
        }
    )


def curve(number: int, epoch: int) -> float:
    level = random.Random(number).uniform(80.0, 120.0)
    return level + 40.0 / (epoch + 1)


def per_trial(
    service: StudyService, counter: Counter, tally: Tally, trials: int, epochs: int
) -> None:
    for i in range(trials):
        keep = i > 0  # the first trial warms the caches up
        lease = tally.measure(counter, "lease", lambda: service.lease("w"), keep=keep)
        assert lease is not None
        tally.measure(
            counter, "heartbeat", lambda x=lease: service.heartbeat(x.trial_id, x.lease_token),
            keep=keep,
        )  # fmt: skip
        pruned = False
        for epoch in range(1, epochs + 1):
            value = curve(lease.trial_number, epoch)
            answer = tally.measure(
                counter,
                "report",
                lambda x=lease, e=epoch, v=value: service.report(
                    x.trial_id, x.lease_token, e, v, {"e": 1}
                ),
                keep=keep,
            )
            if answer.action == "prune":
                pruned = True
                break
        final = curve(lease.trial_number, epochs + 1)
        if pruned:
            tally.measure(
                counter,
                "fail (pruned)",
                lambda x=lease: service.fail(
                    x.trial_id, x.lease_token, "pruned", False, pruned=True
                ),
                keep=keep,
            )
        else:
            tally.measure(
                counter,
                "complete",
                lambda x=lease, f=final: service.complete(
                    x.trial_id, x.lease_token, [f], {"m": 1.0}
                ),
                keep=keep,
            )


def batched(
    service: StudyService, counter: Counter, tally: Tally, rounds: int, batch: int, epochs: int
) -> None:
    for r in range(rounds):
        keep = r > 0
        leases = tally.measure(
            counter, "batch lease", lambda: service.lease_many("b", batch), trials=batch, keep=keep
        )
        live = list(leases)
        for epoch in range(1, epochs + 1):
            reports = [
                EpochReport(x.trial_id, x.lease_token, epoch, curve(x.trial_number, epoch), {})
                for x in live
            ]
            answers = tally.measure(
                counter,
                "batch report",
                lambda r=reports: service.report_many(r),
                len(reports),
                keep,
            )
            live = [
                x
                for x, a in zip(live, answers, strict=True)
                if not isinstance(a, Exception) and a.action == "continue"
            ]
            if not live:
                break
        results = [
            TrialResult(x.trial_id, x.lease_token, [curve(x.trial_number, epochs + 1)], {}, None)
            for x in live
        ]
        if results:
            tally.measure(
                counter,
                "batch complete",
                lambda r=results: service.complete_many(r),
                len(results),
                keep,
            )


def run(backend: str, trials: int, epochs: int, batch: int) -> Tally:
    tally = Tally()
    with database(backend) as url:
        settings = Settings(database_url=url, lease_timeout_s=600)
        service = StudyService(settings)
        engine = service.storage.engine
        rounds = max(2, trials // batch)
        service.create_study(make_spec(trials + rounds * batch, epochs))
        with counting(engine) as counter:
            per_trial(service, counter, tally, trials, epochs)
            batched(service, counter, tally, rounds, batch, epochs)
        engine.dispose()
    return tally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    print(machine_header("statements_per_call: SQL statements per service call"))
    header = (
        f"{'backend':<11}{'call':<16}{'calls':>6}{'stmts/call':>11}{'txns/call':>10}"
        f"{'stmts/trial':>12}"
    )
    print(header)
    print("-" * len(header))
    for backend in args.backends.split(","):
        tally = run(backend, args.trials, args.epochs, args.batch)
        for op in tally.calls:
            calls = tally.calls[op]
            print(
                f"{backend:<11}{op:<16}{calls:>6}{tally.statements[op] / calls:>11.1f}"
                f"{tally.transactions[op] / calls:>10.1f}"
                f"{tally.statements[op] / max(tally.trials[op], 1):>12.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
