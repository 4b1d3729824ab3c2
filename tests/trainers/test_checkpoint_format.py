"""Checkpoints of a training run (issue 14): a run resumed from epoch E ends where the
uninterrupted run ends; bad bytes raise ``CheckpointError`` instead of training on garbage."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from trainers.checkpoints import (
    best_model_bytes,
    digest,
    from_bytes,
    load_best_model,
    to_bytes,
)
from trainers.errors import CheckpointError
from trainers.train import Decision, EpochMetrics, train

#: Tiny but not trivial: a cyclical LR schedule, KL warm-up across the checkpoint, patience
#: state and an IS-NLL at the end, so a resume that lost any of them shows.
RUN: dict[str, Any] = {
    "dataset": "digits",
    "model": "mlp",
    "hidden_sizes": (32, 16),
    "latent_dim": 4,
    "epochs": 6,
    "batch_size": 256,
    "kl_warmup_epochs": 4.0,
    "binarize": True,
    "lr_policy": "one_cycle",
    "max_lr": 0.01,
    "amp": "off",
    "final_is_samples": 20,
    "final_is_examples": 100,
    "active_unit_examples": 180,
    "seed": 11,
}
#: Values that depend on wall time, not on the maths.
TIMED = {"samples_per_sec", "epoch_seconds", "final_eval_seconds"}


def _checkpoint_at(epoch: int, store: dict[int, bytes]) -> Any:
    def on_epoch(metrics: EpochMetrics) -> Decision:
        assert metrics.checkpoint is not None
        if metrics.epoch == epoch:
            store[epoch] = to_bytes(metrics.checkpoint())
        return "continue"

    return on_epoch


def _untimed(values: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in values.items() if k not in TIMED}


def test_a_run_resumed_from_epoch_4_equals_the_uninterrupted_run(train_device: str) -> None:
    config = {**RUN, "device": train_device}
    saved: dict[int, bytes] = {}
    whole = train(config, _checkpoint_at(4, saved))
    resumed_epochs: list[int] = []

    def record(metrics: EpochMetrics) -> Decision:
        resumed_epochs.append(metrics.epoch)
        return "continue"

    resumed = train(config, record, resume=from_bytes(saved[4], digest(saved[4])))
    assert resumed_epochs == [5, 6]  # the epoch count continues
    assert len(resumed.history) == 6 and resumed.epochs_run == 6
    for a, b in zip(whole.history, resumed.history, strict=True):
        assert _untimed(a.values) == pytest.approx(_untimed(b.values), rel=1e-6, abs=1e-9)
    assert _untimed(resumed.metrics) == pytest.approx(_untimed(whole.metrics), rel=1e-6, abs=1e-9)
    assert resumed.best_epoch == whole.best_epoch
    assert "test_is_nll" in resumed.metrics


def test_patience_counts_across_a_resume(train_device: str) -> None:
    # With a patience the run may end early; the resumed run must end at the same epoch.
    config = {**RUN, "device": train_device, "epochs": 12, "lr_policy": "constant", "base_lr": 0.05}
    saved: dict[int, bytes] = {}

    def every_epoch(metrics: EpochMetrics) -> Decision:
        assert metrics.checkpoint is not None
        saved[metrics.epoch] = to_bytes(metrics.checkpoint())
        return "continue"

    whole = train(config, every_epoch, patience=2)
    assert whole.plateaued and whole.epochs_run < 12  # the test needs a run that plateaus
    # One epoch before the end, after the best: the resumed run never finds a new best, so the
    # model it selects and evaluates on the test set is the checkpoint's best model.
    resume_at = whole.epochs_run - 1
    assert whole.best_epoch < resume_at
    resumed = train(config, None, patience=2, resume=from_bytes(saved[resume_at]))
    assert resumed.epochs_run == whole.epochs_run
    assert resumed.plateaued == whole.plateaued
    assert resumed.best_epoch == whole.best_epoch
    assert _untimed(resumed.metrics) == pytest.approx(_untimed(whole.metrics), rel=1e-6, abs=1e-9)
    assert "test_is_nll" in resumed.metrics


@pytest.fixture(scope="module")
def epoch_1() -> bytes:
    """A good checkpoint of epoch 1 of a 2-epoch run (trained once for the tests below)."""
    saved: dict[int, bytes] = {}
    train(
        {**RUN, "epochs": 2, "kl_warmup_epochs": 1.0, "final_is_samples": 0},
        _checkpoint_at(1, saved),
    )
    return saved[1]


@pytest.mark.parametrize(
    "damage",
    [lambda b: b[: len(b) // 2], lambda b: b"not a checkpoint at all", lambda b: b[:-100]],
    ids=["truncated", "garbage", "tail-cut"],
)
def test_damaged_bytes_raise_checkpoint_error(damage: Any, epoch_1: bytes) -> None:
    good = epoch_1
    with pytest.raises(CheckpointError, match="SHA-256"):
        from_bytes(damage(good), digest(good))
    with pytest.raises(CheckpointError, match="unreadable"):  # no digest: the loader refuses
        from_bytes(damage(good))


def test_a_flipped_byte_is_caught_by_the_digest(epoch_1: bytes) -> None:
    flipped = bytearray(epoch_1)
    flipped[len(flipped) // 2] ^= 0xFF
    with pytest.raises(CheckpointError, match="SHA-256"):
        from_bytes(bytes(flipped), digest(epoch_1))


def test_a_checkpoint_of_another_architecture_does_not_fit(epoch_1: bytes) -> None:
    with pytest.raises(CheckpointError, match="does not fit"):
        train({**RUN, "hidden_sizes": (8,), "final_is_samples": 0}, resume=from_bytes(epoch_1))


def test_the_best_model_round_trips() -> None:
    result = train({**RUN, "epochs": 2, "kl_warmup_epochs": 1.0, "final_is_samples": 0})
    assert result.best_state is not None
    weights, epoch = load_best_model(best_model_bytes(result.best_state, result.best_epoch))
    assert epoch == result.best_epoch
    assert set(weights) == set(result.best_state)
    assert all(torch.equal(weights[k], result.best_state[k].cpu()) for k in weights)


# --- a population member's checkpoint is a single-trial checkpoint (issue 14, resume14.5) ------


def _population_checkpoint(config: dict[str, Any], epoch: int) -> tuple[bytes, Any]:
    """Member "a" (``config``) trained beside a second member; its checkpoint of ``epoch``."""
    from trainers.population import train_population

    saved: dict[int, bytes] = {}

    def on_epoch(key: Any, metrics: EpochMetrics) -> Decision:
        assert metrics.checkpoint is not None
        if key == "a" and metrics.epoch == epoch:
            saved[epoch] = to_bytes(metrics.checkpoint())
        return "continue"

    outcomes = train_population([("a", config), ("b", {**config, "seed": 12})], on_epoch)
    return saved[epoch], outcomes["a"]


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for key in sorted(value, key=str) for t in _tensors(value[key])]
    if isinstance(value, list | tuple):
        return [t for item in value for t in _tensors(item)]
    return []


def test_a_population_members_checkpoint_is_the_single_trials(train_device: str) -> None:
    config = {**RUN, "device": train_device}
    alone: dict[int, bytes] = {}
    whole = train(config, _checkpoint_at(4, alone))
    member_bytes, member = _population_checkpoint(config, 4)
    # One member's own weights, not the stacked storage of both (torch.save writes a view's
    # whole storage): the same size as the single trial's, to a few bytes of zip framing.
    assert abs(len(member_bytes) - len(alone[4])) < 0.01 * len(alone[4]), (
        len(member_bytes),
        len(alone[4]),
    )
    ours, theirs = from_bytes(member_bytes), from_bytes(alone[4])
    assert (ours.epoch, ours.step) == (theirs.epoch, theirs.step)
    assert ours.best[1] == theirs.best[1] and ours.best[0] == pytest.approx(theirs.best[0])
    assert ours.model.keys() == theirs.model.keys()
    assert len(ours.history) == len(theirs.history) == 4
    assert torch.equal(ours.generator, theirs.generator)  # the same data order to come
    for name in ("model", "optimizers", "best_state"):
        a, b = _tensors(getattr(ours, name)), _tensors(getattr(theirs, name))
        assert len(a) == len(b) > 0, name
        for x, y in zip(a, b, strict=True):
            assert x.shape == y.shape and torch.allclose(x, y, rtol=1e-5, atol=1e-6), name
    # ...so the single-trial loop resumes it and ends where both uninterrupted runs end.
    resumed = train(config, resume=ours)
    assert _untimed(resumed.metrics) == pytest.approx(_untimed(whole.metrics), rel=1e-5, abs=1e-6)
    assert _untimed(member.metrics) == pytest.approx(_untimed(whole.metrics), rel=1e-5, abs=1e-6)
    assert member.best_state is not None  # what the worker sends as the kept best model


def test_a_population_member_resumes_from_a_single_trials_checkpoint(train_device: str) -> None:
    from trainers.population import Resume, train_population

    config = {**RUN, "device": train_device}
    alone: dict[int, bytes] = {}
    whole = train(config, _checkpoint_at(4, alone))
    said: list[tuple[Any, int | None, str | None]] = []
    epochs: list[tuple[Any, int]] = []

    def on_epoch(key: Any, metrics: EpochMetrics) -> Decision:
        epochs.append((key, metrics.epoch))
        return "continue"

    resume = Resume(
        state_of=lambda key: from_bytes(alone[4]) if key == "retry" else None,
        started=lambda key, epoch, reason: said.append((key, epoch, reason)),
    )
    outcomes = train_population(
        [("retry", config), ("fresh", {**config, "seed": 12})], on_epoch, resume=resume
    )
    assert said == [("retry", 4, None)]  # told before its first epoch; "fresh" had none
    assert [e for k, e in epochs if k == "retry"] == [5, 6]  # the epoch count continues
    assert [e for k, e in epochs if k == "fresh"] == [1, 2, 3, 4, 5, 6]
    retry = outcomes["retry"]
    assert not isinstance(retry, Exception) and len(retry.history) == 6
    assert _untimed(retry.metrics) == pytest.approx(_untimed(whole.metrics), rel=1e-5, abs=1e-6)


def test_a_checkpoint_that_does_not_fit_a_member_starts_it_fresh_and_says_so() -> None:
    from trainers.population import Resume, train_population

    config = {**RUN, "device": "cpu", "epochs": 3, "kl_warmup_epochs": 1.0}
    alone: dict[int, bytes] = {}
    train({**config, "hidden_sizes": (16,)}, _checkpoint_at(1, alone))  # another architecture
    said: list[tuple[Any, int | None, str | None]] = []
    resume = Resume(lambda key: from_bytes(alone[1]), lambda *told: said.append(told))
    outcomes = train_population([("m", config)], resume=resume)
    ((key, epoch, reason),) = said
    assert key == "m" and epoch is None and "does not fit" in str(reason)
    fresh = train(config)
    result = outcomes["m"]
    assert not isinstance(result, Exception)
    assert _untimed(result.metrics) == pytest.approx(_untimed(fresh.metrics), rel=1e-5, abs=1e-6)
