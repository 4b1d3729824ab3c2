"""Training throughput of our loop against a pytorch/examples ``vae/main.py``-style loop.

Run from the repository root::

    .venv/bin/python benchmarks/trainer_throughput.py [--device cpu] [--epochs N] \
        [--batch-size B] [--dataset mnist5k] [--repeats R] [--variants ours,ours-foreach,...] \
        [--json FIGURES.json]

Both loops train the identical MLP VAE (``trainers.models.build_vae``) on the same training
tensor, device, batch size and number of epochs, in the same process:

* **ours**: ``trainers.train.train(config)`` with its defaults (fused Adam; bf16 autocast
  where the device multiplies bf16 natively — CUDA, CPUs with AVX512-BF16 or AMX — which the
  header line ``ours:`` states); ``samples_per_sec`` is read from each epoch's
  ``EpochMetrics.values`` (training steps only, validation excluded);
* **baseline**: a ``DataLoader`` over a ``TensorDataset`` (``shuffle=True``), Adam with torch's
  default kernels, BCE-with-logits + analytic KL, ``loss.item()`` every step, fp32 — the
  structure of pytorch/examples ``vae/main.py``. Its training epochs are timed with
  ``time.perf_counter`` (synchronised on CUDA).

Optional rows (``--variants``), all measured in the same run:

* ``ours-foreach``: our loop with torch's multi-tensor ``foreach`` Adam instead of the fused one
  (the measurement behind the fused default);
* ``ours-fp32``: our loop with ``amp: off`` — the loop's own gain, without bf16;
* ``baseline-bf16``: the baseline loop with its forward pass under bf16 autocast — what bf16
  alone buys a loop of the pytorch/examples shape;
* ``ours-compile``: our loop with ``compile: true`` (forward + ELBO terms in one graph); its
  compile time falls in epoch 1 and is reported separately, never counted in samples/s;
* ``gemm-floor``: only the matrix multiplications of one training step (forward ``addmm`` and
  backward ``mm`` with the model's shapes), back to back — what no loop around the same fp32
  GEMMs can beat. ``gemm-floor / baseline`` bounds the ratio any loop can reach on the device.

Epoch 1 of each loop is a warm-up and is not counted; the loops run alternately ``--repeats``
times and the median epoch is reported. The load average before and after is printed: on a
shared machine a busy neighbour slows every row.

``--clock wall`` (default) times wall-clock seconds with torch's default threads. On a CPU that
other jobs share, wall time mostly measures the neighbours (two OpenMP threads wait for each
other whenever one is descheduled), so ``--clock cpu`` runs every loop on one thread and counts
the CPU seconds this process spent (``time.process_time``): samples per CPU-second, which load
from other processes hardly changes. For our loop the CPU seconds of each epoch's validation
are measured and subtracted, so both clocks count training steps only.

``--json PATH`` also writes the figures (every row's samples/s, the ratios, device, torch version,
load) as JSON, for ``scripts/gpu-check``.

Goals (from the issue): ours/baseline ≥ 1.5× on CPU, ≥ 20× on an H100.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers import evaluation
from trainers import train as train_module
from trainers.config import TrainConfig
from trainers.data import load_dataset
from trainers.models import build_vae
from trainers.train import build_optimizer, resolve_device, train, uses_bf16

GOALS = {"cpu": 1.5, "cuda": 20.0}
VARIANTS = ("ours", "ours-fp32", "ours-foreach", "ours-compile", "baseline-bf16", "gemm-floor")
Clock = Callable[[], float]


def make_config(args: argparse.Namespace, **overrides: object) -> TrainConfig:
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
            **overrides,
        }
    )


def bench_ours(cfg: TrainConfig, warmups: list[float], cpu_clock: bool) -> list[float]:
    """Samples/s of each of our epochs after the first; epoch 1's wall seconds go to ``warmups``.

    Wall clock: the loop's own ``samples_per_sec`` (training steps only). CPU clock: CPU seconds
    between the ends of consecutive epochs, minus those spent in validation. Epoch 1 is always
    reported in wall seconds: inductor compiles in worker processes whose CPU time this
    process's clock does not see.
    """
    if not cpu_clock:
        result = train(cfg)
        warmups.append(result.history[0].values["epoch_seconds"])
        return [m.values["samples_per_sec"] for m in result.history[1:]]

    real_evaluate = evaluation.evaluate
    in_eval = [0.0]
    marks: list[tuple[float, float]] = []  # (CPU seconds, of which validation) at epoch ends

    def timed_evaluate(*args: Any, **kwargs: Any) -> Any:
        t0 = time.process_time()
        try:
            return real_evaluate(*args, **kwargs)
        finally:
            in_eval[0] += time.process_time() - t0

    def mark(_: object) -> None:
        marks.append((time.process_time(), in_eval[0]))

    with mock.patch.object(evaluation, "evaluate", timed_evaluate):
        result = train(cfg, mark)
    warmups.append(result.history[0].values["epoch_seconds"])
    n_train = len(load_dataset(cfg, torch.device("cpu")).train)
    per_epoch = (n_train // cfg.batch_size) * cfg.batch_size  # the ragged batch is dropped
    assert len(marks) == result.epochs_run
    return [
        per_epoch / ((t - t_prev) - (e - e_prev))
        for (t_prev, e_prev), (t, e) in itertools.pairwise(marks)
    ]


def bench_ours_foreach(cfg: TrainConfig, warmups: list[float], cpu_clock: bool) -> list[float]:
    """Our loop with torch's multi-tensor (``foreach``) Adam instead of the fused kernel."""
    foreach = functools.partial(build_optimizer, fused=False)
    with mock.patch.object(train_module, "build_optimizer", foreach):
        return bench_ours(cfg, warmups, cpu_clock)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_baseline(
    cfg: TrainConfig, device: torch.device, clock: Clock, bf16: bool = False
) -> list[float]:
    """Samples/s of each baseline epoch after the first (pytorch/examples vae/main.py style);
    ``bf16``: its forward pass under bf16 autocast, the loss in fp32 (as in our loop)."""
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
        t0 = clock()
        for (x,) in loader:
            x = x.to(device)
            eps = torch.randn(x.shape[0], cfg.latent_dim, device=device)
            optimizer.zero_grad()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                mu, logvar, logits = model(x, eps)
            mu, logvar, logits = mu.float(), logvar.float(), logits.float()
            bce = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
            kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
            loss = (bce + kld) / x.shape[0]
            loss.backward()
            train_loss += loss.item()
            optimizer.step()
            n_seen += x.shape[0]
        sync(device)
        seconds = clock() - t0
        if epoch > 1:
            rates.append(n_seen / seconds)
    return rates


def gemm_shapes(cfg: TrainConfig, input_dim: int) -> list[tuple[int, int, int, bool]]:
    """(batch, n_in, n_out, needs input grad) of every linear layer of the MLP VAE."""
    latent = cfg.latent_dim
    encoder = [input_dim, *cfg.hidden_sizes, 2 * latent]
    decoder = [latent, *reversed(cfg.hidden_sizes), input_dim]
    layers = list(itertools.pairwise(encoder)) + list(itertools.pairwise(decoder))
    # The first layer's input is data: autograd computes no gradient for it.
    return [(cfg.batch_size, n_in, n_out, i > 0) for i, (n_in, n_out) in enumerate(layers)]


def bench_gemm_floor(
    cfg: TrainConfig, device: torch.device, input_dim: int, steps: int, clock: Clock
) -> list[float]:
    """Samples/s of the training step's GEMMs alone, ``steps`` steps per "epoch"."""
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    ops: list[Callable[[], torch.Tensor]] = []
    for batch, n_in, n_out, input_grad in gemm_shapes(cfg, input_dim):
        x = torch.rand(batch, n_in, device=device, generator=gen)
        w = torch.randn(n_out, n_in, device=device, generator=gen) / n_in**0.5
        b = torch.zeros(n_out, device=device)
        g = torch.randn(batch, n_out, device=device, generator=gen)
        ops.append(functools.partial(torch.addmm, b, x, w.t()))  # forward: x Wᵀ + b
        ops.append(functools.partial(torch.mm, g.t(), x))  # backward: ∂W = gᵀ x
        if input_grad:
            ops.append(functools.partial(torch.mm, g, w))  # backward: ∂x = g W
    rates: list[float] = []
    for epoch in range(1, cfg.epochs + 1):
        sync(device)
        t0 = clock()
        for _ in range(steps):
            for op in ops:
                op()
        sync(device)
        if epoch > 1:
            rates.append(steps * cfg.batch_size / (clock() - t0))
    return rates


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


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
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: wall-clock seconds, default threads; cpu: CPU seconds of this process on one "
        "thread (for a CPU shared with other jobs)",
    )
    parser.add_argument(
        "--variants",
        default="ours",
        help=f"comma-separated rows besides the baseline, from {', '.join(VARIANTS)}",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be ≥ 2 (epoch 1 is a warm-up)")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        parser.error(f"--variants: unknown {unknown} (choose from {', '.join(VARIANTS)})")

    cfg = make_config(args)
    device = resolve_device(cfg.device)
    cpu_clock = args.clock == "cpu"
    if cpu_clock and device.type != "cpu":
        parser.error("--clock cpu times CPU work; use --clock wall on a GPU")
    if cpu_clock:
        torch.set_num_threads(1)  # every loop alike; CPU seconds then equal busy wall seconds
    clock: Clock = time.process_time if cpu_clock else time.perf_counter
    data = load_dataset(cfg, torch.device("cpu"))
    n_train, input_dim = data.train.shape
    steps = n_train // cfg.batch_size  # our loop drops the ragged last batch
    load_before = load_average()
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    print(f"date:    {started}")
    print(f"load average (1, 5, 15 min) before: {load_before}", flush=True)

    runners: dict[str, Callable[[list[float]], list[float]]] = {
        "ours": lambda w: bench_ours(cfg, w, cpu_clock),
        "ours-fp32": lambda w: bench_ours(make_config(args, amp="off"), w, cpu_clock),
        "ours-foreach": lambda w: bench_ours_foreach(cfg, w, cpu_clock),
        "baseline-bf16": lambda _: bench_baseline(cfg, device, clock, bf16=True),
        "ours-compile": lambda w: bench_ours(make_config(args, compile=True), w, cpu_clock),
        "gemm-floor": lambda _: bench_gemm_floor(cfg, device, input_dim, steps, clock),
    }
    rates: dict[str, list[float]] = {"baseline": [], **{v: [] for v in variants}}
    warmups: dict[str, list[float]] = {v: [] for v in variants}
    # Alternate the loops so a load change on a shared machine hits all of them alike.
    for _ in range(args.repeats):
        rates["baseline"] += bench_baseline(cfg, device, clock)
        for name in variants:
            rates[name] += runners[name](warmups[name])

    medians = {name: statistics.median(r) for name, r in rates.items()}
    samples = {name: steps * cfg.batch_size for name in rates}
    samples |= {name: n_train for name in rates if name.startswith("baseline")}
    amp = "bf16 autocast, fused Adam" if uses_bf16(cfg, device) else "fp32, fused Adam"

    load_after = load_average()
    print(f"load average (1, 5, 15 min) after:  {load_after}")
    print(f"torch:   {torch.__version__}")
    print(f"device:  {device_name(device)}")
    unit = "CPU seconds of this process" if cpu_clock else "wall-clock seconds"
    print(f"clock:   {args.clock} ({unit}, {torch.get_num_threads()} thread(s))")
    print(
        f"setup:   dataset={cfg.dataset} (n_train={n_train}) model=mlp "
        f"hidden={list(cfg.hidden_sizes)} latent={cfg.latent_dim} batch={cfg.batch_size} "
        f"epochs={cfg.epochs} (epoch 1 = warm-up, not counted) repeats={args.repeats}; "
        f"ours: {amp} (amp={cfg.amp}); baseline: fp32; samples/s = median over counted epochs"
    )
    print()
    header = f"{'loop':<13} {'samples/s':>10} {'s/epoch':>8} {'min–max samples/s':>20} {'×base':>6}"
    print(header)
    for name, rate in medians.items():
        spread = f"{min(rates[name]):,.0f}–{max(rates[name]):,.0f}"
        times = rate / medians["baseline"]
        print(f"{name:<13} {rate:>10,.0f} {samples[name] / rate:>8.3f} {spread:>20} {times:>5.2f}×")
    compile_warmups = warmups.get("ours-compile")
    if compile_warmups:
        # Per repeat, not a median: the first compile in a fresh inductor cache is the cold cost.
        cold = ", ".join(f"{w:.1f}" for w in compile_warmups)
        line = f"\nours-compile: epoch 1 took {cold} wall s (per repeat)"
        if warmups.get("ours"):
            line += f"; ours without compile: {statistics.median(warmups['ours']):.1f} s (median)"
        print(f"{line}; with that epoch's validation; compilation is not counted in samples/s")
    if "gemm-floor" in medians:
        bound = medians["gemm-floor"] / medians["baseline"]
        print(f"upper bound for any loop around the same fp32 GEMMs: {bound:.2f}× the baseline")
    if "ours-fp32" in medians:
        alone = medians["ours-fp32"] / medians["baseline"]
        print(f"the loop alone, both in fp32 (ours-fp32/baseline): {alone:.2f}×")
    if "ours" in medians:
        ratio = medians["ours"] / medians["baseline"]
        goal = GOALS.get(device.type)
        verdict = (
            "" if goal is None else f" (goal ≥ {goal:g}×: {'met' if ratio >= goal else 'NOT met'})"
        )
        print(f"ratio ours/baseline: {ratio:.2f}×{verdict}")
    if args.json is not None:
        figures = {
            "date": started,
            "load_before": load_before,
            "load_after": load_after,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "device": device_name(device),
            "device_type": device.type,
            "clock": args.clock,
            "threads": torch.get_num_threads(),
            "setup": {
                "dataset": cfg.dataset,
                "n_train": n_train,
                "hidden": list(cfg.hidden_sizes),
                "latent": cfg.latent_dim,
                "batch_size": cfg.batch_size,
                "epochs": cfg.epochs,
                "repeats": args.repeats,
                "ours": amp,
            },
            "rows": {
                name: {
                    "samples_per_sec": rate,
                    "min": min(rates[name]),
                    "max": max(rates[name]),
                    "x_baseline": rate / medians["baseline"],
                }
                for name, rate in medians.items()
            },
            "compile_epoch1_seconds": warmups.get("ours-compile", []),
        }
        if "ours" in medians and "gemm-floor" in medians:
            figures["ours_over_gemm_floor"] = medians["ours"] / medians["gemm-floor"]
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
