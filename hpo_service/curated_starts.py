"""Known-good VAE configurations a study can try first (``curated_starts: true``).

A small budget (16–64 trials) cannot afford ten random start-up trials before the sampler
learns anything (issue 10: with 16 trials TPE chose only 5–6 itself). Configurations that are
known to train a VAE well are a better start than random ones; each below names its source.
They are written in the default space's terms and **adapted to the study**:

- LRs are given at the reference batch size (128, as the sources use); the trainer scales them
  to the trial's batch size (``lr_scaling``), so the batch size is free to be the study's;
- warm-up lengths are fractions of the run (a 5-epoch warm-up in a 10-epoch study is half the
  run), cycle counts are capped by the number of epochs;
- a value outside the study's space, a parameter the study does not search, or one its parent
  does not use (a cycle count under a fixed constant schedule) is left out — the sampler picks
  it; a configuration that became a duplicate, or is not a valid training config, is skipped.

Sources:
- ``pytorch-examples``: pytorch/examples ``vae/main.py`` — Adam, LR 1e-3, batch 128, β = 1 from
  the start (no annealing), no clipping.
- ``bowman-warmup``: Bowman et al. 2016 (Generating Sentences from a Continuous Space), KL
  annealing from 0 to 1 — here linear over the first quarter of the run (Sønderby et al. 2016
  use a linear warm-up too) with Adam at 1e-3.
- ``fu-cyclical``: Fu et al. 2019 (Cyclical Annealing Schedule), their defaults M = 4 cycles,
  R = 0.5, with Adam at 1e-3.
- ``one-cycle``: Smith & Topin 2017 (Super-Convergence) one-cycle LR, peak 10× the base
  (torch's ``OneCycleLR`` starts at max/25; here base 1e-3, peak 1e-2 at the reference batch),
  with a linear KL warm-up over the first quarter of the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hpo_service.errors import InvalidSpec
from hpo_service.schemas import ParamValue, StudySpec
from hpo_service.search_space import Param, is_active, resolve_config

#: The user attribute naming the source of an enqueued curated configuration.
SOURCE_ATTR = "curated_start"


def _starts(epochs: int) -> list[tuple[str, dict[str, ParamValue]]]:
    """The curated configurations for a run of ``epochs`` epochs, in the order they run."""
    quarter = max(epochs / 4, 0.0)
    common: dict[str, ParamValue] = {
        "optimizer": "adamw",
        "weight_decay": 1e-6,  # the space's floor: Adam without decay, as the sources train
        "base_lr": 1e-3,
        "batch_size": 128,
        "free_bits": 0.0,
        "lr_warmup_epochs": 0.0,
        "grad_clip_norm": 100.0,  # the space's ceiling: as good as no clipping, as the sources
    }
    return [
        (
            "pytorch-examples",
            {**common, "kl_schedule": "constant", "lr_policy": "constant"},
        ),
        (
            "bowman-warmup",
            {
                **common,
                "kl_schedule": "linear",
                "kl_warmup_epochs": quarter,
                "lr_policy": "constant",
            },
        ),
        (
            "fu-cyclical",
            {
                **common,
                "kl_schedule": "cyclical",
                "kl_cycles": max(1, min(4, epochs)),
                "kl_ratio": 0.5,
                "lr_policy": "constant",
            },
        ),
        (
            "one-cycle",
            {
                **common,
                "kl_schedule": "linear",
                "kl_warmup_epochs": quarter,
                "lr_policy": "one_cycle",
                "max_lr_factor": 10.0,
            },
        ),
    ]


def curated_starts(spec: StudySpec, space: Sequence[Param]) -> list[tuple[str, dict[str, Any]]]:
    """(source, parameters) of each curated configuration, fitted to ``spec`` and its space."""
    fitted: list[tuple[str, dict[str, Any]]] = []
    seen: set[tuple[tuple[str, Any], ...]] = set()
    for source, values in _starts(spec.epochs):
        params: dict[str, Any] = {}
        for param in space:  # in sampling order, so a parent is decided before its children
            value = values.get(param.name)
            if value is not None and param.contains(value) and is_active(param, params, spec):
                params[param.name] = value
        key = tuple(sorted(params.items()))
        if not params or key in seen:
            continue
        try:
            resolve_config(spec, params)
        except InvalidSpec:
            continue  # e.g. a fixed setting the configuration cannot be combined with
        seen.add(key)
        fitted.append((source, params))
    return fitted
