"""What the final evaluation of one winner costs (issue 14.4): the numbers behind
``final_evaluation`` being off by default.

Run from the repository root::

    .venv/bin/python benchmarks/final_eval_cost.py [--dataset digits] [--ks 1 50 500] [--device cpu]

The model is the default MLP VAE of ``TrainConfig`` (hidden 512-256, latent 16;
untrained weights: the cost of decoding does not depend on them) on the full test split of
``--dataset``. Per k it times ``trainers.metrics.importance_sampled_nll`` (Burda et al. 2016,
Eq. 8), as the ``final_evaluation`` task runs it, and prints the seconds, the seconds per
example and the ratio to k = 1 (one posterior sample, the cost of a test −ELBO) measured in
the same run. The cost is linear in k (k samples decoded per example), so the line for
k = 5000 is extrapolated from the largest k measured, and says so.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _service_common import machine_header

from trainers.data import load_dataset
from trainers.evaluation import eval_generator
from trainers.metrics import importance_sampled_nll
from trainers.models import build_vae
from trainers.run_setup import parse_config, resolve_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 50, 500])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(machine_header(f"final evaluation cost: IS-NLL on the full {args.dataset} test split"))
    print(f"torch:    {torch.__version__}, threads {torch.get_num_threads()}")
    cfg = parse_config({"dataset": args.dataset, "device": args.device})
    device = resolve_device(cfg.device)
    data = load_dataset(cfg, device)
    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg, data.image_shape).to(device).eval()
    n = len(data.test)
    print(f"model:    hidden {cfg.hidden_sizes}, latent {cfg.latent_dim}; {n} test examples")
    seconds: dict[int, float] = {}
    for k in sorted(set([1, *args.ks])):
        started = time.perf_counter()
        with torch.no_grad():
            nll = importance_sampled_nll(
                vae,
                data.test,
                k=k,
                likelihood=cfg.likelihood,
                gaussian_std=cfg.gaussian_std,
                generator=eval_generator(cfg, device),
            )
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds[k] = time.perf_counter() - started
        print(
            f"k={k:>6}: {seconds[k]:8.2f} s  {1e3 * seconds[k] / n:8.3f} ms/example  "
            f"x{seconds[k] / seconds[1]:8.1f} vs k=1  (IS-NLL {nll.mean().item():.2f} nats)"
        )
    top = max(seconds)
    if top < 5000:
        estimate = seconds[top] * 5000 / top
        print(f"k=  5000: ~{estimate:.0f} s per winner (extrapolated linearly from k={top})")


if __name__ == "__main__":
    main()
