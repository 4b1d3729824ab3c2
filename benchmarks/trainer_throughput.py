"""Training throughput of our loop against a pytorch/examples ``vae/main.py``-style loop.

Run from the repository root::

    .venv/bin/python benchmarks/trainer_throughput.py [--device cpu] [--epochs N] \
        [--batch-size B] [--dataset mnist5k]

Both loops train the identical MLP VAE (``trainers.models.build_vae``) on the same training
tensor, device, batch size and number of epochs, in the same process:

* **ours**: ``trainers.train.train(config)`` with its defaults (on CUDA: bf16 autocast, fused
  Adam); ``samples_per_sec`` is read from each epoch's ``EpochMetrics.values`` (training steps
  only, validation excluded);
* **baseline**: a ``DataLoader`` over a ``TensorDataset`` (``shuffle=True``), Adam, BCE-with-logits
  + analytic KL, ``loss.item()`` every step, fp32 — the structure of pytorch/examples
  ``vae/main.py``. Its training epochs are timed with ``time.perf_counter`` (synchronised on
  CUDA).

Epoch 1 of each loop is a warm-up and is not counted; the loops run alternately
``--repeats`` times and the median epoch is reported. Goals (from the issue): ours/baseline
≥ 1.5× on CPU, ≥ 20× on an H100.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.config import TrainConfig
from trainers.data import load_dataset
from trainers.models import build_vae
from trainers.train import resolve_device, train

GOALS = {"cpu": 1.5, "cuda": 20.0}


def make_config(args: argparse.Namespace) -> TrainConfig:
    """Our loop's config: MLP VAE, defaults otherwise, no final IS-NLL."""
    return TrainConfig.from_mapping(
        {
            "dataset": args.dataset,
            "model": "mlp",
            "optimizer": "adam",  # the baseline's optimizer (weight decay 0 in both)
            "batch_size": args.batch_size,
            "epochs": args.epochs,
            "device": args.device,
            "seed": args.seed,
            "final_is_samples": 0,
        }
    )


def bench_ours(cfg: TrainConfig) -> list[float]:
    """Samples/s of each of our epochs after the first."""
    result = train(cfg)
    return [m.values["samples_per_sec"] for m in result.history[1:]]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_baseline(cfg: TrainConfig, device: torch.device) -> list[float]:
    """Samples/s of each baseline epoch after the first (pytorch/examples vae/main.py style)."""
    torch.manual_seed(cfg.seed)
    data = load_dataset(cfg, torch.device("cpu"))  # examples keep the data on the host
    model = build_vae(cfg, data.image_shape).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.base_lr)
    loader = DataLoader(TensorDataset(data.train), batch_size=cfg.batch_size, shuffle=True)
    rates: list[float] = []
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        train_loss = 0.0
        n_seen = 0
        sync(device)
        t0 = time.perf_counter()
        for (x,) in loader:
            x = x.to(device)
            eps = torch.randn(x.shape[0], cfg.latent_dim, device=device)
            optimizer.zero_grad()
            mu, logvar, logits = model(x, eps)
            bce = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
            kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
            loss = (bce + kld) / x.shape[0]
            loss.backward()
            train_loss += loss.item()
            optimizer.step()
            n_seen += x.shape[0]
        sync(device)
        seconds = time.perf_counter() - t0
        if epoch > 1:
            rates.append(n_seen / seconds)
    return rates


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Training throughput: our loop vs a pytorch/examples-style loop."
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0, auto")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per loop (≥ 2)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeats", type=int, default=2, help="alternating runs of each loop (median taken)"
    )
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be ≥ 2 (epoch 1 is a warm-up)")

    cfg = make_config(args)
    device = resolve_device(cfg.device)
    n_train = load_dataset(cfg, torch.device("cpu")).train.shape[0]

    # Alternate the loops so a load change on a shared machine hits both alike.
    ours: list[float] = []
    baseline: list[float] = []
    for _ in range(args.repeats):
        baseline += bench_baseline(cfg, device)
        ours += bench_ours(cfg)

    # Our loop drops the ragged last batch; the baseline (DataLoader default) keeps it.
    ours_n = (n_train // cfg.batch_size) * cfg.batch_size
    rows = [
        ("ours", statistics.median(ours), ours_n, ours),
        ("baseline", statistics.median(baseline), n_train, baseline),
    ]
    ratio = rows[0][1] / rows[1][1]
    amp = "bf16 autocast, fused Adam" if device.type == "cuda" else "fp32, foreach Adam"

    print(f"date:    {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"torch:   {torch.__version__}")
    print(f"device:  {device_name(device)}")
    print(
        f"setup:   dataset={cfg.dataset} (n_train={n_train}) model=mlp "
        f"hidden={list(cfg.hidden_sizes)} latent={cfg.latent_dim} batch={cfg.batch_size} "
        f"epochs={cfg.epochs} (epoch 1 = warm-up, not counted) repeats={args.repeats}; "
        f"ours: {amp}; samples/s = median over counted epochs"
    )
    print()
    print(f"{'loop':<10} {'samples/s':>12} {'seconds/epoch':>14}  {'min–max samples/s':>20}")
    for name, rate, n, all_rates in rows:
        spread = f"{min(all_rates):,.0f}–{max(all_rates):,.0f}"
        print(f"{name:<10} {rate:>12,.0f} {n / rate:>14.3f}  {spread:>20}")
    print()
    goal = GOALS.get(device.type)
    verdict = (
        "" if goal is None else f" (goal ≥ {goal:g}×: {'met' if ratio >= goal else 'NOT met'})"
    )
    print(f"ratio ours/baseline: {ratio:.2f}×{verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
