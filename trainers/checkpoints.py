"""A training run's checkpoint: everything a resumed run needs to continue exactly (issue 14).

A checkpoint is taken at the end of an epoch, after validation and model selection, and holds:
the model's and every optimizer's state, the global step (the LR and β schedules are pure
functions of it), the run's ``torch.Generator`` state (data order, binarization, posterior
noise) and the global torch RNG state, the best-so-far validation −ELBO with its epoch and
active units (the patience counter is ``epoch - best_epoch``), the best model's state and the
per-epoch history. Restored into a freshly built run with the same config, training continues
with the same random numbers and the same float operations: on the same device the resumed
run's numbers equal an uninterrupted run's.

The bytes are ``torch.save`` of plain tensors, numbers, strings, lists and dicts, read back with
``torch.load(weights_only=True)``: a checkpoint from the server cannot run code on the worker.
A SHA-256 of the bytes travels beside them; bytes that do not match, do not load, or do not fit
the run raise ``CheckpointError`` and the worker starts fresh instead.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from trainers.errors import CheckpointError

if TYPE_CHECKING:  # trainers.train imports this module
    from trainers.train import EpochMetrics

#: Version of the byte layout; a checkpoint of another version is refused (fresh start).
CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class TrainState:
    """A run as it stood at the end of ``epoch`` (1-based; ``step`` optimizer steps done)."""

    epoch: int
    step: int
    model: Mapping[str, torch.Tensor]
    optimizers: Sequence[Mapping[str, Any]]
    generator: torch.Tensor  # the run's torch.Generator state (a CPU uint8 tensor)
    torch_rng: torch.Tensor  # torch.get_rng_state()
    best: tuple[float, int, float]  # best validation −ELBO (nats/example), its epoch, its AU
    best_state: Mapping[str, torch.Tensor]  # the VAE's state at the best epoch
    history: Sequence[Mapping[str, Any]]  # per epoch: {"epoch", "values", "kl_per_dim"}


def capture(
    epoch: int,
    step: int,
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    generator: torch.Generator,
    best: tuple[float, int, float],
    best_state: Mapping[str, torch.Tensor],
    history: Sequence[EpochMetrics],
) -> TrainState:
    """The run's state now. Tensors are referenced, not copied: serialize it (``to_bytes``)
    before the next optimizer step."""
    return TrainState(
        epoch=epoch,
        step=step,
        model=model.state_dict(),
        optimizers=[opt.state_dict() for opt in optimizers],
        generator=generator.get_state(),
        torch_rng=torch.get_rng_state(),
        best=best,
        best_state=best_state,
        history=[
            {"epoch": e.epoch, "values": dict(e.values), "kl_per_dim": list(e.kl_per_dim)}
            for e in history
        ],
    )


def to_bytes(state: TrainState) -> bytes:
    """The checkpoint's bytes (``torch.save``; tensors moved to the CPU)."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "epoch": state.epoch,
        "step": state.step,
        "model": _cpu(state.model),
        "optimizers": [_cpu_nested(o) for o in state.optimizers],
        "generator": state.generator.cpu(),
        "torch_rng": state.torch_rng.cpu(),
        "best": list(state.best),
        "best_state": _cpu(state.best_state),
        "history": list(state.history),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def digest(content: bytes) -> str:
    """The SHA-256 (hex) that travels with a checkpoint's bytes."""
    return hashlib.sha256(content).hexdigest()


def from_bytes(content: bytes, sha256: str | None = None) -> TrainState:
    """Read a checkpoint back. Raises ``CheckpointError`` (naming what is wrong) when the bytes
    do not match ``sha256``, do not load, or are not a checkpoint of this format."""
    if sha256 is not None and digest(content) != sha256:
        raise CheckpointError(f"SHA-256 mismatch ({len(content)} bytes; expected {sha256[:12]}…)")
    try:
        raw = torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises RuntimeError, pickle/zip errors, EOFError…
        raise CheckpointError(f"unreadable: {type(error).__name__}: {error}") from error
    if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f"not a format-{CHECKPOINT_FORMAT} checkpoint (found {found!r})")
    try:
        best_val, best_epoch, best_au = raw["best"]
        return TrainState(
            epoch=int(raw["epoch"]),
            step=int(raw["step"]),
            model=raw["model"],
            optimizers=list(raw["optimizers"]),
            generator=raw["generator"],
            torch_rng=raw["torch_rng"],
            best=(float(best_val), int(best_epoch), float(best_au)),
            best_state=raw["best_state"],
            history=list(raw["history"]),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"incomplete: {type(error).__name__}: {error}") from error


def restore(
    state: TrainState,
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    generator: torch.Generator,
    device: torch.device,
    epochs: int,
) -> dict[str, torch.Tensor]:
    """Load ``state`` into a freshly built run (model, optimizers, generator, global RNG) of
    ``epochs`` epochs; returns the best model's state on ``device``. Raises ``CheckpointError``
    when it does not fit this run (another architecture, optimizer count, or epoch range)."""
    if not 1 <= state.epoch < epochs:
        raise CheckpointError(f"epoch {state.epoch} is outside this run's 1..{epochs - 1}")
    if len(state.history) != state.epoch:
        raise CheckpointError(f"{len(state.history)} epochs of history for epoch {state.epoch}")
    if len(state.optimizers) != len(optimizers):
        raise CheckpointError(
            f"{len(state.optimizers)} optimizer state(s) for {len(optimizers)} optimizer(s)"
        )
    try:
        model.load_state_dict(dict(state.model))
        for optimizer, saved in zip(optimizers, state.optimizers, strict=True):
            optimizer.load_state_dict(dict(saved))
        generator.set_state(state.generator)
        torch.set_rng_state(state.torch_rng)
        return {name: value.to(device) for name, value in state.best_state.items()}
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"does not fit this run: {error}") from error


def best_model_bytes(best_state: Mapping[str, torch.Tensor], best_epoch: int) -> bytes:
    """The selected (best validation −ELBO) model's weights alone, what a finished trial keeps
    for the final evaluation of the winners (``load_best_model``)."""
    buffer = io.BytesIO()
    torch.save(
        {"format": CHECKPOINT_FORMAT, "best_epoch": best_epoch, "model": _cpu(best_state)}, buffer
    )
    return buffer.getvalue()


def load_best_model(
    content: bytes, sha256: str | None = None
) -> tuple[dict[str, torch.Tensor], int]:
    """The weights and epoch ``best_model_bytes`` wrote; raises ``CheckpointError``."""
    if sha256 is not None and digest(content) != sha256:
        raise CheckpointError(f"SHA-256 mismatch ({len(content)} bytes)")
    try:
        raw = torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)
        return dict(raw["model"]), int(raw["best_epoch"])
    except Exception as error:
        raise CheckpointError(f"unreadable best model: {type(error).__name__}: {error}") from error


def _own(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on the CPU, holding only its own elements. A population member's weights
    are views of rows of the stacked ``(K, …)`` storage (``trainers.population_stack``), and
    ``torch.save`` writes a view's whole storage: without the copy one member's checkpoint
    would hold all K members' weights, and differ from the single-trial worker's."""
    cpu = tensor.detach().cpu()
    if cpu.untyped_storage().nbytes() != cpu.numel() * cpu.element_size():
        return cpu.clone()
    return cpu


def _cpu(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: _own(value) for name, value in tensors.items()}


def _cpu_nested(value: Any) -> Any:
    """An optimizer's state dict with every tensor on the CPU (numbers and lists kept)."""
    if isinstance(value, torch.Tensor):
        return _own(value)
    if isinstance(value, Mapping):
        return {key: _cpu_nested(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_cpu_nested(item) for item in value]
    return value
