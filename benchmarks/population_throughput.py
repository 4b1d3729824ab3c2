"""Throughput of K fused members (``train_population``) against the same K configs trained one
after another by ``train()``, beside the GEMM floor widened to K, all measured in one run.

Run from the repository root::

    .venv/bin/python benchmarks/population_throughput.py [--device cpu] [--ks 1,4,16,64] \
        [--batch-sizes 32,128] [--epochs 2] [--sequential-sample 2] [--extras]

Every member is the 784-512-256-32 MLP VAE on ``mnist5k`` (fp32: ``amp: off``, so the floor's
fp32 products are the right bound), each with its own seed. Rows, per batch size and K:

* **fused**: samples/s of all K members together over the training steps of epochs 2.. (epoch 1
  warms up; validation excluded): the sum of the members' ``samples_per_sec``;
* **sequential**: samples/s of ``train()`` on the same configs one after another. Every member
  has the same shapes, so its rate does not depend on K: it is measured on the first
  ``--sequential-sample`` members (training steps of epochs 2..) and is the same for every K;
* **floor**: only the step's matrix products, batched over K (``baddbmm`` forward, ``bmm`` for
  both backward products), back to back — no Python loop, no loss, no optimizer.

Ratios printed: fused/sequential and fused/floor. Goals (issue 11): on a CPU at K = 16,
fused ≥ 0.85× floor at batch 128 and ≥ 2× sequential at batch 32; on an H100/H200 ≥ 10×
sequential at K = 64 and ≥ 5 M samples/s in all.

``--extras`` adds three measurements: ``torch.func.stack_module_state`` + ``vmap`` against the
hand-written ``baddbmm`` forward (forward + backward of the MLP VAE, K = 4 and 16, per batch
size — the measurement behind keeping ``baddbmm``); compacting against masking (a stack of K/2
live members against K members of which half are dead weight, and the cost of one restack); and
whether the conv VAE would gain from fusing (``vmap`` over K = 4 stacked conv VAEs against 4
sequential forward+backward passes). ``--ks none`` runs only the extras.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from trainers.config import TrainConfig
from trainers.models import build_vae
from trainers.population import train_population
from trainers.population_stack import MemberStack, stacked_vae_step
from trainers.train import TrainResult, amp_context, build_optimizer, train

BASE: dict[str, Any] = {
    "dataset": "mnist5k",
    "model": "mlp",
    "hidden_sizes": (512, 256),
    "latent_dim": 32,
    "amp": "off",
    "final_is_samples": 0,
}


def member(args: argparse.Namespace, batch: int, seed: int) -> dict[str, Any]:
    return {**BASE, "device": args.device, "epochs": args.epochs, "batch_size": batch, "seed": seed}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_rate(result: TrainResult) -> float:
    """Samples/s over the training steps of epochs 2..; each epoch's rate weighted equally."""
    return statistics.mean(m.values["samples_per_sec"] for m in result.history[1:])


def fused_rate(args: argparse.Namespace, batch: int, k: int) -> float:
    outcomes = train_population([(s, member(args, batch, s)) for s in range(k)])
    rates = []
    for outcome in outcomes.values():
        assert isinstance(outcome, TrainResult), outcome
        rates.append(measured_rate(outcome))
    return sum(rates)


def sequential_rate(args: argparse.Namespace, batch: int) -> float:
    results = [train(member(args, batch, s)) for s in range(args.sequential_sample)]
    seconds = sum(1 / measured_rate(r) for r in results)  # seconds per sample, one after another
    return len(results) / seconds


def floor_rate(
    batch: int, k: int, device: torch.device, steps: int, with_adam: bool = False
) -> float:
    """Samples/s of the step's matrix products alone, widened to K (``baddbmm``/``bmm``).

    ``with_adam``: plus one fused AdamW step over the stacked weights and biases per step —
    the least an Adam-trained step must add to its products (it reads and writes every
    weight, gradient and moment once), so ``floor+adam / floor`` bounds what any fused step
    can reach of the floor with an Adam-family optimizer, however little Python it runs."""
    gen = torch.Generator(device=device).manual_seed(0)
    encoder = [784, 512, 256, 64]
    decoder = [32, 256, 512, 784]
    layers = list(itertools.pairwise(encoder))
    layers += list(itertools.pairwise(decoder))
    ops = []
    for i, (n_in, n_out) in enumerate(layers):
        x = torch.rand(k, batch, n_in, device=device, generator=gen)
        w = torch.randn(k, n_out, n_in, device=device, generator=gen) / n_in**0.5
        b = torch.zeros(k, 1, n_out, device=device)
        g = torch.randn(k, batch, n_out, device=device, generator=gen)
        ops.append(lambda b=b, x=x, w=w: torch.baddbmm(b, x, w.transpose(1, 2)))  # forward
        ops.append(lambda g=g, x=x: torch.bmm(g.transpose(1, 2), x))  # ∂W = gᵀ x
        if i > 0:  # the first layer's input is data: no input gradient
            ops.append(lambda g=g, w=w: torch.bmm(g, w))  # ∂x = g W
    if with_adam:
        stacked = [torch.nn.Parameter(torch.randn(k, n_out, n_in, device=device, generator=gen))
                   for n_in, n_out in layers] + [
                   torch.nn.Parameter(torch.zeros(k, 1, n_out, device=device))
                   for _, n_out in layers]  # fmt: skip
        for param in stacked:
            param.grad = torch.randn(param.shape, device=device, generator=gen)
        fused = device.type in ("cpu", "cuda")
        ops.append(torch.optim.AdamW(stacked, lr=1e-3, fused=fused, foreach=not fused).step)
    for op in ops:
        op()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        for op in ops:
            op()
    sync(device)
    return steps * k * batch / (time.perf_counter() - t0)


def fused_step_seconds(cfg: TrainConfig, k: int, device: torch.device, steps: int) -> float:
    vaes = [build_vae(cfg, (1, 28, 28)).to(device) for _ in range(k)]
    optimizers = [build_optimizer(v, cfg, device) for v in vaes]
    stack = MemberStack(vaes)
    x = torch.rand(k, cfg.batch_size, 784, device=device)
    eps = torch.randn(k, cfg.batch_size, cfg.latent_dim, device=device)
    ones, zeros = torch.ones(k, device=device), torch.zeros(k, device=device)
    autocast = amp_context(cfg, device)
    configs = [cfg] * k
    stacked_vae_step(stack, configs, optimizers, x, eps, ones, zeros, autocast)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        stacked_vae_step(stack, configs, optimizers, x, eps, ones, zeros, autocast)
    sync(device)
    return (time.perf_counter() - t0) / steps


def compaction(args: argparse.Namespace, device: torch.device) -> str:
    """A full stack of K (the mask: dead members still cost their products) against a compacted
    stack of K/2, and what one restack of K/2 costs."""
    k = 16
    cfg = TrainConfig.from_mapping(member(args, 128, 0))
    full = fused_step_seconds(cfg, k, device, 5)
    half = fused_step_seconds(cfg, k // 2, device, 5)
    vaes = [build_vae(cfg, (1, 28, 28)).to(device) for _ in range(k // 2)]
    t0 = time.perf_counter()
    MemberStack(vaes)
    restack = time.perf_counter() - t0
    return (
        f"compaction (batch 128): mask, K={k} with {k // 2} dead: {full * 1e3:.1f} ms/step; "
        f"compacted to {k // 2}: {half * 1e3:.1f} ms/step ({full / half:.2f}x faster); "
        f"one restack {restack * 1e3:.1f} ms"
    )


def vmap_vs_baddbmm(batch: int, k: int, device: torch.device, steps: int = 5) -> str:
    """Forward + backward of K stacked MLP VAEs: ``vmap(functional_call)`` against
    ``MemberStack.forward`` (``baddbmm``), same weights and inputs."""
    cfg = TrainConfig.from_mapping({**BASE, "device": str(device), "batch_size": batch})
    models = [build_vae(cfg, (1, 28, 28)).to(device) for _ in range(k)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    stack = MemberStack(models)
    x = torch.rand(k, batch, 784, device=device)
    eps = torch.randn(k, batch, cfg.latent_dim, device=device)

    def one(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], xi: torch.Tensor,
            ei: torch.Tensor) -> torch.Tensor:  # fmt: skip
        _, _, out = functional_call(base, (p, b), (xi, ei))
        return out

    def with_vmap() -> None:
        out = vmap(one)(params, buffers, x, eps)
        F.binary_cross_entropy_with_logits(out, x).backward()

    def with_baddbmm() -> None:
        _, _, out = stack.forward(x, eps)
        F.binary_cross_entropy_with_logits(out, x).backward()

    timings = {}
    for name, fn in (("vmap", with_vmap), ("baddbmm", with_baddbmm)):
        fn()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        timings[name] = (time.perf_counter() - t0) / steps
    return (
        f"MLP forward+backward (batch {batch}, K={k}): vmap {timings['vmap'] * 1e3:.1f} ms, "
        f"baddbmm {timings['baddbmm'] * 1e3:.1f} ms, vmap/baddbmm "
        f"{timings['vmap'] / timings['baddbmm']:.2f}x"
    )


def conv_fusion(device: torch.device, k: int = 4, batch: int = 128, steps: int = 5) -> str:
    """vmap over K stacked conv VAEs against K sequential forward+backward passes."""
    cfg = TrainConfig.from_mapping({**BASE, "model": "conv", "device": str(device)})
    models = [build_vae(cfg, (1, 28, 28)).to(device) for _ in range(k)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = torch.rand(k, batch, 784, device=device)
    eps = torch.randn(k, batch, cfg.latent_dim, device=device)

    def one(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], xi: torch.Tensor,
            ei: torch.Tensor) -> torch.Tensor:  # fmt: skip
        _, _, out = functional_call(base, (p, b), (xi, ei))
        return out

    def fused() -> None:
        out = vmap(one)(params, buffers, x, eps)
        F.binary_cross_entropy_with_logits(out, x).backward()

    def sequential() -> None:
        for j, model in enumerate(models):
            _, _, out = model(x[j], eps[j])
            F.binary_cross_entropy_with_logits(out, x[j]).backward()

    timings = {}
    for name, fn in (("vmap", fused), ("sequential", sequential)):
        fn()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        timings[name] = (time.perf_counter() - t0) / steps
    return (
        f"conv VAE (batch {batch}, K={k}, forward+backward): vmap {timings['vmap'] * 1e3:.0f} ms, "
        f"sequential {timings['sequential'] * 1e3:.0f} ms, "
        f"vmap speed-up {timings['sequential'] / timings['vmap']:.2f}x"
    )


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ks", default="1,4,16,64")
    parser.add_argument("--batch-sizes", default="32,128")
    parser.add_argument("--epochs", type=int, default=2, help="epoch 1 is a warm-up")
    parser.add_argument("--sequential-sample", type=int, default=2)
    parser.add_argument("--floor-steps", type=int, default=10)
    parser.add_argument("--extras", action="store_true")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (epoch 1 is a warm-up)")
    device = torch.device(args.device)
    ks = [] if args.ks == "none" else [int(k) for k in args.ks.split(",")]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    print(f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {device_name(device)}, "
          f"torch {torch.__version__}, load before: {load()}")  # fmt: skip
    print("# 784-512-256-32 MLP VAE on mnist5k, fp32; samples/s over training steps of epochs 2..")
    print("# floor+adam: the floor plus one fused AdamW step over the stack; its ratio to the "
          "floor bounds fused/floor")  # fmt: skip
    print("batch     K        fused   sequential        floor   floor+adam   fused/seq  "
          "fused/floor  (floor+adam)/floor")  # fmt: skip
    for batch in batch_sizes if ks else []:
        seq = sequential_rate(args, batch)
        for k in ks:
            fused = fused_rate(args, batch, k)
            floor = floor_rate(batch, k, device, args.floor_steps)
            bound = floor_rate(batch, k, device, args.floor_steps, with_adam=True)
            print(f"{batch:5d} {k:5d} {fused:12.0f} {seq:12.0f} {floor:12.0f} {bound:12.0f} "
                  f"{fused / seq:10.2f}x {fused / floor:11.2f}x {bound / floor:18.2f}x",
                  flush=True)  # fmt: skip
    if args.extras:
        for batch in batch_sizes:
            for k in (4, 16):
                print(vmap_vs_baddbmm(batch, k, device), flush=True)
        print(compaction(args, device))
        print(conv_fusion(device))
    print(f"# load after: {load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
