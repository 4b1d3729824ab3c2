"""The service against raw Optuna's own distributed mode, on the same database and search space.

Run from the repository root::

    .venv/bin/python benchmarks/service_vs_optuna.py [--backends postgresql,sqlite] \
        [--workers 4,16,32] [--samplers random,tpe] [--trials 60] [--batch 8] [--modes ...]

For each backend, sampler and worker count N, in one run (so a busy machine still gives honest
ratios), each on a fresh database:

- ``raw``: N processes each running ``study.optimize`` on the same study (Optuna's distributed
  mode), the service's VAE search space suggested through the same ``suggest`` calls, 10
  ``report`` + ``should_prune`` steps per trial, until the budget is spent
  (``MaxTrialsCallback``). Its CPU cost: the worker processes' own CPU seconds inside
  ``optimize`` (start-up and imports excluded, as the server's start-up is).
- ``service``: one ``hpo serve`` process; N worker threads each lease, report 10 epochs and
  complete, one trial at a time over HTTP (``/v1/leases``, ``/v1/trials/{id}/…``).
- ``batched``: the same server; N worker threads each lease ``--batch`` trials at once and
  report and complete them together (``/v1/batch/…``), as a population worker does.

Per run: trials/s, CPU seconds per trial (the server process's own CPU time over the trials
finished, from ``/proc``; for raw, the workers'), the ratio of each service mode's per-trial CPU
to raw's, p50/p99 latency of each route as the client saw it, errors (non-2xx, transport) and
orphans (trials left RUNNING or WAITING at the end). Only SQLite runs at N = 4 (one writer
process by design). Exits 0 whatever the figures.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter, defaultdict
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
    hpo_serve_process,
    http_client,
    load_average,
    machine_header,
    process_cpu_s,
)

from hpo_service.optimizers import build_pruner, build_sampler
from hpo_service.schemas import StudySpec
from hpo_service.search_space import check_spec, suggest

STUDY = "versus"
EPOCHS = 10


def make_spec(sampler: str, trials: int, workers: int, batch: int) -> StudySpec:
    return StudySpec.model_validate(
        {
            "name": STUDY,
            "dataset": "synthetic",
            "epochs": EPOCHS,
            "budget": {
                "n_trials": trials,
                "max_concurrent": max(2 * workers, workers * batch),
                "max_failed": trials,
            },
            "sampler": {"name": sampler, "seed": 0},
            "pruner": {"name": "median", "n_startup_trials": 5, "n_warmup_steps": 2},
        }
    )


def curve(number: int, epoch: int) -> float:
    """A trial's deterministic, decreasing learning curve (nats)."""
    level = random.Random(number).uniform(80.0, 120.0)
    return level + 40.0 / (epoch + 1)


@dataclass
class Run:
    mode: str
    rate: float = 0.0
    done: int = 0
    cpu_s: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)
    orphans: int = 0
    latency: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    @property
    def cpu_per_trial(self) -> float:
        return self.cpu_s / self.done if self.done else float("nan")


# --- raw Optuna: N processes running study.optimize -------------------------------------------


def raw_worker(url: str, sampler: str, trials: int) -> None:
    """One raw Optuna worker process (``--raw-worker``)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = make_spec(sampler, trials, 1, 1)
    space = check_spec(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.load_study(
            study_name=STUDY,
            storage=url,
            sampler=build_sampler(spec.sampler),
            pruner=build_pruner(spec.pruner, spec.epochs),
        )

    def objective(trial: optuna.Trial) -> float:
        suggest(trial, spec, space)
        for epoch in range(EPOCHS):
            trial.report(curve(trial.number, epoch), epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return curve(trial.number, EPOCHS)

    # Only the optimisation's CPU time counts (not the interpreter's start-up and imports),
    # as only the server's CPU time during the run counts for the service.
    started = time.process_time()
    study.optimize(
        objective,
        callbacks=[optuna.study.MaxTrialsCallback(trials, states=None)],
        catch=(Exception,),
    )
    print(f"cpu_s={time.process_time() - started}", flush=True)


def run_raw(url: str, sampler: str, workers: int, trials: int) -> Run:
    optuna.create_study(study_name=STUDY, storage=url)
    run = Run("raw")
    command = [sys.executable, __file__, "--raw-worker", url, sampler, str(trials)]
    started = time.perf_counter()
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(workers)
    ]
    for process in processes:
        output, _ = process.communicate()
        if process.returncode != 0:
            run.errors[f"worker exit {process.returncode}"] += 1
        for line in output.splitlines():
            if line.startswith("cpu_s="):
                run.cpu_s += float(line.removeprefix("cpu_s="))
    elapsed = time.perf_counter() - started
    states = Counter(t.state for t in optuna.load_study(study_name=STUDY, storage=url).trials)
    run.done = states[optuna.trial.TrialState.COMPLETE] + states[optuna.trial.TrialState.PRUNED]
    if states[optuna.trial.TrialState.FAIL]:
        run.errors["FAIL"] += states[optuna.trial.TrialState.FAIL]
    run.orphans = states[optuna.trial.TrialState.RUNNING] + states[optuna.trial.TrialState.WAITING]
    run.rate = run.done / elapsed
    return run


# --- the service: per-trial and batched HTTP workers ------------------------------------------


class Timed:
    """An HTTP client that records each route's latency and counts failures."""

    def __init__(self, url: str, run: Run, lock: threading.Lock) -> None:
        self.http = http_client(url, WORKER_TOKEN)
        self.run, self.lock = run, lock

    def post(self, route: str, path: str, body: dict[str, Any]) -> httpx.Response | None:
        started = time.perf_counter()
        try:
            response = self.http.post(path, json=body)
        except httpx.HTTPError as error:
            with self.lock:
                self.run.errors[f"{route} {type(error).__name__}"] += 1
            return None
        with self.lock:
            self.run.latency[route].append(time.perf_counter() - started)
            if response.status_code >= 400:
                self.run.errors[f"{route} {response.status_code}"] += 1
        return response


def per_trial_worker(client: Timed, index: int, stop: threading.Event) -> int:
    done = 0
    while not stop.is_set():
        leased = client.post("lease", "/v1/leases", {"worker_id": f"w{index}", "wait_s": 0.5})
        if leased is None or leased.status_code != 200:
            if leased is not None and leased.status_code == 204:
                stop.set()  # the budget is spent (or every slot taken at the very end)
            continue
        lease = leased.json()
        base = f"/v1/trials/{lease['trial_id']}"
        token = lease["lease_token"]
        for epoch in range(EPOCHS):
            value = curve(lease["trial_number"], epoch)
            body = {"lease_token": token, "epoch": epoch, "value": value}
            answer = client.post("report", f"{base}/report", body)
            if answer is None or answer.status_code != 200:
                break
            if answer.json()["action"] == "prune":
                pruned = {"lease_token": token, "reason": "pruned", "pruned": True}
                if client.post("fail", f"{base}/fail", pruned) is not None:
                    done += 1
                break
        else:
            final = {"lease_token": token, "values": [curve(lease["trial_number"], EPOCHS)]}
            finished = client.post("complete", f"{base}/complete", final)
            if finished is not None and finished.status_code == 200:
                done += 1
    return done


def batched_worker(client: Timed, index: int, stop: threading.Event, batch: int) -> int:
    done = 0
    while not stop.is_set():
        body = {"worker_id": f"pop{index}", "count": batch, "wait_s": 0.5}
        leased = client.post("batch lease", "/v1/batch/leases", body)
        if leased is None or leased.status_code != 200:
            continue
        leases = leased.json()["leases"]
        if not leases:
            stop.set()
            continue
        live = {lease["trial_id"]: lease for lease in leases}
        for epoch in range(EPOCHS):
            reports = [
                {
                    "trial_id": trial_id,
                    "lease_token": lease["lease_token"],
                    "epoch": epoch,
                    "value": curve(lease["trial_number"], epoch),
                }
                for trial_id, lease in live.items()
            ]
            answer = client.post("batch report", "/v1/batch/report", {"reports": reports})
            if answer is None or answer.status_code != 200:
                live = {}
                break
            pruned = []
            for item in answer.json()["items"]:
                if item["error"] is not None or item["answer"]["action"] != "continue":
                    lease = live.pop(item["trial_id"])
                    pruned.append(
                        {
                            "trial_id": item["trial_id"],
                            "lease_token": lease["lease_token"],
                            "reason": "pruned",
                            "pruned": True,
                        }
                    )
            if pruned:
                gave_up = client.post("batch fail", "/v1/batch/fail", {"failures": pruned})
                if gave_up is not None and gave_up.status_code == 200:
                    done += sum(1 for item in gave_up.json()["items"] if item["answer"])
            if not live:
                break
        if live:
            results = [
                {
                    "trial_id": trial_id,
                    "lease_token": lease["lease_token"],
                    "values": [curve(lease["trial_number"], EPOCHS)],
                }
                for trial_id, lease in live.items()
            ]
            finished = client.post("batch complete", "/v1/batch/complete", {"results": results})
            if finished is not None and finished.status_code == 200:
                done += sum(1 for item in finished.json()["items"] if item["answer"])
    return done


def run_service(url: str, spec: StudySpec, mode: str, workers: int, batch: int) -> Run:
    run = Run(mode)
    lock = threading.Lock()
    with hpo_serve_process(url) as (server, pid):
        with http_client(server, ADMIN_TOKEN) as admin:
            admin.post("/v1/studies", json=spec.model_dump(mode="json")).raise_for_status()
        stop = threading.Event()
        counts: list[int] = []
        clients = [Timed(server, run, lock) for _ in range(workers)]

        def work(index: int) -> None:
            if mode == "batched":
                finished = batched_worker(clients[index], index, stop, batch)
            else:
                finished = per_trial_worker(clients[index], index, stop)
            with lock:
                counts.append(finished)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
        cpu_before = process_cpu_s(pid)
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        run.cpu_s = process_cpu_s(pid) - cpu_before
        for client in clients:
            client.http.close()
    states = Counter(t.state for t in optuna.load_study(study_name=STUDY, storage=url).trials)
    run.done = states[optuna.trial.TrialState.COMPLETE] + states[optuna.trial.TrialState.PRUNED]
    if states[optuna.trial.TrialState.FAIL]:
        run.errors["FAIL"] += states[optuna.trial.TrialState.FAIL]
    run.orphans = states[optuna.trial.TrialState.RUNNING] + states[optuna.trial.TrialState.WAITING]
    if sum(counts) != run.done:
        run.errors["answers != trials finished"] += 1
    run.rate = run.done / elapsed
    return run


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--raw-worker":
        raw_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="postgresql,sqlite")
    parser.add_argument("--workers", default="4,16,32")
    parser.add_argument("--samplers", default="random,tpe")
    parser.add_argument("--modes", default="raw,service,batched")
    parser.add_argument("--trials", type=int, default=60, help="each study's budget")
    parser.add_argument("--batch", type=int, default=8, help="trials per batched lease")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(machine_header("service_vs_optuna: the service against raw Optuna's distributed mode"))
    print(
        f"setup:    {args.trials} trials per study, {EPOCHS} report steps each, the service's VAE "
        f"search space, batched mode leases {args.batch} per request; one `hpo serve` process"
    )
    header = (
        f"{'backend':<11}{'sampler':<8}{'N':>3} {'mode':<8}{'trials/s':>9}{'CPU s/trial':>12}"
        f"{'vs raw':>8}{'errors':>7}{'orphans':>8}  p50/p99 ms per route"
    )
    print(header)
    print("-" * len(header))
    for backend in args.backends.split(","):
        for sampler in args.samplers.split(","):
            for workers in [int(n) for n in args.workers.split(",")]:
                if backend == "sqlite" and workers != 4:
                    continue  # SQLite: one writer process; the raw mode's N writers only at 4
                spec = make_spec(sampler, args.trials, workers, args.batch)
                raw: Run | None = None
                for mode in args.modes.split(","):
                    with database(backend) as url:
                        if mode == "raw":
                            run = raw = run_raw(url, sampler, workers, args.trials)
                        else:
                            run = run_service(url, spec, mode, workers, args.batch)
                    ratio = (
                        f"{run.cpu_per_trial / raw.cpu_per_trial:.2f}×"
                        if raw is not None and mode != "raw"
                        else ""
                    )
                    routes = ", ".join(
                        f"{route} {1e3 * statistics.median(values):.0f}/"
                        f"{1e3 * percentile(values, 0.99):.0f}"
                        for route, values in sorted(run.latency.items())
                    )
                    errors = sum(run.errors.values())
                    print(
                        f"{backend:<11}{sampler:<8}{workers:>3} {mode:<8}{run.rate:>9.2f}"
                        f"{run.cpu_per_trial:>12.3f}{ratio:>8}{errors:>7}{run.orphans:>8}  "
                        f"{routes}",
                        flush=True,
                    )
                    if run.errors:
                        print(f"{'':<31}errors: {dict(run.errors)}")
    print(f"\nload avg: {load_average()} (at the end)")


if __name__ == "__main__":
    main()
