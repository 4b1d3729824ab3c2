"""The CUDA path, checked on a GPU: ``pytest --device cuda tests/trainers`` (``scripts/gpu-check``).

Every test here is ``cuda_only``: skipped unless the suite trains on a CUDA device. What CPU runs
cannot show: bf16 autocast really on (Ampere and newer), the fused CUDA optimizer kernels, a step
loop that never waits for the GPU, reproducibility, and agreement with the CPU in fp32.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from trainers import train as train_module
from trainers.config import TrainConfig
from trainers.data import load_dataset
from trainers.models import build_vae
from trainers.train import TrainResult, build_optimizer, train, vae_loss_fn, vae_step

pytestmark = pytest.mark.cuda_only

#: 1437 training digits, 11 steps per epoch at batch 128; the loop's defaults otherwise
#: (``amp: auto``, fused Adam).
SMALL: dict[str, Any] = {
    "dataset": "digits",
    "model": "mlp",
    "hidden_sizes": (64, 32),
    "latent_dim": 4,
    "epochs": 3,
    "batch_size": 128,
    "kl_warmup_epochs": 1.0,
    "base_lr": 3e-3,
    "final_is_samples": 0,
    "active_unit_examples": 180,
}
STEPS_PER_EPOCH = 1437 // 128
TIMINGS = {"samples_per_sec", "epoch_seconds", "final_eval_seconds"}

#: fp32 on CUDA vs CPU, same initial weights, batches and noise: only kernel rounding differs
#: (different summation orders in the GEMMs and reductions). Over 20 Adam steps that stays far
#: below 1e-4 relative; a wrong kernel, a TF32 GEMM (10-bit mantissa) or a bf16 cast is far
#: outside it.
FP32_STEP_RTOL = 1e-4
#: Whole runs on CUDA and CPU draw different random numbers (the device generators differ), so
#: their metrics agree only as two seeds do: the final validation −ELBO within 3 % (seed-to-seed
#: spread of this config on CPU, seeds 0–2: under 1 %).
FP32_RUN_RTOL = 0.03


def _without_timings(values: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in values.items() if k not in TIMINGS}


@contextlib.contextmanager
def _linear_output_dtypes(seen: list[tuple[bool, torch.dtype]]) -> Iterator[None]:
    """Record (module in training mode, output dtype) of every ``nn.Linear`` call."""

    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        seen.append((module.training, output.dtype))

    handle = nn.modules.module.register_module_forward_hook(
        lambda m, i, o: hook(m, i, o) if isinstance(m, nn.Linear) else None
    )
    try:
        yield
    finally:
        handle.remove()


def test_the_data_lives_on_the_gpu(train_device: str) -> None:
    cfg = TrainConfig.from_mapping({**SMALL, "device": train_device})
    data = load_dataset(cfg, torch.device(train_device))
    for split in (data.train, data.val, data.test):
        assert split.device.type == "cuda" and split.dtype == torch.float32


def test_amp_auto_trains_under_bf16_autocast_and_evaluates_in_fp32(train_device: str) -> None:
    device = torch.device(train_device)
    assert torch.cuda.get_device_capability(device)[0] >= 8, "bf16 needs Ampere or newer"
    seen: list[tuple[bool, torch.dtype]] = []
    with _linear_output_dtypes(seen):
        result = train({**SMALL, "device": train_device, "epochs": 1})
    in_training = {dtype for training, dtype in seen if training}
    in_eval = {dtype for training, dtype in seen if not training}
    assert in_training == {torch.bfloat16}  # every matmul of every step
    assert in_eval == {torch.float32}  # validation and test stay fp32
    assert result.metrics["val_neg_elbo"] > 0


def test_the_fused_cuda_adam_kernel_does_every_update(
    monkeypatch: pytest.MonkeyPatch, train_device: str
) -> None:
    built: list[torch.optim.Optimizer] = []
    calls = {"_fused_adam_": 0, "_fused_adamw_": 0}

    def spy_builder(*args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        built.append(build_optimizer(*args, **kwargs))
        return built[-1]

    def counting(name: str) -> Any:
        real = getattr(torch, name)

        def kernel(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return real(*args, **kwargs)

        return kernel

    monkeypatch.setattr(train_module, "build_optimizer", spy_builder)
    for name in calls:
        monkeypatch.setattr(torch, name, counting(name))
    train({**SMALL, "device": train_device, "epochs": 1, "optimizer": "adamw"})
    (optimizer,) = built
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"] is True
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert all(p.device.type == "cuda" for p in params)
    # One fused launch per parameter group (decayed weights, undecayed biases) per step.
    assert sum(calls.values()) == 2 * STEPS_PER_EPOCH


@pytest.mark.parametrize("model", ["mlp", "conv"])
def test_the_step_loop_never_waits_for_the_gpu(
    monkeypatch: pytest.MonkeyPatch, train_device: str, model: str
) -> None:
    """No host synchronisation from the first step of an epoch to its last.

    ``set_sync_debug_mode("error")`` turns every synchronising CUDA call (``.item()``, a
    device-to-host copy, a data-dependent shape) into a RuntimeError. It is on from the first
    step's start to the last step's end, so it covers the loop's own lines between steps too
    (minibatch slicing, noise, schedules, the on-device accumulation); the epoch's one host read
    and the validation come after it.
    """
    config = {**SMALL, "device": train_device, "epochs": 2, "model": model}
    if model == "conv":
        config |= {"dataset": "synthetic", "synthetic_size": 512, "conv_channels": (8, 16)}
    n_train = len(load_dataset(TrainConfig.from_mapping(config), torch.device("cpu")).train)
    steps_per_epoch = n_train // 128
    real_step = vae_step
    calls = {"steps": 0, "guarded_epochs": 0}

    def guarded(*args: Any, **kwargs: Any) -> Any:
        in_epoch = calls["steps"] % steps_per_epoch
        calls["steps"] += 1
        if in_epoch == 0:
            torch.cuda.synchronize()  # earlier work (data, init) must not count against the loop
            torch.cuda.set_sync_debug_mode("error")
        out = real_step(*args, **kwargs)
        if in_epoch == steps_per_epoch - 1:
            torch.cuda.set_sync_debug_mode("default")
            calls["guarded_epochs"] += 1
        return out

    monkeypatch.setattr(train_module, "vae_step", guarded)
    try:
        train(config)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert calls["guarded_epochs"] == 2


@pytest.mark.parametrize("model", ["mlp", "conv"])
def test_the_same_seed_gives_the_same_metrics_twice(train_device: str, model: str) -> None:
    config = {**SMALL, "device": train_device, "model": model, "seed": 3}
    if model == "conv":
        config |= {"dataset": "synthetic", "synthetic_size": 512, "conv_channels": (8, 16)}
    a, b = train(config), train(config)
    for ma, mb in zip(a.history, b.history, strict=True):
        assert _without_timings(ma.values) == _without_timings(mb.values)
        assert ma.kl_per_dim == mb.kl_per_dim
    assert _without_timings(a.metrics) == _without_timings(b.metrics)


def _fp32_steps(device: torch.device, steps: int) -> tuple[list[list[float]], list[torch.Tensor]]:
    """``steps`` fp32 training steps from one initial state on fixed batches and noise, built on
    the CPU and moved to ``device``; returns each step's statistics and the final parameters."""
    cfg = TrainConfig.from_mapping({**SMALL, "amp": "off", "device": str(device)})
    data = load_dataset(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    vae = build_vae(cfg, data.image_shape).to(device)  # initialised on the CPU: same weights
    optimizer = build_optimizer(vae, cfg, device)
    for group in optimizer.param_groups:
        group["lr"] = cfg.base_lr
    losses = vae_loss_fn(vae, cfg, contextlib.nullcontext)
    gen = torch.Generator().manual_seed(1)
    history = []
    for i in range(steps):
        x = data.train[i * cfg.batch_size : (i + 1) * cfg.batch_size].to(device)
        eps = torch.randn(cfg.batch_size, cfg.latent_dim, generator=gen).to(device)
        stats, _ = vae_step(losses, x, eps, 1.0, cfg, optimizer)
        history.append(stats.tolist())
    return history, [p.detach().cpu() for p in vae.parameters()]


def test_fp32_steps_on_cuda_match_the_cpu(train_device: str) -> None:
    cuda_stats, cuda_params = _fp32_steps(torch.device(train_device), steps=10)
    cpu_stats, cpu_params = _fp32_steps(torch.device("cpu"), steps=10)
    names = train_module.VAE_STEP_STATS
    for step, (on_gpu, on_cpu) in enumerate(zip(cuda_stats, cpu_stats, strict=True)):
        for name, g, c in zip(names, on_gpu, on_cpu, strict=True):
            assert g == pytest.approx(c, rel=FP32_STEP_RTOL, abs=1e-6), (step, name)
    for g, c in zip(cuda_params, cpu_params, strict=True):
        torch.testing.assert_close(g, c, rtol=FP32_STEP_RTOL, atol=1e-5)


def test_fp32_runs_on_cuda_and_cpu_reach_the_same_validation_elbo(train_device: str) -> None:
    def run(device: str) -> TrainResult:
        return train({**SMALL, "device": device, "amp": "off", "seed": 0})

    on_gpu, on_cpu = run(train_device), run("cpu")
    gpu_val, cpu_val = on_gpu.metrics["val_neg_elbo"], on_cpu.metrics["val_neg_elbo"]
    assert gpu_val == pytest.approx(cpu_val, rel=FP32_RUN_RTOL)
    gpu_curve = [m.values["val_neg_elbo"] for m in on_gpu.history]
    assert gpu_curve[-1] < gpu_curve[0]  # it learned, as on the CPU
    assert statistics.fmean(gpu_curve) == pytest.approx(
        statistics.fmean(m.values["val_neg_elbo"] for m in on_cpu.history), rel=FP32_RUN_RTOL
    )
