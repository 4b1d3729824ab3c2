"""Trials per second of 32 concurrent HTTP workers on PostgreSQL, against the sampler's bound.

Run from the repository root::

    .venv/bin/python benchmarks/service_throughput.py [--samplers random,tpe] [--workers 32] \
        [--trials 300] [--replicas 1]

For each sampler, a fresh PostgreSQL database and ``--replicas`` real ``hpo serve`` processes on
it; one study with a ``--trials`` budget. ``--workers`` threads (each its own HTTP connection,
spread over the replicas) lease and complete trivial trials (``POST /v1/leases`` then
``POST /v1/trials/{id}/complete``, no training, no reports) until the budget is spent. Every
non-2xx answer or transport error counts as an error.

The bound is the same sampler on the same search space in memory (Optuna's ``InMemoryStorage``,
one thread): ``ask()`` + the service's define-by-run ``suggest_*`` calls + ``tell()``, for the
same number of trials from an empty study — what sampling alone costs, with no database and no
network. It is measured right before and right after the service run (the machine is shared;
the mean is used). Goal (from the issue): service ≥ 0.8× the bound with 0 errors. Exits 0
whether or not the goal is met.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import threading
import time
import warnings
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

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

from hpo_service.optimizers import build_sampler
from hpo_service.schemas import StudySpec
from hpo_service.search_space import check_spec, suggest

GOAL = 0.8
STUDY = "throughput"


def make_spec(sampler: str, trials: int, workers: int) -> StudySpec:
    return StudySpec.model_validate(
        {
            "name": STUDY,
            "dataset": "synthetic",
            "epochs": 1,
            "budget": {"n_trials": trials, "max_concurrent": 2 * workers, "max_failed": trials},
            "sampler": {"name": sampler, "seed": 0},
            "pruner": {"name": "none"},
        }
    )


def objective(number: int) -> float:
    """A trivial, deterministic trial value."""
    return random.Random(number).uniform(80.0, 120.0)


def in_memory_bound(spec: StudySpec) -> float:
    """Trials/s of the sampler alone: ask + the service's suggests + tell, in memory."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(sampler=build_sampler(spec.sampler))
    space = check_spec(spec)
    started = time.perf_counter()
    for _ in range(spec.budget.n_trials):
        trial = study.ask()
        suggest(trial, spec, space)
        study.tell(trial, objective(trial.number))
    return spec.budget.n_trials / (time.perf_counter() - started)


def run_workers(urls: list[str], workers: int, budget: int) -> tuple[float, int, Counter[str]]:
    """(trials/s, trials completed, errors by kind) of ``workers`` threads on ``urls``."""
    completed: list[int] = []
    errors: Counter[str] = Counter()
    lock = threading.Lock()
    start = threading.Barrier(workers + 1)

    def worker(index: int) -> None:
        with httpx.Client(
            base_url=urls[index % len(urls)],
            headers={"Authorization": f"Bearer {WORKER_TOKEN}"},
            timeout=120,
        ) as http:
            start.wait()
            while True:
                with lock:
                    if len(completed) >= budget:
                        return
                try:
                    leased = http.post("/v1/leases", json={"worker_id": f"w{index}"})
                    if leased.status_code == 204:  # budget spent (all leased) or a race
                        with lock:
                            if len(completed) >= budget or errors:
                                return
                        time.sleep(0.01)
                        continue
                    if leased.status_code != 200:
                        with lock:
                            errors[f"lease {leased.status_code}"] += 1
                        continue
                    lease = leased.json()
                    done = http.post(
                        f"/v1/trials/{lease['trial_id']}/complete",
                        json={
                            "lease_token": lease["lease_token"],
                            "values": [objective(lease["trial_number"])],
                        },
                    )
                    with lock:
                        if done.status_code == 200:
                            completed.append(lease["trial_id"])
                        else:
                            errors[f"complete {done.status_code}"] += 1
                except httpx.HTTPError as error:
                    with lock:
                        errors[type(error).__name__] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    start.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    duplicates = len(completed) - len(set(completed))
    if duplicates:
        errors["trial completed twice"] += duplicates
    return len(completed) / elapsed, len(completed), errors


def measure(sampler: str, args: argparse.Namespace) -> dict[str, object]:
    spec = make_spec(sampler, args.trials, args.workers)
    bound_before = in_memory_bound(spec)
    with database("postgresql") as url, ExitStack() as stack:
        urls = [stack.enter_context(hpo_serve(url)) for _ in range(args.replicas)]
        with http_client(urls[0], ADMIN_TOKEN) as admin:
            admin.post("/v1/studies", json=spec.model_dump(mode="json")).raise_for_status()
        rate, done, errors = run_workers(urls, args.workers, args.trials)
        trials = optuna.load_study(study_name=STUDY, storage=url).trials
        states = Counter(t.state.name for t in trials)
    bound_after = in_memory_bound(spec)
    if states != {"COMPLETE": args.trials}:
        errors[f"study ended with {dict(states)}"] += 1
    bound = statistics.mean([bound_before, bound_after])
    return {
        "sampler": sampler,
        "rate": rate,
        "done": done,
        "errors": errors,
        "bound": bound,
        "bounds": (bound_before, bound_after),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samplers", default="random,tpe")
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--trials", type=int, default=300, help="the study's budget")
    parser.add_argument("--replicas", type=int, default=1, help="`hpo serve` processes")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    print(machine_header("service_throughput: concurrent HTTP workers vs the in-memory sampler"))
    print(
        f"setup:    PostgreSQL, {args.replicas} `hpo serve` process(es) (uvicorn, log level "
        f"warning), {args.workers} worker threads, {args.trials} trials per study (lease + "
        "complete, no reports); bound: same sampler and space, in memory, one thread"
    )
    rows = []
    for sampler in args.samplers.split(","):
        print(f"  {sampler}: measuring…", flush=True)
        rows.append(measure(sampler, args))

    print()
    header = (
        f"{'sampler':<8}{'service trials/s':>17}{'bound trials/s':>16}  {'(before, after)':<17}"
        f"{'ratio':>7}{'errors':>8}"
    )
    print(header)
    print("-" * len(header))
    verdicts = []
    for row in rows:
        before, after = row["bounds"]  # type: ignore[misc]
        ratio = row["rate"] / row["bound"]  # type: ignore[operator]
        errors: Counter[str] = row["errors"]  # type: ignore[assignment]
        n_errors = sum(errors.values())
        print(
            f"{row['sampler']:<8}{row['rate']:>17.1f}{row['bound']:>16.1f}  "
            f"{f'({before:.0f}, {after:.0f})':<17}{ratio:>6.2f}×{n_errors:>8}"
        )
        if errors:
            print(f"{'':<8}errors: {dict(errors)}")
        verdicts.append(f"{row['sampler']} {ratio:.2f}× with {n_errors} errors")
    met = all(
        r["rate"] / r["bound"] >= GOAL and not r["errors"]  # type: ignore[operator]
        for r in rows
    )
    print(f"\nload avg: {load_average()} (at the end)")
    print(
        f"ratio service/bound: {', '.join(verdicts)} "
        f"(goal ≥ {GOAL}× and 0 errors: {'met' if met else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
