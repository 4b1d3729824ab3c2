"""Mixed precision: where bf16 is native, whether a run uses it, and the autocast context."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch

from trainers.config import TrainConfig


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware: a CUDA GPU that supports bf16
    (Ampere and newer), or a CPU with AVX512-BF16 or AMX. Elsewhere bf16 is emulated and slower
    than fp32, so ``amp="auto"`` leaves it off."""
    if device.type == "cuda":
        # Compute capability 8.0 (Ampere) brought bf16 tensor cores; older GPUs emulate it.
        return bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        # torch.cpu's probes are underscored; a torch without them counts as no native bf16.
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)
    return False


def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """``amp="bf16"``: always; ``"auto"``: where the device has native bf16 (chosen by
    measurement, docs/benchmarks.md: on an AVX512-BF16 CPU the MLP VAE trains 1.7–1.8× faster
    than in fp32 and reaches the same test −ELBO and IS-NLL within seed noise); ``"off"``:
    never."""
    return cfg.amp == "bf16" or (cfg.amp == "auto" and native_bf16(device))


def amp_context(
    cfg: TrainConfig, device: torch.device
) -> Callable[[], AbstractContextManager[Any]]:
    """bf16 autocast around the forward pass when ``uses_bf16``; else a no-op.

    bf16 keeps fp32's exponent range, so no loss scaling is needed (unlike fp16). Weights,
    optimizer state, losses and every evaluation stay fp32.
    """
    enabled = uses_bf16(cfg, device)
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)
