"""The training loop end to end on tiny runs (sklearn digits, a few epochs).

Every test that trains does so on the `train_device` (``pytest --device cuda`` runs them on a GPU).
"""

from __future__ import annotations

import pickle
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from trainers import precision
from trainers import train as train_module
from trainers.config import TrainConfig
from trainers.errors import ConfigError, NonFiniteLossError, TrainerError
from trainers.models import VAE, mlp_vae
from trainers.schedules import learning_rate, lr_schedule_from_config
from trainers.train import Decision, EpochMetrics, build_optimizer, train

#: A small, fast run: 1437 training digits, 11 steps per epoch at batch 128.
SMALL: dict[str, Any] = {
    "dataset": "digits",
    "model": "mlp",
    "hidden_sizes": (64, 32),
    "latent_dim": 4,
    "epochs": 3,
    "batch_size": 128,
    "kl_warmup_epochs": 1.0,
    "final_is_samples": 0,
    "active_unit_examples": 180,
}

EPOCH_METRICS = {
    "train_loss", "train_neg_elbo", "train_recon", "train_kl", "val_neg_elbo", "val_recon",
    "val_kl", "active_units", "free_bits_floor_dims", "beta", "lr", "grad_norm_mean",
    "grad_norm_max", "clip_fraction", "samples_per_sec", "posterior_collapse", "mean_sigma",
    "mean_abs_mu", "epoch_seconds",
}  # fmt: skip
TIMINGS = {"samples_per_sec", "epoch_seconds", "final_eval_seconds"}


def run(device: str, /, **overrides: Any) -> train_module.TrainResult:
    """``SMALL`` with ``overrides``, trained on ``device`` (unless an override names another)."""
    return train({**SMALL, "device": device, **overrides})


def _without_timings(values: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in values.items() if k not in TIMINGS}


def test_a_few_epochs_lower_validation_neg_elbo_and_report_every_metric(train_device: str) -> None:
    result = run(train_device, epochs=4, base_lr=3e-3, final_is_samples=20, final_is_examples=50)
    first, last = result.history[0].values, result.history[-1].values
    assert last["val_neg_elbo"] < first["val_neg_elbo"] - 1.0
    assert [m.epoch for m in result.history] == [1, 2, 3, 4]
    for metrics in result.history:
        assert set(metrics.values) == EPOCH_METRICS
        assert len(metrics.kl_per_dim) == 4
        assert sum(metrics.kl_per_dim) == pytest.approx(metrics.values["val_kl"], rel=1e-4)
    best = min(result.history, key=lambda m: m.values["val_neg_elbo"])
    assert result.best_epoch == best.epoch
    assert result.metrics["val_neg_elbo"] == best.values["val_neg_elbo"]
    assert result.metrics["epochs_run"] == 4.0 and result.epochs_run == 4
    assert result.metrics["test_neg_elbo"] > 0 and result.metrics["test_is_nll"] > 0
    assert not result.stopped_early


def test_reports_the_effective_learning_rate_and_the_kl_weight(train_device: str) -> None:
    result = run(
        train_device, batch_size=64, reference_batch_size=128, base_lr=2e-3, kl_schedule="constant"
    )
    cfg = TrainConfig.model_validate({**SMALL, "batch_size": 64, "base_lr": 2e-3})
    steps_per_epoch = 1437 // 64
    last_step = 3 * steps_per_epoch - 1
    expected = learning_rate(last_step, lr_schedule_from_config(cfg, steps_per_epoch))
    assert result.metrics["lr"] == pytest.approx(expected)
    assert result.metrics["lr"] != pytest.approx(2e-3)  # batch-scaled, not the reference LR
    assert result.metrics["beta"] == pytest.approx(1.0)


def test_same_seed_same_metrics_different_seed_different_metrics(train_device: str) -> None:
    a, b, c = run(train_device, seed=7), run(train_device, seed=7), run(train_device, seed=8)
    for ma, mb in zip(a.history, b.history, strict=True):
        assert _without_timings(ma.values) == _without_timings(mb.values)
        assert ma.kl_per_dim == mb.kl_per_dim
    assert a.metrics["val_neg_elbo"] != c.metrics["val_neg_elbo"]
    assert a.history[0].values["train_loss"] != c.history[0].values["train_loss"]


def test_on_epoch_stop_stops_immediately(train_device: str) -> None:
    seen: list[EpochMetrics] = []

    def stop_after_two(metrics: EpochMetrics) -> Decision:
        seen.append(metrics)
        return "stop" if metrics.epoch == 2 else "continue"

    result = train(
        {**SMALL, "device": train_device, "epochs": 5, "final_is_samples": 50},
        on_epoch=stop_after_two,
    )
    assert [m.epoch for m in seen] == [1, 2]
    assert result.stopped_early and result.epochs_run == 2 and len(result.history) == 2
    assert "test_is_nll" not in result.metrics  # a pruned trial skips the final evaluation
    assert result.metrics["epochs_run"] == 2.0


def test_forced_collapse_has_no_active_units_and_raises_the_flag(train_device: str) -> None:
    collapsed = run(train_device, beta_target=1000.0, kl_schedule="constant", base_lr=3e-3)
    healthy = run(train_device, beta_target=0.05, kl_schedule="constant", base_lr=3e-3)
    assert collapsed.metrics["active_units"] == 0.0
    assert collapsed.metrics["posterior_collapse"] == 1.0
    assert collapsed.metrics["val_kl"] < 0.1
    assert healthy.metrics["active_units"] >= 2.0
    assert healthy.metrics["posterior_collapse"] == 0.0


def test_free_bits_floor_is_reported_and_enters_only_the_objective(train_device: str) -> None:
    result = run(train_device, free_bits=2.0, kl_schedule="constant")
    values = result.metrics
    assert values["free_bits_floor_dims"] > 0
    # Every dim's KL is below 2 nats early on: the objective pays the floor, −ELBO does not.
    first = result.history[0].values
    assert first["train_loss"] > first["train_neg_elbo"] + 1.0


def test_gradient_clipping_reports_pre_clip_norms_and_the_clip_fraction(train_device: str) -> None:
    clipped = run(train_device, epochs=1, grad_clip_norm=1e-3)
    free = run(train_device, epochs=1)
    assert clipped.metrics["clip_fraction"] == 1.0
    assert clipped.metrics["grad_norm_max"] > 1e-3  # the norm before clipping
    assert free.metrics["clip_fraction"] == 0.0
    by_value = run(train_device, epochs=1, grad_clip_value=1e-4)
    assert by_value.metrics["clip_fraction"] == 1.0


def test_nan_from_the_model_raises_with_epoch_and_first_bad_step(
    monkeypatch: pytest.MonkeyPatch,
    train_device: str,
) -> None:
    original = VAE.forward
    calls = {"n": 0}

    def poisoned(
        self: VAE, x: torch.Tensor, eps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar, out = original(self, x, eps)
        calls["n"] += 1
        if calls["n"] == 15:  # 11 steps per epoch → 0-based step 14 is in epoch 2
            out = out * torch.nan
        return mu, logvar, out

    monkeypatch.setattr(VAE, "forward", poisoned)
    with pytest.raises(NonFiniteLossError) as info:
        run(train_device)
    assert (info.value.epoch, info.value.step, info.value.term) == (2, 14, "objective")
    assert isinstance(info.value, TrainerError)


def test_a_non_finite_validation_raises_with_its_epoch_and_the_epoch_s_last_step(
    monkeypatch: pytest.MonkeyPatch, train_device: str
) -> None:
    """Training stays finite; the decoder goes bad only when evaluated after epoch 2."""
    original = VAE.decode
    steps = {"n": 0}

    def bad_after_epoch_2(self: VAE, z: torch.Tensor) -> torch.Tensor:
        out = original(self, z)
        if self.training:  # one decode per training step
            steps["n"] += 1
        elif steps["n"] >= 22:  # 11 steps per epoch: epoch 2's validation
            out = out * torch.nan
        return out

    monkeypatch.setattr(VAE, "decode", bad_after_epoch_2)
    with pytest.raises(NonFiniteLossError) as info:
        run(train_device)
    assert (info.value.epoch, info.value.step, info.value.term) == (2, 21, "val_neg_elbo")


def test_an_absurd_learning_rate_without_clipping_is_reported_as_non_finite(
    train_device: str,
) -> None:
    with pytest.raises(NonFiniteLossError) as info:
        run(train_device, base_lr=10.0, grad_clip_norm=0.0)
    assert info.value.epoch == 1 and info.value.step >= 0


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"lr_policy": "triangular", "base_lr": 1e-3, "max_lr": 1e-3}, "max_lr"),
        ({"lr_warmup_epochs": 3.0}, "lr_warmup_epochs"),
        ({"kl_warmup_epochs": 10.0}, "kl_warmup_epochs"),
        ({"dataset": "imagenet"}, "dataset"),
        ({"base_lr": "fast"}, "base_lr"),
        ({"learning_rate": 1e-3}, "learning_rate"),
        ({"batch_size": 5000}, "batch_size"),
        ({"device": "tpu:0"}, "device"),
    ],
)
def test_config_errors_name_the_field(
    overrides: dict[str, Any], field: str, train_device: str
) -> None:
    with pytest.raises(ConfigError) as info:
        run(train_device, **overrides)
    assert info.value.field == field
    assert str(info.value).startswith(f"`{field}`: ")
    assert isinstance(info.value, ValueError)


def test_adamw_does_not_decay_biases() -> None:
    cfg = TrainConfig(optimizer="adamw", weight_decay=0.1)
    vae = mlp_vae(64, (32,), 4, "relu")
    optimizer = build_optimizer(vae, cfg, torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.AdamW)
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decayed["params"])
    biases = {id(m.bias) for m in vae.modules() if isinstance(m, torch.nn.Linear)}
    assert {id(p) for p in plain["params"]} == biases
    assert len(decayed["params"]) + len(plain["params"]) == len(list(vae.parameters()))


@pytest.mark.parametrize(
    ("name", "cls", "decoupled"),
    [("radam", torch.optim.RAdam, True), ("adam", torch.optim.Adam, False)],
)
def test_other_optimizers_and_their_weight_decay(name: str, cls: type, decoupled: bool) -> None:
    cfg = TrainConfig(optimizer=name, weight_decay=0.01, beta1=0.8, beta2=0.99, eps=1e-6)
    optimizer = build_optimizer(mlp_vae(8, (4,), 2, "relu"), cfg, torch.device("cpu"))
    assert type(optimizer) is cls
    group = optimizer.param_groups[0]
    assert group["betas"] == (0.8, 0.99) and group["eps"] == 1e-6
    assert bool(group.get("decoupled_weight_decay", False)) is decoupled


@pytest.mark.parametrize("optimizer", ["radam", "adam"])
def test_every_optimizer_trains(optimizer: str, train_device: str) -> None:
    result = run(train_device, optimizer=optimizer, weight_decay=1e-4, epochs=2, base_lr=3e-3)
    first, last = result.history[0].values, result.history[-1].values
    assert last["train_neg_elbo"] < first["train_neg_elbo"]


def test_conv_model_trains_on_synthetic_images(train_device: str) -> None:
    result = run(
        train_device, dataset="synthetic", synthetic_size=256, model="conv", conv_channels=(4, 8),
        batch_size=16, epochs=2, base_lr=3e-3, kl_warmup_epochs=0.0, active_unit_examples=25,
    )  # fmt: skip
    first, last = result.history[0].values, result.history[-1].values
    assert last["val_neg_elbo"] < first["val_neg_elbo"]


def test_dynamic_binarization_trains_on_sampled_binary_pixels(
    monkeypatch: pytest.MonkeyPatch,
    train_device: str,
) -> None:
    seen: list[torch.Tensor] = []
    original = VAE.forward

    def spy(
        self: VAE, x: torch.Tensor, eps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        seen.append(x)
        return original(self, x, eps)

    monkeypatch.setattr(VAE, "forward", spy)
    run(train_device, epochs=1, binarize=True)
    assert all(set(torch.unique(x).tolist()) <= {0.0, 1.0} for x in seen)
    assert not torch.equal(seen[0], seen[1])


def test_bf16_autocast_still_trains_with_fp32_losses(train_device: str) -> None:
    result = run(train_device, amp="bf16", epochs=2, base_lr=3e-3)
    first, last = result.history[0].values, result.history[-1].values
    assert last["val_neg_elbo"] < first["val_neg_elbo"]
    assert (
        result.metrics != run(train_device, amp="off", epochs=2, base_lr=3e-3).metrics
    )  # autocast was on


@pytest.mark.parametrize("native", [True, False])
def test_amp_auto_uses_bf16_exactly_where_the_device_has_it_natively(
    monkeypatch: pytest.MonkeyPatch, native: bool, train_device: str
) -> None:
    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    auto = _without_timings(run(train_device, amp="auto", epochs=1).metrics)
    assert auto == _without_timings(
        run(train_device, amp="bf16" if native else "off", epochs=1).metrics
    )
    assert auto != _without_timings(
        run(train_device, amp="off" if native else "bf16", epochs=1).metrics
    )


def test_native_bf16_probes_the_cpu_and_the_gpu_generation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert not train_module.native_bf16(cpu)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert train_module.native_bf16(cpu)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert not train_module.native_bf16(cpu)  # a torch without the probes: no bf16
    assert not train_module.native_bf16(torch.device("meta"))
    gpu = torch.device("cuda:0")  # no GPU needed: the capability probe is replaced
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (7, 5))  # Turing
    assert not train_module.native_bf16(gpu)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))  # Hopper
    assert train_module.native_bf16(gpu)


def test_a_bare_yaml_off_means_amp_off() -> None:
    assert TrainConfig.from_mapping({"amp": False}).amp == "off"  # what YAML makes of `off`
    with pytest.raises(ValidationError, match="amp"):
        TrainConfig.from_mapping({"amp": True})


def test_trainer_errors_survive_pickling_between_processes() -> None:
    config_error = pickle.loads(pickle.dumps(ConfigError("batch_size", "too large")))
    assert (config_error.field, config_error.reason) == ("batch_size", "too large")
    assert str(config_error) == "`batch_size`: too large"
    nan_error = pickle.loads(pickle.dumps(NonFiniteLossError(3, 41, "disc_loss")))
    assert (nan_error.epoch, nan_error.step, nan_error.term) == (3, 41, "disc_loss")


def test_patience_must_be_a_positive_number_of_epochs(train_device: str) -> None:
    with pytest.raises(ConfigError) as info:
        train({**SMALL, "device": train_device}, patience=0)
    assert info.value.field == "patience"
    # One epoch is the smallest patience: accepted, and a one-epoch run ends as it would anyway.
    shortest = train({**SMALL, "device": train_device, "epochs": 1}, patience=1)
    assert shortest.epochs_run == 1 and not shortest.plateaued
