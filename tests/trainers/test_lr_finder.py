"""The LR range test: ramp, smoothing, suggestions by hand; state restore and divergence on data."""

from __future__ import annotations

import itertools
import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
import torch

import trainers.steps as steps_module
from trainers.errors import ConfigError
from trainers.lr_finder import (
    LRFinderResult,
    debiased_ema,
    exponential_lrs,
    find_lr,
    plot_lr_finder,
    range_test,
    smith_range,
    suggest_steepest,
    suggest_valley,
)

DIGITS: dict[str, Any] = {
    "dataset": "digits",
    "hidden_sizes": (32,),
    "latent_dim": 4,
    "batch_size": 64,
    "epochs": 2,
    "kl_warmup_epochs": 1.0,
}


# --- pure pieces ------------------------------------------------------------------------------


def test_exponential_ramp_hits_both_ends_with_a_constant_ratio() -> None:
    lrs = exponential_lrs(1e-4, 1.0, 5)
    assert lrs[0] == 1e-4 and math.isclose(lrs[-1], 1.0)
    for a, b in itertools.pairwise(lrs):
        assert math.isclose(b / a, 10.0)  # (1/1e-4)^(1/4)


def test_debiased_ema_starts_at_the_first_loss() -> None:
    out = debiased_ema([10.0, 4.0], 0.98)
    assert math.isclose(out[0], 10.0)  # (0.02·10)/(1 − 0.98): no pull towards 0
    # (0.98·0.2 + 0.02·4)/(1 − 0.98²) = 0.276/0.0396
    assert math.isclose(out[1], 0.276 / 0.0396)


def test_steepest_is_the_left_end_of_the_most_negative_log_slope() -> None:
    lrs = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]  # equal log steps: slopes ∝ loss differences
    losses = [10.0, 9.0, 5.0, 4.0, 8.0]  # drops: −1, −4, −1, +4
    assert suggest_steepest(lrs, losses) == 1e-2 / 10  # segment 1→2 starts at lrs[1]


def test_valley_follows_fastai() -> None:
    # longest strictly decreasing run ends at index 6 (5 > 4 > 3 > 2 > 1, length 5);
    # fastai: start = 6 − 5 = 1, d = 5, idx = 1 + ⌊5/3⌋ + ⌊5/6⌋ = 2
    losses = [5.0, 4.0, 6.0, 3.0, 2.0, 7.0, 1.0, 8.0]
    lrs = [float(i + 1) for i in range(len(losses))]
    assert suggest_valley(lrs, losses) == 3.0
    # a straight descent of 10 points: start = 9 − 10 → clamped to 0, idx = 0 + 3 + 1
    assert suggest_valley([*lrs, 9.0, 10.0], [10.0 - i for i in range(10)]) == 5.0


def _known_curve(noise: float, seed: int = 0) -> tuple[list[float], list[float]]:
    """Smith 2017's picture with a known answer: flat at 10 up to 1e-4, falling linearly in
    log LR to 2 at 1e-2, then exploding (×1.5 per point); seeded Gaussian noise."""
    import random

    rng = random.Random(seed)
    lrs = exponential_lrs(1e-6, 1.0, 120)
    losses, last = [], 10.0
    for lr in lrs:
        x = math.log10(lr)
        if x <= -4:
            loss = 10.0
        elif x <= -2:
            loss = 10.0 - 8.0 * (x + 4) / 2
        else:
            last *= 1.5
            loss = 2.0 + last - 10.0
        losses.append(loss + rng.gauss(0.0, noise))
    return lrs, losses


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_smith_range_finds_where_the_loss_starts_and_stops_falling(seed: int) -> None:
    lrs, losses = _known_curve(noise=0.3, seed=seed)
    picked = smith_range(lrs, losses, lrs[0])
    assert picked is not None
    base, peak = picked
    # The fall starts at 1e-4 (10 % of the way down: 10**-3.8) and ends at 1e-2: within a
    # factor 1.6 (two scan points) of each.
    assert 10**-3.8 / 1.6 <= base <= 10**-3.8 * 1.6
    assert 1e-2 / 1.6 <= peak <= 1e-2 * 1.6
    # fastai's valley on the EMA sits half-way down the fall: far below the top of the range.
    smoothed = debiased_ema(losses, 0.98)
    assert suggest_valley(lrs, smoothed) < peak / 10


def test_smith_range_is_none_when_the_loss_never_falls() -> None:
    lrs = exponential_lrs(1e-6, 1.0, 20)
    assert smith_range(lrs, [5.0 + i for i in range(20)], lrs[0]) is None


def test_invalid_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="end_lr"):
        find_lr(DIGITS, start_lr=1e-2, end_lr=1e-3)
    with pytest.raises(ValueError, match="num_iter"):
        find_lr(DIGITS, num_iter=1)
    with pytest.raises(ConfigError, match="latent_dim"):
        find_lr({**DIGITS, "latent_dim": 0})


# --- range_test on a model and optimizer the caller owns ------------------------------------------


def test_range_test_restores_the_model_and_optimizer_and_stops_on_divergence() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.5)
    x, y = torch.randn(32, 3), torch.randn(32, 1)

    def step(_: int) -> float:
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    step(0)  # give Adam some state to restore
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    adam_state = {k: v.clone() for k, v in optimizer.state[model.weight].items()}
    seen: list[float] = []
    moved: list[bool] = []

    def watched(i: int) -> float:
        seen.append(optimizer.param_groups[0]["lr"])
        moved.append(not torch.equal(model.weight, weights["weight"]))
        return step(i)

    curve = range_test(
        model, optimizer, watched, start_lr=1e-3, end_lr=1e4, num_iter=100, smooth=0.9
    )
    assert curve.stopped_on_divergence and len(curve.lrs) < 100
    assert seen[: len(curve.lrs)] == curve.lrs  # the ramp was applied to the optimizer
    assert any(moved)  # the test really trained the model ...
    for name, value in model.state_dict().items():  # ... and handed it back untouched
        assert torch.equal(value, weights[name]), name
    for name, value in optimizer.state[model.weight].items():
        assert torch.equal(value, adam_state[name]), name
    assert optimizer.param_groups[0]["lr"] == 0.5  # the LR the caller had set


def test_range_test_restores_state_even_when_the_step_raises() -> None:
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.weight.detach().clone()

    def step(i: int) -> float:
        with torch.no_grad():
            model.weight.add_(1.0)  # the test's own updates
        if i == 3:
            raise RuntimeError("boom")
        return 1.0

    with pytest.raises(RuntimeError, match="boom"):
        range_test(model, optimizer, step, start_lr=1e-3, end_lr=1.0, num_iter=10)
    assert torch.equal(model.weight, before)


# --- find_lr on real (small) data ------------------------------------------------------------


def test_find_lr_on_digits_suggests_base_below_max_inside_the_scan(
    tmp_path: Path, train_device: str
) -> None:
    result = find_lr({**DIGITS, "device": train_device}, start_lr=1e-5, end_lr=1.0, num_iter=40)
    assert len(result.lrs) == len(result.losses) == len(result.smoothed) > 10
    assert result.lrs[0] == 1e-5
    assert result.suggested_base_lr is not None and result.suggested_max_lr is not None
    assert result.lrs[0] <= result.suggested_base_lr < result.suggested_max_lr <= result.lrs[-1]
    # Smith's max is where the (zero-lag smoothed) raw loss is lowest: never a point whose
    # loss is above the curve's start.
    assert result.suggested_max_lr in result.lrs
    assert result.batch_size == 64

    # JSON round-trips exactly, and is strict JSON
    text = result.to_json()
    assert LRFinderResult.from_json(text) == result
    assert json.loads(text)["suggested_max_lr"] == result.suggested_max_lr
    with pytest.raises(ValueError, match="LR finder"):
        LRFinderResult.from_json('{"lrs": []}')

    png = tmp_path / "lr.png"
    plot_lr_finder(result, png)
    raw = png.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    assert raw[12:16] == b"IHDR"
    width, height = struct.unpack(">II", raw[16:24])
    assert width > 100 and height > 100


def test_find_lr_stops_on_divergence_with_a_huge_end_lr(train_device: str) -> None:
    result = find_lr(
        {**DIGITS, "device": train_device, "dataset": "synthetic", "synthetic_size": 320},
        start_lr=1e-4,
        end_lr=1e8,
        num_iter=300,
    )
    assert result.stopped_on_divergence
    assert len(result.lrs) < 300
    assert all(math.isfinite(v) for v in result.losses)  # a NaN point is not recorded


@pytest.mark.parametrize(
    ("losses", "recorded"),
    [
        ([3.0, 2.0, 1.0, 3.9, 4.1, 1.0], 5),  # 4.1 > 4 × best (1.0): recorded, then stop
        ([3.0, 2.0, float("nan"), 1.0], 2),  # NaN: stop, the NaN point is not recorded
    ],
)
def test_divergence_rule(losses: list[float], recorded: int) -> None:
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    curve = range_test(
        model, optimizer, lambda i: losses[i], start_lr=1e-3, end_lr=1.0,
        num_iter=len(losses), smooth=0.0, diverge_threshold=4.0,
    )  # fmt: skip
    assert curve.stopped_on_divergence
    assert curve.losses == losses[:recorded]
    assert curve.smoothed == curve.losses  # smooth = 0: no averaging


def test_no_divergence_runs_the_whole_ramp() -> None:
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    curve = range_test(model, optimizer, lambda i: 10.0 - i, start_lr=1e-3, end_lr=1.0, num_iter=8)
    assert not curve.stopped_on_divergence
    assert len(curve.lrs) == 8 and math.isclose(curve.lrs[-1], 1.0)


def test_find_lr_uses_beta_target_and_the_configured_batch_size(
    monkeypatch: pytest.MonkeyPatch, train_device: str
) -> None:
    seen: list[tuple[float, int]] = []
    real = steps_module.elbo_terms  # the loss function training and the LR finder share

    def spy(output: torch.Tensor, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append((kwargs["beta"], x.shape[0]))
        return real(output, x, *args, **kwargs)

    monkeypatch.setattr(steps_module, "elbo_terms", spy)
    # training would start at β = 0 (linear warm-up) and use LRs scaled by 32/128
    cfg = {
        **DIGITS,
        "device": train_device,
        "beta_target": 0.5,
        "batch_size": 32,
        "reference_batch_size": 128,
    }
    result = find_lr(cfg, start_lr=1e-4, end_lr=1e-2, num_iter=12)
    assert seen == [(0.5, 32)] * 12
    assert result.beta == 0.5 and result.lr_scale == 0.25
    ref = result.reference_lrs()
    assert ref["max_lr"] is not None and result.suggested_max_lr is not None
    assert math.isclose(ref["max_lr"], 4 * result.suggested_max_lr)
