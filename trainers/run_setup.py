"""Setup of one training run: the config validated (``ConfigError`` naming the field), the
device resolved and the data loaded and checked against the batch size."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from pydantic import ValidationError

from trainers.config import TrainConfig
from trainers.data import Dataset, load_dataset
from trainers.errors import ConfigError


def parse_config(config: TrainConfig | Mapping[str, Any]) -> TrainConfig:
    """Validate a mapping into ``TrainConfig``; a pydantic error becomes ``ConfigError``.

    The field is the error's location, or for whole-model checks (``max_lr`` vs ``base_lr``)
    the first backticked name in the message.
    """
    if isinstance(config, TrainConfig):
        return config
    try:
        return TrainConfig.from_mapping(config)
    except ValidationError as e:
        errors = e.errors()
        first = errors[0]
        reason = str(first["msg"]).removeprefix("Value error, ")
        if first["loc"]:
            field = ".".join(str(part) for part in first["loc"])
        else:
            named = re.search(r"`([A-Za-z_][A-Za-z0-9_]*)`", reason)
            field = named.group(1) if named else "config"
        if len(errors) > 1:
            reason += f" (and {len(errors) - 1} more error(s))"
        raise ConfigError(field, reason) from e


def load_training_data(cfg: TrainConfig, device: torch.device) -> Dataset:
    """``load_dataset``, checked against the batch size (``ConfigError`` naming ``batch_size``)."""
    data = load_dataset(cfg, device)
    n_train = data.train.shape[0]
    if cfg.batch_size > n_train:
        raise ConfigError(
            "batch_size",
            f"larger than the training set of {cfg.dataset!r} ({cfg.batch_size} > {n_train})",
        )
    return data


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; otherwise the named device, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError("device", f"not a torch device: {name!r}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", f"{name!r} requested but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError("device", f"unsupported device type {device.type!r} (cpu or cuda)")
    return device
