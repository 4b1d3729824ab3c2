"""The population trainer: each fused member's numbers equal ``train()``'s on its config alone.

Tolerance (fp32, CPU): every per-epoch value within a relative 1e-5 (absolute 1e-6 near zero)
of the same config trained alone. The fused step differs from the single one only in the
rounding of batched against single matrix products (``baddbmm`` vs ``addmm``) and of the
reductions; measured worst case over these configs ≈ 3e-7 relative.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_vae_train import SMALL as TRAIN_SMALL

from trainers.config import TrainConfig
from trainers.errors import ConfigError, NonFiniteLossError
from trainers.optim import clip_gradients, clip_stacked_gradients
from trainers.population import Outcome, train_population
from trainers.population_stack import GROUP_FIELDS, group_configs, group_key, unfusable_reason
from trainers.train import Decision, EpochMetrics, TrainResult, train

#: test_vae_train's small run (digits, 11 steps per epoch), with a final IS-NLL, in fp32.
SMALL: dict[str, Any] = {
    **TRAIN_SMALL,
    "final_is_samples": 10,
    "final_is_examples": 50,
    "amp": "off",  # the equality is stated for fp32
}
TIMINGS = {"samples_per_sec", "epoch_seconds", "final_eval_seconds"}  # wall clock, not results
REL, ABS = 1e-5, 1e-6

#: Members that differ in everything per member: optimizer, LR schedule and its batch scaling,
#: β(t), free bits λ and mode, weight decay, norm and value clipping, seed, epochs. (Binarization
#: is a grouping field: binarized members evaluate on the fixed binarized splits.)
DIFFERENT: list[dict[str, Any]] = [
    {"seed": 1},
    {"seed": 2, "optimizer": "radam", "weight_decay": 0.1, "free_bits": 0.5,
     "grad_clip_norm": 2.0, "reference_batch_size": 64},
    {"seed": 3, "lr_policy": "one_cycle", "max_lr": 1e-2, "free_bits": 0.2,
     "free_bits_mode": "per_example_per_group", "kl_schedule": "sigmoid",
     "lr_scaling": "sqrt", "reference_batch_size": 256},
    {"seed": 4, "optimizer": "adam", "weight_decay": 1e-3, "lr_policy": "triangular",
     "max_lr": 5e-3, "lr_half_cycle_epochs": 1.0, "cycle_beta1": True, "kl_schedule": "cyclical",
     "kl_cycles": 2, "free_bits": 0.1, "free_bits_mode": "global", "grad_clip_value": 0.5,
     "lr_warmup_epochs": 0.5, "epochs": 2},
]  # fmt: skip


def config(device: str, **overrides: Any) -> dict[str, Any]:
    return {**SMALL, "device": device, **overrides}


def assert_same_run(fused: Outcome, alone: TrainResult) -> None:
    """Every per-epoch value, KL per dim and final metric of ``fused`` equals ``alone``'s."""
    assert isinstance(fused, TrainResult), fused
    assert [m.epoch for m in fused.history] == [m.epoch for m in alone.history]
    for f, a in zip(fused.history, alone.history, strict=True):
        assert set(f.values) == set(a.values)
        for name in set(a.values) - TIMINGS:
            assert f.values[name] == pytest.approx(a.values[name], rel=REL, abs=ABS), (
                f"epoch {a.epoch}: {name}"
            )
        assert f.kl_per_dim == pytest.approx(a.kl_per_dim, rel=REL, abs=ABS)
    assert set(fused.metrics) == set(alone.metrics)
    for name in set(alone.metrics) - TIMINGS:
        assert fused.metrics[name] == pytest.approx(alone.metrics[name], rel=REL, abs=ABS), name
    assert (fused.best_epoch, fused.epochs_run, fused.stopped_early) == (
        alone.best_epoch,
        alone.epochs_run,
        alone.stopped_early,
    )


def test_each_member_equals_train_alone_with_every_hyperparameter_different(
    train_device: str,
) -> None:
    configs = [config(train_device, **d) for d in DIFFERENT]
    fused = train_population(enumerate(configs))
    assert sorted(fused) == [0, 1, 2, 3]
    for i, cfg in enumerate(configs):
        assert_same_run(fused[i], train(cfg))
    # the members really differ: nothing above passes by all members being one run
    finals = {
        round(r.metrics["test_neg_elbo"], 3) for r in fused.values() if isinstance(r, TrainResult)
    }
    assert len(finals) == 4


def test_the_lr_and_beta_each_member_reports_are_its_own_schedule(train_device: str) -> None:
    slow, fast = config(train_device, base_lr=1e-4), config(train_device, base_lr=3e-3,
                                                            kl_warmup_epochs=3.0)  # fmt: skip
    fused = train_population([("slow", slow), ("fast", fast)])
    for key, cfg in (("slow", slow), ("fast", fast)):
        result = fused[key]
        assert isinstance(result, TrainResult)
        alone = train(cfg)
        assert [m.values["lr"] for m in result.history] == [m.values["lr"] for m in alone.history]
        assert [m.values["beta"] for m in result.history] == [
            m.values["beta"] for m in alone.history
        ]


def test_a_diverged_member_fails_alone_with_train_s_error_and_the_others_go_on(
    train_device: str,
) -> None:
    good = config(train_device, seed=5)
    diverging = config(train_device, base_lr=10.0, grad_clip_norm=0.0)
    with pytest.raises(NonFiniteLossError) as alone_error:
        train(diverging)
    fused = train_population([("good", good), ("bad", diverging), ("good2", config(train_device))])
    error = fused["bad"]
    assert isinstance(error, NonFiniteLossError)
    assert (error.epoch, error.step, error.term) == (
        alone_error.value.epoch,
        alone_error.value.step,
        alone_error.value.term,
    )
    assert_same_run(fused["good"], train(good))
    assert_same_run(fused["good2"], train(config(train_device)))


def test_a_bad_or_unfusable_config_ends_that_member_alone(train_device: str) -> None:
    fused = train_population(
        [
            ("ok", config(train_device)),
            ("too_big", config(train_device, batch_size=100_000)),
            ("conv", config(train_device, model="conv")),
            ("typo", config(train_device, base_lr="fast")),
        ]
    )
    assert_same_run(fused["ok"], train(config(train_device)))
    fields = {key: getattr(fused[key], "field", None) for key in ("too_big", "conv", "typo")}
    assert fields == {"too_big": "batch_size", "conv": "model", "typo": "base_lr"}
    assert all(isinstance(fused[k], ConfigError) for k in fields)


# --- pruning, stopping and refilling ------------------------------------------------------------


def test_a_pruned_member_leaves_and_a_refill_starts_at_its_own_epoch_1(train_device: str) -> None:
    """ "a" is pruned after epoch 1; at that epoch boundary "c" takes its slot and trains its
    own 3 epochs, with its own schedules from step 0, equal to ``train()`` alone."""
    a, b, c = (config(train_device, seed=s, lr_policy="one_cycle", max_lr=5e-3) for s in (1, 2, 3))
    reported: list[tuple[str, int]] = []
    waiting = [("c", c)]

    def on_epoch(key: Any, metrics: EpochMetrics) -> Decision:
        reported.append((key, metrics.epoch))
        return "stop" if key == "a" else "continue"

    fused = train_population(
        [("a", a), ("b", b)],
        on_epoch,
        capacity=2,
        refill=lambda: waiting.pop() if waiting else None,
    )
    assert reported == [("a", 1), ("b", 1), ("b", 2), ("c", 1), ("b", 3), ("c", 2), ("c", 3)]
    pruned = fused["a"]
    assert isinstance(pruned, TrainResult) and pruned.stopped_early and pruned.epochs_run == 1
    assert "test_neg_elbo" not in pruned.metrics  # a stopped trial is not evaluated on test
    assert_same_run(fused["b"], train(b))
    assert_same_run(fused["c"], train(c))
    stopped_alone = train(a, lambda m: "stop")
    assert_same_run(pruned, stopped_alone)


def test_a_cancelled_member_leaves_mid_epoch_and_the_rest_are_unchanged(train_device: str) -> None:
    calls = {"n": 0}

    def should_leave(key: Any) -> bool:
        if key == "gone":
            calls["n"] += 1
            return calls["n"] > 5  # leave before the 6th step of epoch 1
        return False

    done: list[Any] = []
    stay = config(train_device, seed=7)
    fused = train_population(
        [("gone", config(train_device)), ("stay", stay)],
        should_leave=should_leave,
        on_done=lambda key, outcome: done.append(key),
    )
    gone = fused["gone"]
    assert isinstance(gone, TrainResult) and gone.stopped_early and gone.epochs_run == 0
    assert calls["n"] == 6  # asked before every step until it left, never after
    assert done == ["gone", "stay"]  # settled at once, not when the population ends
    assert_same_run(fused["stay"], train(stay))


# --- the grouping rule --------------------------------------------------------------------------

#: One changed value per grouping field.
OTHER_VALUE: dict[str, Any] = {
    "dataset": "synthetic",
    "data_dir": "/data",
    "synthetic_size": 64,
    "model": "vaegan",
    "hidden_sizes": (64,),
    "latent_dim": 8,
    "activation": "gelu",
    "likelihood": "gaussian",
    "gaussian_std": 0.2,
    "batch_size": 64,
    "binarize": True,
}


@pytest.mark.parametrize("name", GROUP_FIELDS)
def test_members_that_differ_in_a_grouping_field_do_not_share_a_step(name: str) -> None:
    base = TrainConfig.from_mapping(config("cpu"))
    other = TrainConfig.from_mapping(config("cpu", **{name: OTHER_VALUE[name]}))
    assert group_key(base) != group_key(other)


def test_members_that_differ_only_per_member_share_a_step() -> None:
    configs = [TrainConfig.from_mapping(config("cpu", **d)) for d in DIFFERENT]
    assert len({group_key(c) for c in configs}) == 1
    bf16 = TrainConfig.from_mapping(config("cpu", amp="bf16"))
    assert group_key(bf16) != group_key(configs[0])  # bf16 and fp32 never share a forward


def test_group_configs_splits_by_batch_size_and_leaves_unfusable_configs_out() -> None:
    configs = [
        TrainConfig.from_mapping(config("cpu", **o))
        for o in ({}, {"batch_size": 64}, {"seed": 3}, {"model": "vaegan"}, {"compile": True})
    ]
    assert list(group_configs(configs).values()) == [[0, 2], [1]]
    assert unfusable_reason(configs[3]) and unfusable_reason(configs[4])
    assert unfusable_reason(configs[0]) is None


def test_two_groups_train_side_by_side_each_equal_to_alone(train_device: str) -> None:
    at_128 = config(train_device, epochs=2)
    at_64 = config(train_device, epochs=2, batch_size=64, seed=9)
    fused = train_population([("128", at_128), ("64", at_64)])
    assert_same_run(fused["128"], train(at_128))
    assert_same_run(fused["64"], train(at_64))


# --- patience inside the population ------------------------------------------------------------


def test_patience_ends_a_plateaued_member_alone_and_the_others_go_on(
    train_device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ "flat" stops improving after epoch 2 and leaves at epoch 4 (patience 2), evaluated on the
    test set as ``train(patience=2)`` alone; "better" improves every epoch and runs all 6."""
    import trainers.population as population
    import trainers.train as single

    scripts = {1: [10.0, 9.0, 9.5, 9.6, 9.7, 9.8], 2: [10.0, 9.0, 8.0, 7.0, 6.0, 5.0]}
    real = single.validate

    def scripted(vae: Any, x: Any, cfg: TrainConfig, *args: Any) -> Any:
        val, kl = real(vae, x, cfg, *args)
        val["val_neg_elbo"] = scripts[cfg.seed][args[1] - 1]  # args: device, epoch, step
        return val, kl

    monkeypatch.setattr(population, "validate", scripted)
    monkeypatch.setattr(single, "validate", scripted)
    flat, better = (config(train_device, seed=s, epochs=6) for s in (1, 2))
    reported: list[tuple[str, int]] = []

    def on_epoch(key: Any, metrics: EpochMetrics) -> Decision:
        reported.append((key, metrics.epoch))
        return "continue"

    fused = train_population([("flat", flat), ("better", better)], on_epoch, patience=2)
    plateau = fused["flat"]
    assert isinstance(plateau, TrainResult)
    assert (plateau.epochs_run, plateau.best_epoch, plateau.plateaued) == (4, 2, True)
    assert not plateau.stopped_early and "test_neg_elbo" in plateau.metrics
    assert [e for k, e in reported if k == "flat"] == [1, 2, 3, 4]
    assert [e for k, e in reported if k == "better"] == [1, 2, 3, 4, 5, 6]
    for key, cfg in (("flat", flat), ("better", better)):
        alone = train(cfg, patience=2)
        assert_same_run(fused[key], alone)
        outcome = fused[key]
        assert isinstance(outcome, TrainResult) and outcome.plateaued == alone.plateaued


def test_patience_must_be_a_positive_number_of_epochs_in_the_population(train_device: str) -> None:
    with pytest.raises(ConfigError) as info:
        train_population([("a", config(train_device))], patience=0)
    assert info.value.field == "patience"


def test_stacked_clipping_clips_each_member_as_clip_gradients_does_alone() -> None:
    """Norm clip on, off and never reached, value clip on one member: each member's clipped
    gradients, pre-clip norm and fired flag equal ``clip_gradients`` on that member alone."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 5, 4), (3, 1, 5), (3, 6)]
    grads = [torch.randn(*s, generator=gen) * 3 for s in shapes]
    max_norms, max_values = [2.0, 0.0, 1e6], [0.0, 0.5, 0.0]
    expected = []
    for k in range(3):
        params = [torch.nn.Parameter(torch.zeros(g.shape[1:])) for g in grads]
        for p, g in zip(params, grads, strict=True):
            p.grad = g[k].clone()
        norm, fired = clip_gradients(params, max_norms[k], max_values[k])  # type: ignore[arg-type]
        expected.append((norm, fired, [p.grad for p in params]))
    norms, fired = clip_stacked_gradients(grads, max_norms, max_values)
    for k, (norm, was_fired, clipped) in enumerate(expected):
        assert norms[k] == pytest.approx(norm.item(), rel=1e-6)
        assert fired[k].item() == was_fired.item()
        for g, alone in zip(grads, clipped, strict=True):
            assert torch.allclose(g[k], alone, rtol=1e-6, atol=1e-7)
    assert fired.tolist() == [1.0, 1.0, 0.0]  # norm 2 fired, value 0.5 fired, 1e6 never
    assert grads[2][1].abs().max() <= 0.5  # member 1 clamped by value only


def _member_rows(shapes: list[tuple[int, ...]], rows: list[Any]) -> list[torch.Tensor]:
    """Stacked gradients of ``shapes`` (K first) whose member k is ``rows[k](shape)``."""
    return [torch.stack([make(s[1:]) for make in rows]) for s in shapes]


@pytest.mark.parametrize(
    ("max_norms", "max_values", "fired_by_member"),
    [
        # norm thresholds at most 1, a member with both clips off, gradients far below 1 (so
        # the 1e-6 beside the norm matters at the tolerance below)
        ([1e-4, 0.0, 0.5], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]),
        # value clips only: member 0's peak is far above member 1's limit, member 1's L2 norm
        # is above its own limit but no element is (a value clip reads each member's peak)
        ([0.0, 0.0, 0.0], [0.0, 10.0, 0.3], [0.0, 0.0, 1.0]),
    ],
    ids=["small-norms", "values-only"],
)
def test_stacked_clipping_reads_each_member_s_own_norm_and_peak(
    max_norms: list[float], max_values: list[float], fired_by_member: list[float]
) -> None:
    gen = torch.Generator().manual_seed(1)
    shapes = [(3, 40, 25), (3, 7)]
    small = max_norms[0] > 0
    rows = [
        lambda s: torch.randn(*s, generator=gen) * (1e-4 if small else 100.0),
        lambda s: 0.5 * torch.randn(*s, generator=gen).sign(),  # 1007 elements of ±0.5
        lambda s: torch.randn(*s, generator=gen) * (1e-3 if small else 1.0),
    ]
    grads = _member_rows(shapes, rows)
    expected = []
    for k in range(3):
        params = [torch.nn.Parameter(torch.zeros(g.shape[1:])) for g in grads]
        for p, g in zip(params, grads, strict=True):
            p.grad = g[k].clone()
        norm, fired = clip_gradients(params, max_norms[k], max_values[k])  # type: ignore[arg-type]
        expected.append((norm.item(), fired.item(), [p.grad for p in params]))
    norms, fired = clip_stacked_gradients(grads, max_norms, max_values)
    assert fired.tolist() == [e[1] for e in expected] == fired_by_member
    for k, (norm, _, clipped) in enumerate(expected):
        assert norms[k].item() == pytest.approx(norm, rel=1e-6)
        for g, alone in zip(grads, clipped, strict=True):
            # no absolute slack: the clipped values are ~1e-6 here
            assert torch.allclose(g[k], alone, rtol=1e-5, atol=0.0)
