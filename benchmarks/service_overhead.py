"""Per-trial cost of the service path against raw Optuna on the same database.

Run from the repository root::

    .venv/bin/python benchmarks/service_overhead.py [--backends sqlite,postgresql] \
        [--sizes 100,1000] [--trials 10] [--reports 10] [--sampler random]

For each backend (a SQLite file, a fresh PostgreSQL database) a real ``hpo serve`` process runs
on the database and one study is created through its REST API, then filled with completed
trials (each with ``--reports`` intermediate values) up to each ``--sizes`` entry. On that one
study, one trial at a time, alternating which side goes first:

* **service**: ``POST /v1/leases`` + ``--reports`` × ``POST /v1/trials/{id}/report`` (each a
  pruning decision) + ``POST /v1/trials/{id}/complete``, through ``hpo_service.client`` with
  trivial "training" (the reported values never lead to pruning);
* **raw Optuna**: in this process, a study loaded once with the same sampler and pruner:
  ``ask()`` + the same define-by-run ``suggest_*`` calls the service makes + ``--reports`` ×
  (``report()`` + ``should_prune()``) + ``tell()``.

Both sides see the same history, so the sampler and pruner do the same work. The first round of
each size is a warm-up and is not counted. The table gives the median per-trial wall time (and
the min–max) of each side, where it goes, and the ratio service/raw. Goal (from the issue):
the service path costs ≤ 0.2× raw Optuna per trial. Exits 0 whether or not the goal is met.

A third row, "HTTP floor", times the same number of requests to ``GET /healthz`` (no database
work, no auth) on the same server: the least any HTTP service path can cost here.
"""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _service_common import (
    ADMIN_TOKEN,
    WORKER_TOKEN,
    database,
    hpo_serve,
    http_client,
    load_average,
    machine_header,
)

from hpo_service.client import HPOClient
from hpo_service.optimizers import build_pruner, build_sampler
from hpo_service.schemas import StudySpec
from hpo_service.search_space import check_spec, suggest

GOAL = 0.2
STUDY = "overhead"
#: What a worker reports each epoch besides the objective (the shape of trainers' metrics).
METRICS = {
    "train_neg_elbo": 101.5,
    "val_recon": 80.25,
    "val_kl": 21.0,
    "beta": 0.5,
    "lr": 1e-3,
    "active_units": 12,
    "grad_norm": 3.5,
    "samples_per_sec": 12000.0,
}


@dataclass
class Side:
    """Per-trial wall times (s) of one side, with the phases that make them up."""

    total: list[float] = field(default_factory=list)
    start: list[float] = field(default_factory=list)  # lease / ask + suggests
    reports: list[float] = field(default_factory=list)  # all reports of the trial
    finish: list[float] = field(default_factory=list)  # complete / tell

    def add(self, start: float, reports: float, finish: float) -> None:
        self.start.append(start)
        self.reports.append(reports)
        self.finish.append(finish)
        self.total.append(start + reports + finish)


def make_spec(args: argparse.Namespace) -> StudySpec:
    return StudySpec.model_validate(
        {
            "name": STUDY,
            "dataset": "synthetic",
            "epochs": args.reports,
            "budget": {"n_trials": 100_000, "max_concurrent": 8},
            "sampler": {"name": args.sampler, "seed": 0},
            # Every step is a real pruning decision (no warm-up steps), on both sides.
            "pruner": {"name": "median", "n_startup_trials": 5, "n_warmup_steps": 0},
        }
    )


def history(spec: StudySpec, count: int, seed: int) -> list[optuna.trial.FrozenTrial]:
    """``count`` completed trials over the study's own space, each with a value per epoch.

    Their values lie in [1, 3]; the measured trials report 0.5, so they are never pruned.
    """
    space = check_spec(spec)
    scratch = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    trials = []
    for index in range(count):
        trial = scratch.ask()
        suggest(trial, spec, space)
        level = 1.0 + (index * 7919 % 1000) / 1000
        trials.append(
            optuna.trial.create_trial(
                params=trial.params,
                distributions=trial.distributions,
                value=level,
                intermediate_values={step: level + 1.0 / (step + 1) for step in range(spec.epochs)},
            )
        )
    return trials


def raw_trial(study: optuna.Study, spec: StudySpec, space: Any, side: Side) -> None:
    t0 = time.perf_counter()
    trial = study.ask()
    suggest(trial, spec, space)
    t1 = time.perf_counter()
    for step in range(spec.epochs):
        trial.report(0.5, step)
        if trial.should_prune():
            raise AssertionError("raw Optuna pruned a trial that reports the best values")
    t2 = time.perf_counter()
    study.tell(trial, 0.5)
    side.add(t1 - t0, t2 - t1, time.perf_counter() - t2)


def service_trial(client: HPOClient, spec: StudySpec, side: Side) -> None:
    t0 = time.perf_counter()
    lease = client.lease("bench-worker", wait_s=0)
    if lease is None:
        raise AssertionError("the service had no trial to lease")
    t1 = time.perf_counter()
    for epoch in range(spec.epochs):
        answer = client.report(lease.trial_id, lease.lease_token, epoch, 0.5, METRICS)
        if answer.action != "continue":
            raise AssertionError(f"the service said {answer.action}: {answer.reason}")
    t2 = time.perf_counter()
    client.complete(lease.trial_id, lease.lease_token, [0.5], METRICS)
    side.add(t1 - t0, t2 - t1, time.perf_counter() - t2)


def http_floor(http: httpx.Client, spec: StudySpec, side: Side) -> None:
    """The same number of HTTP round trips to ``GET /healthz`` (no database, no auth): the
    least the service path can cost however little it does per request."""
    times = []
    for _ in range(spec.epochs + 2):
        t0 = time.perf_counter()
        http.get("/healthz").raise_for_status()
        times.append(time.perf_counter() - t0)
    side.add(times[0], sum(times[1:-1]), times[-1])


def ms(values: list[float]) -> str:
    return f"{1000 * statistics.median(values):8.1f}"


def spread(values: list[float]) -> str:
    return f"{1000 * min(values):.0f}–{1000 * max(values):.0f}"


def measure_backend(
    backend: str, args: argparse.Namespace
) -> list[tuple[str, int, Side, Side, Side]]:
    spec = make_spec(args)
    space = check_spec(spec)
    rows = []
    with database(backend) as url, hpo_serve(url, run_reaper="true") as server:
        with http_client(server, ADMIN_TOKEN) as admin:
            HPOClient(admin).create_study(spec)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            raw = optuna.load_study(
                study_name=STUDY,
                storage=url,
                sampler=build_sampler(spec.sampler),
                pruner=build_pruner(spec.pruner, spec.epochs),
            )
        if backend == "sqlite":
            # The server puts the file in WAL mode, which is stored in the file itself: raw
            # Optuna's connections to it use WAL too (with SQLite's default synchronous=FULL).
            with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as db:
                (mode,) = db.execute("PRAGMA journal_mode").fetchone()
            print(f"  sqlite: journal mode {mode} for both sides", flush=True)
        trials = history(spec, max(args.sizes), seed=1)
        filled = 0
        with http_client(server, WORKER_TOKEN) as http:
            client = HPOClient(http)
            for size in sorted(args.sizes):
                started = time.perf_counter()
                # Filling through Optuna directly: the history is the same for both sides.
                needed = max(0, size - len(raw.get_trials(deepcopy=False)))
                raw.add_trials(trials[filled : filled + needed])
                filled += needed
                print(
                    f"  {backend}: {len(raw.trials)} trials in the study "
                    f"(filled in {time.perf_counter() - started:.0f} s); measuring…",
                    flush=True,
                )
                service, direct, floor = Side(), Side(), Side()
                for round_ in range(args.trials + 1):  # round 0 is a warm-up
                    s, d, f = (Side(), Side(), Side()) if round_ == 0 else (service, direct, floor)
                    if round_ % 2:
                        service_trial(client, spec, s)
                        raw_trial(raw, spec, space, d)
                    else:
                        raw_trial(raw, spec, space, d)
                        service_trial(client, spec, s)
                    http_floor(http, spec, f)
                rows.append((backend, size, service, direct, floor))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--sizes", default="100,1000", help="trials in the study, comma-separated")
    parser.add_argument("--trials", type=int, default=10, help="measured trials per side and size")
    parser.add_argument("--reports", type=int, default=10, help="reports (epochs) per trial")
    parser.add_argument("--sampler", default="random", help="study sampler (random, tpe, …)")
    args = parser.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    print(machine_header("service_overhead: per-trial cost, service path vs raw Optuna"))
    print(
        f"setup:    sampler={args.sampler} pruner=median(n_startup_trials=5, n_warmup_steps=0), "
        f"{args.reports} reports per trial, {args.trials} measured trials per side and size "
        "(+1 warm-up), sides alternate; one `hpo serve` process (uvicorn, log level warning)"
    )
    rows = []
    for backend in args.backends.split(","):
        rows.extend(measure_backend(backend, args))

    print()
    header = (
        f"{'backend':<11}{'trials':>7}  {'path':<11}{'ms/trial':>9}  {'min–max':<11}"
        f"{'lease|ask':>10}{'reports':>9}{'complete|tell':>14}"
    )
    print(header)
    print("-" * len(header))
    ratios = []
    for backend, size, service, direct, floor in rows:
        for name, side in (("raw Optuna", direct), ("service", service), ("HTTP floor", floor)):
            print(
                f"{backend:<11}{size:>7}  {name:<11}{ms(side.total):>9}  {spread(side.total):<11}"
                f"{ms(side.start):>10}{ms(side.reports):>9}{ms(side.finish):>14}"
            )
        ratio = statistics.median(service.total) / statistics.median(direct.total)
        least = statistics.median(floor.total) / statistics.median(direct.total)
        ratios.append((backend, size, ratio))
        print(f"{'':<20}ratio service/raw: {ratio:.2f}×   (HTTP floor/raw: {least:.2f}×)")
    print(f"\nload avg: {load_average()} (at the end)")
    worst = max(r for _, _, r in ratios)
    verdict = "met" if worst <= GOAL else "NOT met"
    summary = ", ".join(f"{b} {s}: {r:.2f}×" for b, s, r in ratios)
    print(f"ratio service/raw per trial: {summary} (goal ≤ {GOAL}×: {verdict})")


if __name__ == "__main__":
    main()
