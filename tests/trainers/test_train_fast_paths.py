"""The speed paths give the metrics of the plain path: fused Adam/AdamW, ``torch.compile``.

Fused and compiled kernels round differently from the reference kernels, so metrics agree to a
tolerance, not bit for bit; a wrong update rule or a wrong loss would be far outside it.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import pytest
import torch

from trainers import train as train_module
from trainers.config import TrainConfig
from trainers.models import mlp_vae
from trainers.train import TrainResult, build_optimizer, train

SMALL: dict[str, Any] = {
    "dataset": "digits",
    "model": "mlp",
    "hidden_sizes": (64, 32),
    "latent_dim": 4,
    "epochs": 2,
    "batch_size": 128,
    "kl_warmup_epochs": 1.0,
    "base_lr": 3e-3,
    "final_is_samples": 0,
    "active_unit_examples": 180,
}
TIMINGS = {"samples_per_sec", "epoch_seconds", "final_eval_seconds"}
COMPARED = ("train_loss", "train_neg_elbo", "train_kl", "val_neg_elbo", "val_kl", "grad_norm_max")


def _assert_same_run(fast: TrainResult, plain: TrainResult) -> None:
    assert fast.best_epoch == plain.best_epoch
    for f, p in zip(fast.history, plain.history, strict=True):
        for name in COMPARED:
            assert f.values[name] == pytest.approx(p.values[name], rel=1e-3), name
        assert f.values["active_units"] == p.values["active_units"]


# The CUDA counterpart is in test_cuda.py.
@pytest.mark.cpu_only
@pytest.mark.parametrize(
    ("optimizer", "cls"), [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)]
)
def test_adam_and_adamw_are_fused_by_default_on_cpu(optimizer: str, cls: type) -> None:
    cfg = TrainConfig(optimizer=optimizer, weight_decay=0.01)
    vae = mlp_vae(8, (4,), 2, "relu")
    fused = build_optimizer(vae, cfg, torch.device("cpu"))
    plain = build_optimizer(vae, cfg, torch.device("cpu"), fused=False)
    assert type(fused) is cls and fused.defaults["fused"] is True
    assert not plain.defaults["fused"] and plain.defaults["foreach"] is True


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_fused_optimizer_trains_like_the_foreach_one(
    optimizer: str, monkeypatch: pytest.MonkeyPatch, train_device: str
) -> None:
    config = {
        **SMALL,
        "device": train_device,
        "optimizer": optimizer,
        "weight_decay": 1e-2,
        "grad_clip_norm": 50.0,
    }
    built: list[torch.optim.Optimizer] = []

    def spy(*args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        built.append(build_optimizer(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(train_module, "build_optimizer", spy)
    fused = train(config)
    monkeypatch.setattr(train_module, "build_optimizer", functools.partial(spy, fused=False))
    plain = train(config)
    assert [bool(o.defaults["fused"]) for o in built] == [True, False]
    _assert_same_run(fused, plain)


# Importing inductor imports torch.utils.mkldnn, which uses the deprecated torch.jit API.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
# Inductor compiles C++ with the system compiler: 20 s on an idle two-core box, past the
# suite's 300 s default at load 20. A bound, not a speed check.
@pytest.mark.timeout(1200)
def test_compiled_forward_and_loss_train_like_the_eager_ones(train_device: str) -> None:
    # Free bits and a β warm-up exercise the loss's branches and a changing β (a float input
    # that torch.compile must not bake into the graph).
    # fp32: bf16 rounding differs between fused and unfused kernels by more than the tolerance.
    config = {**SMALL, "device": train_device, "free_bits": 0.5, "amp": "off"}
    eager = train(config)
    compiled = train({**config, "compile": True})
    _assert_same_run(compiled, eager)
    assert compiled.history[0].values["beta"] != compiled.history[1].values["beta"]


def test_torch_trace_records_stay_out_of_the_captured_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # torch.compile emits these by the hundred; a failing compile test used to print them all.
    from torch._logging._internal import trace_structured

    with caplog.at_level(logging.DEBUG):
        trace_structured(
            "artifact", lambda: {"name": "probe", "encoding": "string"}, payload_fn=str
        )
        logging.getLogger("trainers").debug("our own debug records are still captured")
    names = [record.name for record in caplog.records]
    assert "torch.__trace" not in names and "trainers" in names
