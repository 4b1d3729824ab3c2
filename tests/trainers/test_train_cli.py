"""``hpo-train`` in process via typer's CliRunner: schedules preview, config errors, a tiny run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from hpo_service.schemas import TRAIN_SPLIT_SIZES
from trainers.cli import (
    app,
    load_config,
    parse_set_value,
    steps_per_epoch_for,
)
from trainers.config import TrainConfig
from trainers.data import load_dataset
from trainers.errors import ConfigError

PNG = b"\x89PNG\r\n\x1a\n"
TINY: dict[str, Any] = {
    "dataset": "synthetic",
    "synthetic_size": 80,  # 64 train / 8 / 8
    "hidden_sizes": [16],
    "latent_dim": 3,
    "batch_size": 16,
    "epochs": 2,
    "kl_warmup_epochs": 1.0,
    "active_unit_examples": 8,
    "final_is_samples": 3,
    "final_is_examples": 8,
}

runner = CliRunner()


def write_config(tmp_path: Path, values: dict[str, Any], device: str = "cpu") -> Path:
    """``values`` as a YAML config file; ``device`` is where a run of it trains."""
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"device": device, **values}))
    return path


def test_set_values_are_yaml_with_exponent_floats() -> None:
    assert parse_set_value("1e-3") == 1e-3  # YAML 1.1 would keep "1e-3" a string
    assert parse_set_value("[64, 32]") == [64, 32]
    assert parse_set_value("true") is True
    assert parse_set_value("cyclical") == "cyclical"


def test_load_config_applies_overrides_and_names_bad_fields(tmp_path: Path) -> None:
    path = write_config(tmp_path, TINY)
    cfg = load_config(path, ["base_lr=3e-3", "hidden_sizes=[8, 4]"])
    assert cfg.base_lr == 3e-3 and cfg.hidden_sizes == (8, 4)
    with pytest.raises(ConfigError) as info:
        load_config(path, ["no_equals_sign"])
    assert info.value.field == "--set"


def test_split_size_table_matches_the_loaded_data() -> None:
    # The preview must count steps exactly as training does, without loading data.
    # The server refuses oversized batches at submit time from the same table.
    for values in (
        {"dataset": "digits"},
        {"dataset": "mnist5k"},
        {"dataset": "synthetic", "synthetic_size": 123},
    ):
        cfg = TrainConfig.model_validate({**values, "batch_size": 50})
        data = load_dataset(cfg, torch.device("cpu"))
        assert steps_per_epoch_for(cfg) == data.train.shape[0] // 50, values
    assert TRAIN_SPLIT_SIZES["digits"] == 1437


def test_schedules_writes_a_png_and_reports_the_steps(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path,
        {**TINY, "lr_policy": "one_cycle", "max_lr": 1e-2, "kl_schedule": "cyclical"},
    )
    out = tmp_path / "plots" / "sched.png"
    result = runner.invoke(app, ["schedules", "--config", str(cfg), "--plot", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == PNG
    # 64 training examples / batch 16 = 4 steps per epoch, × 2 epochs
    assert "8 steps (2 epochs × 4)" in result.output

    result = runner.invoke(
        app,
        ["schedules", "-c", str(cfg), "--plot", str(out), "--steps-per-epoch", "7"],
    )
    assert result.exit_code == 0, result.output
    assert "14 steps (2 epochs × 7)" in result.output


@pytest.mark.parametrize(
    ("values", "sets", "field"),
    [
        ({**TINY, "kl_warmup_epocs": 1.0}, [], "kl_warmup_epocs"),  # unknown field
        ({**TINY, "lr_policy": "triangular"}, [], "max_lr"),  # needs max_lr
        (TINY, ["latent_dim=0"], "latent_dim"),
        ({**TINY, "batch_size": 1000}, [], "batch_size"),  # larger than the training split
    ],
)
def test_a_bad_config_exits_2_naming_the_field(
    tmp_path: Path, values: dict[str, Any], sets: list[str], field: str
) -> None:
    cfg = write_config(tmp_path, values)
    args = ["schedules", "-c", str(cfg), "--plot", str(tmp_path / "x.png")]
    for item in sets:
        args += ["--set", item]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert f"`{field}`" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "x.png").exists()


def test_an_unreadable_config_file_exits_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", "-c", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2
    assert "`config`" in result.output


def test_run_writes_one_json_line_per_epoch_and_the_curves(
    tmp_path: Path, train_device: str
) -> None:
    cfg = write_config(tmp_path, TINY, train_device)
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "-c", str(cfg), "--out", str(out), "--set", "epochs=3"])
    assert result.exit_code == 0, result.output
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    for r in records:
        for key in ("val_neg_elbo", "val_kl", "active_units", "beta", "lr"):
            assert isinstance(r[key], float), key
        assert len(r["kl_per_dim"]) == 3
    # linear KL warm-up over 1 epoch of 4 steps: β at the last step of epoch 1 is 3/4
    assert records[0]["beta"] == pytest.approx(0.75) and records[1]["beta"] == 1.0
    assert (out / "curves.png").read_bytes()[:8] == PNG
    final = json.loads((out / "final.json").read_text())
    assert final["epochs_run"] == 3.0
    assert "test_neg_elbo" in result.output  # the final metrics are printed


def test_run_patience_ends_a_plateaued_run_and_still_evaluates_the_test_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, train_device: str
) -> None:
    import trainers.evaluation as evaluation

    real = evaluation.evaluate
    scripted = iter([10.0, 9.0, 9.5, 9.6])  # validation −ELBO of epochs 1–4: best at epoch 2

    def plateau(*args: Any, **kwargs: Any) -> Any:
        values, kl = real(*args, **kwargs)
        values["val_neg_elbo"] = next(scripted, values["val_neg_elbo"])  # test: the real one
        return values, kl

    monkeypatch.setattr(evaluation, "evaluate", plateau)
    cfg = write_config(tmp_path, {**TINY, "epochs": 10}, train_device)
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "-c", str(cfg), "-o", str(out), "--patience", "2"])
    assert result.exit_code == 0, result.output
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4
    final = json.loads((out / "final.json").read_text())
    assert final["epochs_run"] == 4.0 and final["best_epoch"] == 2.0
    assert final["val_neg_elbo"] == 9.0 and final["test_neg_elbo"] > 0
    assert "test_is_nll" in final
    assert "plateau: ended at epoch 4, no better validation −ELBO for 2 epochs" in result.output

    bad = runner.invoke(app, ["run", "-c", str(cfg), "-o", str(out), "--patience", "0"])
    assert bad.exit_code == 2 and "`--patience`" in bad.output


def test_lr_find_writes_json_and_png_and_prints_the_suggestion(
    tmp_path: Path, train_device: str
) -> None:
    cfg = write_config(tmp_path, TINY, train_device)
    result = runner.invoke(
        app,
        ["lr-find", "-c", str(cfg), "--out", str(tmp_path), "--num-iter", "20",
         "--start-lr", "1e-5", "--end-lr", "1e-1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "lr_find.json").read_text())
    assert len(data["lrs"]) == 20
    assert (tmp_path / "lr_find.png").read_bytes()[:8] == PNG
    assert "max_lr" in result.output and "base_lr" in result.output

    bad = runner.invoke(app, ["lr-find", "-c", str(cfg), "--start-lr", "1", "--end-lr", "0.1"])
    assert bad.exit_code == 2 and "end_lr" in bad.output


def test_schedules_describes_a_cyclical_kl_schedule_as_its_cycles(tmp_path: Path) -> None:
    # 3 epochs × 4 steps, 3 cycles rising over half of each: no "warm-up" is involved.
    cfg = write_config(
        tmp_path,
        {**TINY, "epochs": 3, "kl_schedule": "cyclical", "kl_cycles": 3, "kl_ratio": 0.5},
    )
    result = runner.invoke(app, ["schedules", "-c", str(cfg), "--plot", str(tmp_path / "s.png")])
    assert result.exit_code == 0, result.output
    assert "KL cyclical: 3 cycles of 4 steps, β rising 0 → 1 over the first 2" in result.output
    assert "KL warm-up" not in result.output
    warm = write_config(tmp_path, {**TINY, "kl_schedule": "linear", "kl_warmup_epochs": 1.0})
    result = runner.invoke(app, ["schedules", "-c", str(warm), "--plot", str(tmp_path / "w.png")])
    assert "KL warm-up 4 steps (linear, β 0 → 1)" in result.output, result.output
