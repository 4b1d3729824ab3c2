"""What the per-epoch history and the diagnostics plot cost (issue 14).

Run from the repository root::

    .venv/bin/python benchmarks/diagnostics_plot.py [--epochs 10,100,1000] [--reports 40]

1. **Drawing**: ``render_diagnostics`` on histories of ``--epochs`` records (latent dimension
   32, the trainer's metrics), the median of 3 drawings each, and the PNG's size.
2. **The report path**, in process on a temporary SQLite file through the real app
   (FastAPI's ``TestClient``, no sockets): one trial reports ``--reports`` epochs, three ways,
   interleaved round by round so load drifts hit all three alike:

   * *baseline*: the history and the plot switched off (``epochs_reported`` does nothing);
   * *history*: each report also writes its record (the one extra statement);
   * *plots every 5*: as shipped (``HPO_DIAGNOSTICS_PLOT_EVERY=5``, the default): drawn in
     the child process at epochs 1, 5, 10, …;
   * *plots every 1*: redrawn at every epoch, the worst case (the child draws without pause).

   It prints the median and 90th percentile report latency of each and the ratios to the
   baseline. Drawing never runs on the request; what remains is the CPU the drawing process
   takes from the server on a small host.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _service_common import load_average, machine_header
from fastapi.testclient import TestClient

from hpo_service.app import create_app
from hpo_service.config import Settings
from hpo_service.diagnostics_plot import render_diagnostics
from hpo_service.history import compact_record

TOKENS = "admin:a,worker:w"
ADMIN, WORKER = {"Authorization": "Bearer a"}, {"Authorization": "Bearer w"}


def metrics(epoch: int, dims: int = 32) -> dict[str, Any]:
    rng = random.Random(epoch)
    return {
        "train_loss": 120.0 - epoch * 0.01,
        "train_neg_elbo": 121.0 - epoch * 0.01,
        "train_recon": 100.0 - epoch * 0.01,
        "train_kl": 20.0 + rng.random(),
        "val_neg_elbo": 122.0 - epoch * 0.01,
        "val_recon": 101.0,
        "val_kl": 20.0,
        "active_units": 12,
        "free_bits_floor_dims": 0,
        "beta": min(1.0, epoch / 10),
        "lr": 1e-3 * (1 + epoch % 7),
        "grad_norm_mean": 5.0 + rng.random(),
        "grad_norm_max": 30.0,
        "clip_fraction": 0.1,
        "samples_per_sec": 50_000.0,
        "posterior_collapse": 0,
        "mean_sigma": 0.4,
        "mean_abs_mu": 0.7,
        "epoch_seconds": 0.5,
        "kl_per_dim": [rng.random() for _ in range(dims)],
    }


def drawing(sizes: list[int]) -> None:
    print("\n## Drawing (render_diagnostics, latent 32)\n")
    print("| epochs | median s (3 drawings) | PNG KiB |")
    print("|---:|---:|---:|")
    for size in sizes:
        records = [{**compact_record(metrics(e)), "epoch": e} for e in range(1, size + 1)]
        times, png = [], b""
        for _ in range(3):
            started = time.perf_counter()
            png = render_diagnostics(records, f"bench · {size} epochs")
            times.append(time.perf_counter() - started)
        print(f"| {size} | {statistics.median(times):.2f} | {len(png) / 1024:.0f} |")


def report_path(reports: int, rounds: int) -> None:
    print(f"\n## Report latency, SQLite, {reports} reports per trial, {rounds} rounds\n")
    spec = {
        "dataset": "synthetic",
        "epochs": reports,
        "budget": {"n_trials": 1000, "max_concurrent": 16},
        "pruner": {"name": "none"},
        "fixed": {"device": "cpu"},
    }
    every = {"baseline": 0, "history": 0, "plots every 5": 5, "plots every 1": 1}
    latencies: dict[str, list[float]] = {mode: [] for mode in every}
    with tempfile.TemporaryDirectory() as tmp:
        apps = {}
        for mode in latencies:
            settings = Settings(
                database_url=f"sqlite:///{tmp}/{len(apps)}.db",
                artifact_dir=Path(tmp) / f"artifacts-{len(apps)}",
                tokens=TOKENS,  # type: ignore[arg-type]
                run_reaper=False,
                run_scheduler=False,
                diagnostics_plot_every=every[mode],
            )
            app = create_app(settings)
            if mode == "baseline":
                app.state.service.diagnostics.epochs_reported = lambda *args: None
            apps[mode] = app
        clients = {mode: TestClient(app) for mode, app in apps.items()}
        for client in clients.values():
            client.__enter__()
            made = client.post("/v1/studies", json={**spec, "name": "bench"}, headers=ADMIN)
            assert made.status_code == 201, made.text
        for round_ in range(rounds + 1):  # round 0 warms up and is not counted
            for mode, client in clients.items():
                lease = client.post("/v1/leases", json={"worker_id": "b"}, headers=WORKER).json()
                url = f"/v1/trials/{lease['trial_id']}/report"
                for epoch in range(1, reports + 1):
                    body = {
                        "lease_token": lease["lease_token"],
                        "epoch": epoch,
                        "value": 100.0,
                        "metrics": metrics(epoch),
                    }
                    started = time.perf_counter()
                    answer = client.post(url, json=body, headers=WORKER)
                    elapsed = time.perf_counter() - started
                    assert answer.status_code == 200, answer.text
                    if round_:
                        latencies[mode].append(elapsed)
                done = client.post(
                    f"/v1/trials/{lease['trial_id']}/complete",
                    json={"lease_token": lease["lease_token"], "values": [1.0], "metrics": {}},
                    headers=WORKER,
                )
                assert done.status_code == 200, done.text
        drawn = apps["plots every 1"].state.service.diagnostics.last_render_s
        for client in clients.values():
            client.__exit__(None, None, None)
        for app in apps.values():
            app.state.service.storage.engine.dispose()
    base = statistics.median(latencies["baseline"])
    print("| path | median ms | p90 ms | median / baseline |")
    print("|---|---:|---:|---:|")
    for mode, values in latencies.items():
        values.sort()
        median, p90 = statistics.median(values), values[int(0.9 * (len(values) - 1))]
        print(f"| {mode} | {median * 1e3:.1f} | {p90 * 1e3:.1f} | {median / base:.2f}× |")
    if drawn is not None:
        print(f"\nlast background drawing took {drawn:.2f}s (off the request)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", default="10,100,1000")
    parser.add_argument("--reports", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(machine_header("Diagnostics history and plot"))
    drawing([int(n) for n in args.epochs.split(",")])
    report_path(args.reports, args.rounds)
    print(f"\nload average after: {load_average()}")


if __name__ == "__main__":
    main()
