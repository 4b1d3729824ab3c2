"""Where a lease's time goes, in process (issue 12): the study lock's hold, the sampler, the
trial's write and the budget's tally, against in-memory Optuna's ask + suggest on the same trials.

Run from the repository root::

    .venv/bin/python benchmarks/lease_breakdown.py [--backends sqlite,postgresql] \
        [--sampler tpe] [--seed-trials 1000] [--leases 20]

Per backend, on a fresh database: one ``StudyService`` (no HTTP), the study seeded with
``--seed-trials`` finished trials by Optuna directly (``Study.add_trials``), one warm-up lease,
then ``--leases`` leases one after another, each completed at once. ``StudyCore.study_lock`` and
``LeaseProtocol``'s parts are wrapped with ``perf_counter`` (no profiler: cProfile doubles TPE's
time). Baseline in the same process afterwards: in-memory Optuna with the same sampler settings
and trials, timing ``ask`` + the same ``suggest`` calls. Wall times, so they move with the load:
compare within a run; beside them each lease's and each ask's CPU time (this thread's), which
moves much less with other processes. Exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _service_common import database, load_average, machine_header
from service_hot_path import make_spec, seeded_trials

from hpo_service.config import Settings
from hpo_service.optimizers import build_sampler
from hpo_service.search_space import check_spec, suggest
from hpo_service.studies import StudyService, _leasing
from hpo_service.studies._core import StudyCore

PARTS = ("_sample", "_write_leased_trial", "_own_running_trials")


class Timings:
    """Seconds spent per part since the last ``take``."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = defaultdict(float)

    def wrap(self, owner: Any, name: str, key: str) -> None:
        original: Callable[..., Any] = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.spent[key] += time.perf_counter() - started

        setattr(owner, name, timed)

    def take(self) -> dict[str, float]:
        seen = dict(self.spent)
        self.spent.clear()
        return seen


def instrument(timings: Timings) -> None:
    for part in PARTS:
        timings.wrap(_leasing.LeaseProtocol, part, part.strip("_"))
    timings.wrap(_leasing, "tally", "tally")
    original = StudyCore.study_lock

    @contextlib.contextmanager
    def held(self: StudyCore, study_id: int) -> Iterator[Any]:
        with original(self, study_id) as session:
            started = time.perf_counter()
            yield session
        timings.spent["lock held"] += time.perf_counter() - started  # commit included

    StudyCore.study_lock = held  # type: ignore[method-assign]


def run(backend: str, sampler: str, seed: int, leases: int, timings: Timings) -> None:
    spec = make_spec("breakdown", sampler, seed + leases + 10, 4)
    trials = seeded_trials(spec, seed)
    per_lease: list[dict[str, float]] = []
    walls: list[float] = []
    cpus: list[float] = []  # this thread's CPU time per lease: moves less with the load
    with database(backend) as url:
        service = StudyService(Settings(database_url=url, lease_timeout_s=600))
        service.create_study(spec)
        if trials:
            optuna.load_study(study_name=spec.name, storage=service.storage).add_trials(trials)
        for i in range(leases + 1):
            timings.take()
            cpu, started = time.thread_time(), time.perf_counter()
            lease = service.lease("w")
            wall, cpu = time.perf_counter() - started, time.thread_time() - cpu
            spent = timings.take()
            assert lease is not None
            service.complete(lease.trial_id, lease.lease_token, [100.0 + i], {})
            if i:  # the first loads the study
                walls.append(wall)
                cpus.append(cpu)
                per_lease.append(spent)
        service.storage.engine.dispose()
    memory = optuna.create_study(sampler=build_sampler(spec.sampler))
    memory.add_trials(trials)
    space = check_spec(spec)
    asks: list[float] = []
    ask_cpus: list[float] = []
    for _ in range(leases):
        cpu, started = time.thread_time(), time.perf_counter()
        trial = memory.ask()
        suggest(trial, spec, space)
        asks.append(time.perf_counter() - started)
        ask_cpus.append(time.thread_time() - cpu)
        memory.tell(trial, 100.0)
    lease_ms, ask_ms = 1e3 * statistics.median(walls), 1e3 * statistics.median(asks)
    lease_cpu, ask_cpu = 1e3 * statistics.median(cpus), 1e3 * statistics.median(ask_cpus)
    keys = ["lock held", "sample", "write_leased_trial", "tally", "own_running_trials"]
    parts = ", ".join(
        f"{key} {1e3 * statistics.median(p.get(key, 0.0) for p in per_lease):.1f}" for key in keys
    )
    print(
        f"{backend:<11}{sampler} at {seed} finished trials: lease p50 {lease_ms:.1f} ms, in-memory "
        f"ask + suggest p50 {ask_ms:.1f} ms ({lease_ms / ask_ms:.2f}×); CPU p50 {lease_cpu:.1f} "
        f"against {ask_cpu:.1f} ms ({lease_cpu / ask_cpu:.2f}×); per lease p50 ms: {parts}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--sampler", default="tpe")
    parser.add_argument("--seed-trials", type=int, default=1000)
    parser.add_argument("--leases", type=int, default=20)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    print(machine_header("lease_breakdown: where a lease's time goes, in process"))
    timings = Timings()
    instrument(timings)
    for backend in args.backends.split(","):
        run(backend, args.sampler, args.seed_trials, args.leases, timings)
    print(f"\nload avg: {load_average()} (at the end)")


if __name__ == "__main__":
    main()
