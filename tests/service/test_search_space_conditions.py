"""Conditional parameters are sampled exactly when their parent uses them (issue 17's mutant:
``search_space._active`` always true — every child sampled — must fail here).

Pure: an in-memory Optuna study drives ``suggest``; no database is needed to decide this.
"""

from __future__ import annotations

from typing import Any

import optuna
import pytest

from hpo_service.schemas import StudySpec
from hpo_service.search_space import build_space, resolve_config, suggest

#: Child → (parent, the parent values under which the child has an effect).
CONDITIONS: dict[str, tuple[str, set[Any]]] = {
    "kl_warmup_epochs": ("kl_schedule", {"linear", "cosine", "sigmoid"}),
    "kl_cycles": ("kl_schedule", {"cyclical"}),
    "kl_ratio": ("kl_schedule", {"cyclical"}),
    "lr_half_cycle_epochs": ("lr_policy", {"triangular", "triangular2", "exp_range"}),
    "max_lr_factor": (
        "lr_policy",
        {"triangular", "triangular2", "exp_range", "cosine", "one_cycle"},
    ),
}


def _sample(spec: StudySpec, n: int, seed: int = 0) -> list[dict[str, Any]]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    space = build_space(spec)
    samples = []
    for _ in range(n):
        trial = study.ask()
        samples.append(suggest(trial, spec, space))
        study.tell(trial, 0.0)
    return samples


def test_children_are_sampled_exactly_when_their_parent_uses_them() -> None:
    spec = StudySpec(name="conditions", epochs=10)
    samples = _sample(spec, 80)
    for child, (parent, when) in CONDITIONS.items():
        with_child = [s for s in samples if child in s]
        without = [s for s in samples if child not in s]
        # Both branches occur in 80 random draws, so neither assertion below is vacuous.
        assert with_child and without, child
        assert all(s[parent] in when for s in with_child), child
        assert all(s[parent] not in when for s in without), child


def test_a_fixed_parent_decides_its_children() -> None:
    spec = StudySpec(name="fixed-parent", epochs=10, fixed={"kl_schedule": "constant"})
    for params in _sample(spec, 10):
        assert not {"kl_warmup_epochs", "kl_cycles", "kl_ratio"} & set(params)
        resolve_config(spec, params)  # still a valid config


@pytest.mark.parametrize("schedule", ["cyclical", "linear"])
def test_a_parent_left_at_its_default_decides_its_children(schedule: str) -> None:
    """A dropped parent falls back to ``TrainConfig``'s default (``linear``), or to the fixed
    value: cycle parameters follow it, not the space."""
    fixed = {} if schedule == "linear" else {"kl_schedule": schedule}
    spec = StudySpec(name="default-parent", epochs=10, drop=["kl_schedule"], fixed=fixed)
    for params in _sample(spec, 10):
        assert ("kl_cycles" in params) is (schedule == "cyclical")
        assert ("kl_warmup_epochs" in params) is (schedule == "linear")
