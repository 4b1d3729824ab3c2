"""Two figures of the server's hot path (issue 12): batched reports per server CPU-second, and
a TPE lease at thousands of finished trials against in-memory TPE on the same trials.

Run from the repository root::

    .venv/bin/python benchmarks/service_hot_path.py [--backends postgresql,sqlite] \
        [--members 64] [--epochs 10] [--seed-trials 5000] [--leases 10]

Per backend, each on a fresh database and one real ``hpo serve`` process:

- **reports**: one client leases ``--members`` trials in one batched lease, then sends
  ``--epochs`` batched reports of every live member (a population worker's epoch), the median
  pruner deciding on each. Figure: member-epoch reports per second of the *server process's own
  CPU time* over those requests (``/proc``), i.e. per server core, and per wall second.
- **TPE at N trials**: the study is seeded with ``--seed-trials`` finished trials written by
  Optuna directly (``Study.add_trials`` on the same storage, parameters drawn from the service's
  own search space), then ``--leases`` leases are timed one after another, each completed at
  once (the first, which loads the study into the server, is reported apart). Baseline in the
  same run: in-memory Optuna with the same sampler settings, the same trials added, timing
  ``ask`` + the same ``suggest`` calls. Ratio: median service lease / median in-memory ask.
  Beside it, CPU per lease: the server process's own CPU time over the lease requests
  (``/proc``, 10 ms ticks, summed over ``--leases``) against the in-memory loop's
  ``process_time``. Wall times move with other processes on a shared host (the two are
  measured at different moments); CPU times much less, so an A/B of a change reads them.

Exits 0 whatever the figures.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _service_common import (
    ADMIN_TOKEN,
    WORKER_TOKEN,
    database,
    hpo_serve_process,
    http_client,
    load_average,
    machine_header,
    process_cpu_s,
)

from hpo_service.optimizers import build_sampler
from hpo_service.schemas import StudySpec
from hpo_service.search_space import check_spec, suggest

EPOCHS = 10


def make_spec(name: str, sampler: str, trials: int, concurrent: int) -> StudySpec:
    return StudySpec.model_validate(
        {
            "name": name,
            "dataset": "synthetic",
            "epochs": EPOCHS,
            "budget": {"n_trials": trials, "max_concurrent": concurrent, "max_failed": trials},
            "sampler": {"name": sampler, "seed": 0},
            "pruner": {"name": "median", "n_startup_trials": 5, "n_warmup_steps": 2},
        }
    )


def curve(number: int, epoch: int) -> float:
    level = random.Random(number).uniform(80.0, 120.0)
    return level + 40.0 / (epoch + 1)


def reports_per_core(url: str, members: int, epochs: int) -> tuple[float, float, int]:
    """(reports per server CPU-second, reports per wall second, reports sent)."""
    spec = make_spec("reports", "random", members, members)
    with hpo_serve_process(url) as (server, pid):
        with http_client(server, ADMIN_TOKEN) as admin:
            admin.post("/v1/studies", json=spec.model_dump(mode="json")).raise_for_status()
        with http_client(server, WORKER_TOKEN) as worker:
            body = {"worker_id": "pop", "count": members, "wait_s": 1}
            leases = worker.post("/v1/batch/leases", json=body).json()["leases"]
            live = {lease["trial_id"]: lease for lease in leases}
            sent = 0
            cpu_before, started = process_cpu_s(pid), time.perf_counter()
            for epoch in range(1, epochs + 1):
                reports = [
                    {
                        "trial_id": trial_id,
                        "lease_token": lease["lease_token"],
                        "epoch": epoch,
                        "value": curve(lease["trial_number"], epoch),
                        "metrics": {"val_kl": 10.0, "active_units": 12, "beta": 1.0},
                    }
                    for trial_id, lease in live.items()
                ]
                answer = worker.post("/v1/batch/report", json={"reports": reports})
                answer.raise_for_status()
                sent += len(reports)
                for item in answer.json()["items"]:
                    if item["answer"] is None or item["answer"]["action"] != "continue":
                        live.pop(item["trial_id"])
                if not live:
                    break
            wall = time.perf_counter() - started
            cpu = process_cpu_s(pid) - cpu_before
    return sent / max(cpu, 1e-9), sent / wall, sent


def seeded_trials(spec: StudySpec, n: int) -> list[optuna.trial.FrozenTrial]:
    """``n`` finished trials over the service's search space (random parameters, a value)."""
    space = check_spec(spec)
    memory = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(n):
        trial = memory.ask()
        suggest(trial, spec, space)
        memory.tell(trial, curve(trial.number, EPOCHS))
    return memory.trials


def tpe_leases(
    url: str, seed: int, leases: int
) -> tuple[float, list[float], list[float], float, float]:
    """(first lease s, later leases s, in-memory ask + suggest s, server CPU s per later lease,
    in-memory CPU s per ask) at ``seed`` finished trials."""
    spec = make_spec("tpe5k", "tpe", seed + leases + 10, 4)
    trials = seeded_trials(spec, seed)
    with hpo_serve_process(url) as (server, pid):
        with http_client(server, ADMIN_TOKEN) as admin:
            admin.post("/v1/studies", json=spec.model_dump(mode="json")).raise_for_status()
        # Seeded by Optuna directly, on the same storage, behind the server's back (as another
        # Optuna client would); the server has not loaded the study's trials yet.
        stored = optuna.load_study(study_name=spec.name, storage=url)
        stored.add_trials(trials)
        timings: list[float] = []
        server_cpu = 0.0  # over the later leases' requests only, not the completions
        with http_client(server, WORKER_TOKEN) as worker:
            for i in range(leases + 1):
                cpu, started = process_cpu_s(pid), time.perf_counter()
                response = worker.post("/v1/leases", json={"worker_id": "w", "wait_s": 0})
                timings.append(time.perf_counter() - started)
                if i:
                    server_cpu += process_cpu_s(pid) - cpu
                response.raise_for_status()
                lease = response.json()
                final = {"lease_token": lease["lease_token"], "values": [100.0]}
                worker.post(f"/v1/trials/{lease['trial_id']}/complete", json=final)
    memory = optuna.create_study(sampler=build_sampler(spec.sampler))
    memory.add_trials(trials)
    space = check_spec(spec)
    asks: list[float] = []
    memory_cpu = 0.0
    for _ in range(leases):
        cpu, started = time.process_time(), time.perf_counter()
        trial = memory.ask()
        suggest(trial, spec, space)
        asks.append(time.perf_counter() - started)
        memory_cpu += time.process_time() - cpu
        memory.tell(trial, 100.0)
    return timings[0], timings[1:], asks, server_cpu / leases, memory_cpu / leases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="postgresql,sqlite")
    parser.add_argument("--members", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--seed-trials", type=int, default=5000)
    parser.add_argument("--leases", type=int, default=10)
    parser.add_argument("--skip", default="", help="comma-separated: reports,tpe")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    skip = set(args.skip.split(",")) - {""}
    print(machine_header("service_hot_path: batched reports per server core; TPE lease at N"))
    for backend in args.backends.split(","):
        if "reports" not in skip:
            with database(backend) as url:
                per_cpu, per_wall, sent = reports_per_core(url, args.members, args.epochs)
            print(
                f"{backend:<11} reports: {sent} member-epoch reports in batches of up to "
                f"{args.members}: {per_cpu:,.0f} per server CPU-s, {per_wall:,.0f} per wall s "
                f"(goal ≥ 2,000 per server core)",
                flush=True,
            )
        if "tpe" not in skip:
            with database(backend) as url:
                first, later, asks, cpu, memory_cpu = tpe_leases(url, args.seed_trials, args.leases)
            lease_ms, ask_ms = 1e3 * statistics.median(later), 1e3 * statistics.median(asks)
            print(
                f"{backend:<11} TPE at {args.seed_trials} finished trials: lease p50 "
                f"{lease_ms:.0f} ms (max {1e3 * max(later):.0f}; first {1e3 * first:.0f} ms, "
                f"loads the study), in-memory ask + suggest p50 {ask_ms:.0f} ms: "
                f"{lease_ms / ask_ms:.2f}× (goal ≤ 1.2×); CPU per lease: server "
                f"{1e3 * cpu:.0f} ms, in-memory {1e3 * memory_cpu:.0f} ms: "
                f"{cpu / memory_cpu:.2f}×",
                flush=True,
            )
    print(f"\nload avg: {load_average()} (at the end)")


if __name__ == "__main__":
    main()
