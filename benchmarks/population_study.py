"""The whole path of issue 11: a study by one population worker against single-trial workers.

The same study run once by one ``hpo-worker --population K`` and once by single-trial workers
(one per core), same machine, interleaved.

Run from the repository root (the issue's figures: 64 trials of 20 epochs; about an hour on 2
idle CPU cores with ``--repeats 2``)::

    .venv/bin/python benchmarks/population_study.py [--trials 64] [--epochs 20] \
        [--population 16] [--repeats 1] [--backend sqlite|postgresql]

Everything is real: one ``hpo serve`` process (``_service_common.hpo_serve``) on a fresh SQLite
file or PostgreSQL database, a study per arm run submitted through the REST API, and real
``hpo-worker`` processes (``python -m trainers.worker_cli``) training real VAEs on mnist5k.

The study: the service's default search space for the MLP VAE on mnist5k, ``--epochs`` epochs,
TPE with ``--seed`` (the same seed in every arm run), the service's default median pruner
(phase-aware), ``max_concurrent`` = ``--population`` in every arm so the studies are the same
spec, the default final test IS-NLL (k = 100) of each completed trial. Fixed instead of
searched, all stated in the output: ``batch_size`` (``--batch-size``, 128) so every trial can
join one fused group (members of another batch size form another group, issue 11's grouping
rule); ``amp: off`` (fp32) and the 784-512-256-32 MLP (latent 32, not the default 16) so the
runs compare with population_throughput's figures, which are that model's in fp32.

Arms, run alternately (``--repeats 2``: P, S, S, P) so load that drifts hits both:

* **P**: one ``hpo-worker --population K`` with 2 torch threads (``OMP_NUM_THREADS=2``);
* **S**: ``--workers`` (2) single-trial ``hpo-worker`` processes, 1 torch thread each
  (``OMP_NUM_THREADS=1``: the worker has no thread option of its own).

Per arm run: wall time from the workers' start to the study's end (polled on
``GET /v1/studies/{name}`` every 0.5 s, so within 0.5 s), trials completed / pruned / failed,
the best validation −ELBO (the objective) and that trial's test −ELBO, and the CPU seconds of
the workers and of the server (which also draws each trial's diagnostics plot every 5 epochs,
the default). Then per repeat the ratio S-wall / P-wall, beside the ratio population_throughput
predicts: fused K = ``--population`` against sequential ``train()`` at the same batch size
(``fused_rate`` / ``sequential_rate``, 2 epochs, the first a warm-up), both at
``--population-threads``, and the same fused figure against ``--workers`` × ``train()`` at one
thread (arm S's set-up; it assumes each worker has a core to itself), measured in this run
before the first and after the last arm run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _service_common import (  # noqa: E402
    ADMIN_TOKEN,
    WORKER_TOKEN,
    database,
    hpo_serve_process,
    http_client,
    load_average,
    machine_header,
    process_cpu_s,
)

POLL_S = 0.5
#: The model population_throughput measures (``BASE``), fixed in the study too.
MODEL: dict[str, Any] = {"hidden_sizes": (512, 256), "latent_dim": 32}


@dataclass
class ArmRun:
    arm: str  # "P" or "S"
    repeat: int
    study: str
    wall_s: float
    complete: int
    pruned: int
    failed: int
    best_value: float | None
    best_test_neg_elbo: float | None
    worker_cpu_s: float
    server_cpu_s: float
    load_start: str
    load_end: str


def study_spec(name: str, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "name": name,
        "dataset": "mnist5k",
        "model": "mlp",
        "epochs": args.epochs,
        "budget": {"n_trials": args.trials, "max_concurrent": args.population},
        "sampler": {"name": "tpe", "seed": args.seed},
        "pruner": {"name": "median"},
        # population_throughput's MLP (784-512-256-32), so its fused/seq figure is this model's
        "fixed": {
            "hidden_sizes": list(MODEL["hidden_sizes"]),
            "latent_dim": MODEL["latent_dim"],
            "batch_size": args.batch_size,
            "amp": "off",
            "device": "cpu",
        },
    }


def worker_command(url: str, worker_id: str, population: int) -> list[str]:
    return [
        sys.executable, "-m", "trainers.worker_cli", "--server", url, "--token", WORKER_TOKEN,
        "--worker-id", worker_id, "--device", "cpu", "--wait", "1", "--exit-when-idle",
        "--population", str(population),
    ]  # fmt: skip


def threads_env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_arm(
    url: str, server_pid: int, arm: str, repeat: int, args: argparse.Namespace, logs: Path
) -> ArmRun:
    name = f"whole-{arm}{repeat}"
    with http_client(url, ADMIN_TOKEN) as admin:
        admin.post("/v1/studies", json=study_spec(name, args)).raise_for_status()
        if arm == "P":
            plan = [(f"{name}-pop", args.population, args.population_threads)]
        else:
            plan = [(f"{name}-w{i}", 1, 1) for i in range(args.workers)]
        load_start = load_average()
        cpu_before, server_before = children_cpu_s(), process_cpu_s(server_pid)
        started = time.perf_counter()
        processes = []
        for worker_id, population, threads in plan:
            log = (logs / f"{worker_id}.log").open("wb")
            command = worker_command(url, worker_id, population)
            env = threads_env(threads)
            process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)
            processes.append((process, log))
        ended = False
        try:
            while True:
                info = admin.get(f"/v1/studies/{name}").json()
                if info["state"] != "running":
                    break
                if all(p.poll() is not None for p, _ in processes):
                    raise RuntimeError(f"{name}: every worker exited, the study is still running")
                time.sleep(POLL_S)
            wall = time.perf_counter() - started
            ended = True
        finally:
            for process, log in processes:
                if not ended:  # interrupted or failed: SIGTERM hands the trials back
                    process.terminate()
                try:
                    process.wait(timeout=300 if ended else 60)  # --exit-when-idle: they leave
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
                log.close()
        for (process, _), (worker_id, _, _) in zip(processes, plan, strict=True):
            if process.returncode != 0:
                tail = (logs / f"{worker_id}.log").read_text(errors="replace")[-1500:]
                print(f"# worker {worker_id} exited {process.returncode}:\n{tail}")
        counts = info["counts"]
        best = info["best_trials"][0] if info["best_trials"] else None
        return ArmRun(
            arm=arm,
            repeat=repeat,
            study=name,
            wall_s=wall,
            complete=int(counts["complete"]),
            pruned=int(counts["pruned"]),
            failed=int(counts["fail"]),
            best_value=best["values"][0] if best and best["values"] else None,
            best_test_neg_elbo=(best or {}).get("metrics", {}).get("test_neg_elbo"),
            worker_cpu_s=children_cpu_s() - cpu_before,
            server_cpu_s=process_cpu_s(server_pid) - server_before,
            load_start=load_start,
            load_end=load_average(),
        )


def predicted_ratio(args: argparse.Namespace) -> dict[str, float]:
    """population_throughput's fused K against sequential ``train()`` (samples/s), in this
    process, on the study's batch size and model: both with ``--population-threads`` torch
    threads (the benchmark's own figure), and ``train()`` again with 1 thread, times
    ``--workers`` (what arm S's workers would reach if each had a core to itself)."""
    import torch
    from population_throughput import fused_rate, sequential_rate

    options = argparse.Namespace(device="cpu", epochs=2, sequential_sample=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.population_threads)
    try:
        seq = sequential_rate(options, args.batch_size)
        fused = fused_rate(options, args.batch_size, args.population)
        torch.set_num_threads(1)
        one = sequential_rate(options, args.batch_size)
    finally:
        torch.set_num_threads(threads)
    figures = {"fused": fused, "seq": seq, "seq_1_thread": one, "fused/seq": fused / seq,
               "fused/(workers*seq_1_thread)": fused / (args.workers * one)}  # fmt: skip
    print(
        f"# prediction (batch {args.batch_size}): fused K={args.population} {fused:.0f} "
        f"samples/s and sequential train() {seq:.0f} at {args.population_threads} threads: "
        f"fused/seq {figures['fused/seq']:.2f}x; train() at 1 thread {one:.0f}, "
        f"fused/({args.workers} x that) {figures['fused/(workers*seq_1_thread)']:.2f}x "
        f"(load {load_average()})",
        flush=True,
    )
    return figures


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--population-threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="single-trial workers in arm S")
    parser.add_argument("--repeats", type=int, default=1, help="pairs of arm runs: P S, S P, …")
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0, help="the sampler seed of every arm run")
    parser.add_argument("--json", type=Path, help="also write the runs here")
    parser.add_argument("--no-prediction", action="store_true")
    args = parser.parse_args(argv)

    print(machine_header("# benchmarks/population_study.py (issue 11: the whole path)"))
    print(
        f"# {args.trials} trials x {args.epochs} epochs, mnist5k, default MLP-VAE space, "
        f"fixed 784-512-256-32, batch_size={args.batch_size}, amp=off; median pruner, "
        f"TPE seed {args.seed}, backend {args.backend}; P: 1 worker --population {args.population} "
        f"({args.population_threads} threads); S: {args.workers} workers x 1 thread",
        flush=True,
    )
    predictions = [] if args.no_prediction else [predicted_ratio(args)]
    runs: list[ArmRun] = []
    with (
        database(args.backend) as url_db,
        hpo_serve_process(url_db) as (url, server_pid),
        tempfile.TemporaryDirectory(prefix="hpo-whole-") as folder,
    ):
        for repeat in range(args.repeats):
            for arm in ("P", "S") if repeat % 2 == 0 else ("S", "P"):
                run = run_arm(url, server_pid, arm, repeat, args, Path(folder))
                runs.append(run)
                print(
                    f"{run.arm} r{run.repeat}: wall {run.wall_s:8.1f} s, complete {run.complete:3d}"
                    f", pruned {run.pruned:3d}, failed {run.failed:2d}, best val -ELBO "
                    f"{fmt(run.best_value)}, its test -ELBO {fmt(run.best_test_neg_elbo)}, "
                    f"CPU s workers {run.worker_cpu_s:.0f} server {run.server_cpu_s:.0f}, "
                    f"load {run.load_start} -> "
                    f"{run.load_end}",
                    flush=True,
                )
    if not args.no_prediction:
        predictions.append(predicted_ratio(args))

    print("# S-wall / P-wall per repeat (> 1: the population finished first)")
    ratios = []
    for repeat in range(args.repeats):
        by_arm = {r.arm: r for r in runs if r.repeat == repeat}
        ratio = by_arm["S"].wall_s / by_arm["P"].wall_s
        ratios.append(ratio)
        best_gap = None
        if by_arm["S"].best_value is not None and by_arm["P"].best_value is not None:
            best_gap = by_arm["P"].best_value - by_arm["S"].best_value
        print(
            f"repeat {repeat}: S/P wall {ratio:.2f}x; best val -ELBO P - S = {fmt(best_gap)} nats"
        )
    summary = f"# mean S/P wall {statistics.fmean(ratios):.2f}x"
    if predictions:
        for key in ("fused/seq", "fused/(workers*seq_1_thread)"):
            predicted = ", ".join(f"{p[key]:.2f}x" for p in predictions)
            summary += f"; predicted by {key} (before, after): {predicted}"
    print(summary)
    print(f"# load avg at end: {load_average()}")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "date": datetime.datetime.now(datetime.UTC).isoformat(),
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "runs": [asdict(r) for r in runs],
                    "predictions": predictions,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
