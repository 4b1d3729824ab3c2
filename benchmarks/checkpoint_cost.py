"""What one checkpoint costs (issue 14), beside what one epoch costs, measured in the same run:
the numbers behind the default of ``HPO_CHECKPOINT_EVERY_EPOCHS``.

Run from the repository root::

    .venv/bin/python benchmarks/checkpoint_cost.py [--epochs 3] [--device cpu] [--backend sqlite]

The run is the default MLP VAE (784-512-256, latent 16, AdamW, batch 128) on ``mnist5k`` with
the defaults of ``TrainConfig`` except the device. Every epoch ends with a checkpoint: captured
and serialized (``trainers.checkpoints.to_bytes``) and sent with ``PUT …/checkpoint`` to a real
``hpo serve`` process on 127.0.0.1 (SQLite or PostgreSQL; the file-system artifact store in a
temporary folder), which hashes the bytes, writes them atomically and records them on the
trial. Printed per epoch: the epoch's seconds (training and validation), the checkpoint's
bytes, its serialize and send seconds; then the medians and the ratio checkpoint / epoch, and
what that ratio becomes with one checkpoint every N epochs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _service_common import (
    ADMIN_TOKEN,
    WORKER_TOKEN,
    database,
    hpo_serve,
    http_client,
    machine_header,
)

from hpo_service.client import HPOClient
from trainers.checkpoints import digest, to_bytes
from trainers.train import EpochMetrics, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    args = parser.parse_args()
    print(machine_header("Checkpoint cost: default MLP VAE on mnist5k"))
    rows: list[tuple[int, float, int, float, float]] = []
    with (
        database(args.backend) as url,
        tempfile.TemporaryDirectory(prefix="hpo-ckpt-") as folder,
        hpo_serve(url, artifact_dir=folder, lease_timeout_s=3600) as server,  # no heartbeats here
    ):
        admin = HPOClient(http_client(server, ADMIN_TOKEN))
        admin.create_study(
            {
                "name": "ckpt-cost",
                "dataset": "mnist5k",
                "epochs": args.epochs,
                "budget": {"n_trials": 1, "max_concurrent": 1},
            }
        )
        worker = HPOClient(http_client(server, WORKER_TOKEN))
        lease = worker.lease("bench", 5)
        assert lease is not None
        # TrainConfig's defaults (the lease only lends its trial and token to send to)
        config = {
            "dataset": "mnist5k",
            "epochs": args.epochs,
            "device": args.device,
            "final_is_samples": 0,
        }

        def on_epoch(epoch: EpochMetrics) -> str:
            assert epoch.checkpoint is not None
            started = time.perf_counter()
            content = to_bytes(epoch.checkpoint())
            serialized = time.perf_counter()
            worker.upload_checkpoint(
                lease.trial_id, lease.lease_token, epoch.epoch, content, digest(content)
            )
            sent = time.perf_counter()
            rows.append(
                (
                    epoch.epoch,
                    epoch.values["epoch_seconds"],
                    len(content),
                    serialized - started,
                    sent - serialized,
                )
            )
            return "continue"

        train(config, on_epoch)
    print(f"\n{'epoch':>5} {'epoch s':>9} {'MB':>7} {'serialize s':>12} {'send s':>8}")
    for epoch, seconds, size, ser, send in rows:
        print(f"{epoch:>5} {seconds:>9.3f} {size / 1e6:>7.2f} {ser:>12.3f} {send:>8.3f}")
    epoch_s = statistics.median(r[1] for r in rows)
    ckpt_s = statistics.median(r[3] + r[4] for r in rows)
    size = statistics.median(r[2] for r in rows)
    print(
        f"\nmedian: epoch {epoch_s:.3f} s; checkpoint {size / 1e6:.2f} MB in {ckpt_s:.3f} s "
        f"(serialize + send); checkpoint / epoch = {ckpt_s / epoch_s:.3f}"
    )
    for every in (1, 2, 5, 10):
        print(
            f"  every {every:>2} epoch(s): +{100 * ckpt_s / (every * epoch_s):5.1f} % time, "
            f"{size / 1e6:.1f} MB stored per running trial (one kept), "
            f"≤ {every} epoch(s) lost per kill"
        )


if __name__ == "__main__":
    main()
