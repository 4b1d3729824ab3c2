"""``--population auto``: fuse only when the fused step beats ``train()``'s own step.

The rule is a pure function of measured rates (``choose_population``), tested on hand-made and
measured figures; ``measure_population`` is tested wired to it (fake rates through its own
loop) and once for real on a tiny config; and a worker whose ``auto`` chose 1 is tested to
train its trials alone with ``train()``, against the real app.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from hpo_service.app import create_app
from hpo_service.client import HPOClient
from hpo_service.config import Settings
from trainers import population_auto, population_worker
from trainers.population_auto import (
    AUTO_MAX,
    AUTO_MIN_GAIN,
    choose_population,
    doubling_pick,
    measure_population,
)
from trainers.train import parse_config, train
from trainers.worker import Worker, WorkerOptions

TINY: dict[str, Any] = {
    "dataset": "synthetic",
    "synthetic_size": 512,
    "hidden_sizes": [32],
    "latent_dim": 4,
    "final_is_samples": 8,
    "final_is_examples": 64,
    "active_unit_examples": 64,
    "device": "cpu",
    "batch_size": 64,
}

# --- the rule, from measured rates -----------------------------------------------------------


def test_the_idle_cpu_figures_pick_one_trial_at_a_time() -> None:
    """The idle 2-core figures (batch 128, 2026-12-01, docs/benchmarks.md): fused K = 16 at
    22,324 samples/s is 23 % over fused K = 1 (18,143), so a walk over fused rates alone keeps
    it, but it is slower than ``train()`` (24,473): K = 1."""
    fused = {1: 18_143.0, 16: 22_324.0}
    assert doubling_pick(fused) == 16  # what the rule without the single-trial baseline chose
    assert choose_population(24_473.0, fused) == 1


def test_a_fused_k_that_beats_the_single_step_by_the_gain_is_picked() -> None:
    fused = {1: 50.0, 2: 90.0, 4: 120.0, 8: 125.0}  # 8: +4 % over 4, not kept
    assert choose_population(100.0, fused) == 4
    assert choose_population(120.0, fused) == 1  # 120 is not 10 % over 120
    # the gain is "at least": exactly AUTO_MIN_GAIN × the single rate passes, just below not
    assert choose_population(100.0, {1: 50.0, 2: AUTO_MIN_GAIN * 100.0}) == 2
    assert choose_population(100.0, {1: 50.0, 2: AUTO_MIN_GAIN * 100.0 - 0.1}) == 1


def test_doubling_stops_at_the_first_k_that_does_not_gain() -> None:
    fused = {1: 10.0, 2: 10.5, 4: 100.0}  # 4 was never reached by a real walk
    assert doubling_pick(fused) == 1
    assert choose_population(1.0, fused) == 1
    assert doubling_pick({1: 10.0, 2: 11.2, 4: 12.6, 8: 14.0}) == 8  # each +11–12 %


def test_k_one_is_always_the_single_trial_path() -> None:
    """A fused K = 1 faster than ``train()`` still means one trial at a time (K = 1)."""
    assert choose_population(100.0, {1: 200.0, 2: 210.0}) == 1
    assert choose_population(100.0, {}) == 1


# --- the measurement, wired to the rule -------------------------------------------------------


def fake_rates(
    monkeypatch: pytest.MonkeyPatch, single: list[float], fused: dict[int, float]
) -> list[int]:
    """Make ``measure_population`` read ``single`` (in turn) and ``fused`` (by K); returns the
    K of every fused measurement it asks for, in order."""
    asked: list[int] = []
    readings = iter(single)

    def fused_rate(cfg: Any, device: Any, shape: Any, x: torch.Tensor, *args: Any) -> float:
        asked.append(x.shape[0])
        return fused[x.shape[0]]

    monkeypatch.setattr(population_auto, "_single_rate", lambda *args: next(readings))
    monkeypatch.setattr(population_auto, "_fused_rate", fused_rate)
    return asked


def test_measurement_walks_k_until_a_doubling_does_not_gain(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fused = {1: 50.0, 2: 90.0, 4: 120.0, 8: 125.0, 16: 500.0}
    asked = fake_rates(monkeypatch, [100.0, 100.0], fused)
    cfg = parse_config(TINY)
    measured = measure_population(cfg)
    assert asked == [1, 2, 4, 8]  # 8 was not kept, so 16 is never measured
    assert measured.fused_rates == {k: fused[k] for k in asked}
    assert measured.single_rate == 100.0 and measured.k == 4
    fake_rates(monkeypatch, [100.0, 100.0], fused)
    assert population_auto.auto_population(cfg) == 4


def test_the_faster_single_reading_is_the_baseline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Timed before and after the fused steps; load that lifts during the measurement must not
    make fusing look better than it is."""
    fake_rates(monkeypatch, [100.0, 130.0], {1: 50.0, 2: 90.0, 4: 120.0, 8: 125.0})
    measured = measure_population(parse_config(TINY))
    assert measured.single_rate == 130.0 and measured.k == 1


@pytest.mark.parametrize("free_bytes", [0, 2**50])
def test_the_walk_stops_at_what_fits_in_memory_or_the_cap(
    free_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rates that double with K never stop the walk; only memory (none free: one member) or
    ``AUTO_MAX`` (a petabyte free) does."""
    asked = fake_rates(monkeypatch, [1.0, 1.0], {2**i: 2.0**i for i in range(10)})
    monkeypatch.setattr(population_auto, "_free_bytes", lambda device: free_bytes)
    measured = measure_population(parse_config(TINY))
    limit = min(measured.fits, AUTO_MAX)
    assert limit == (1 if free_bytes == 0 else AUTO_MAX)
    assert asked == [2**i for i in range(10) if 2**i <= limit]
    assert measured.k == limit if limit > 1 else measured.k == 1


def test_a_real_measurement_on_a_tiny_config() -> None:
    measured = measure_population(parse_config(TINY), steps=2, min_seconds=0.02)
    ks = sorted(measured.fused_rates)
    assert ks == [2**i for i in range(len(ks))]  # 1, 2, 4, … with none skipped
    assert measured.single_rate > 0 and all(rate > 0 for rate in measured.fused_rates.values())
    # the walk ended where the rule says: at the first K not kept, or at the cap
    last = ks[-1]
    assert doubling_pick(measured.fused_rates) != last or 2 * last > min(measured.fits, AUTO_MAX)
    assert measured.k == choose_population(measured.single_rate, measured.fused_rates)
    assert measured.k == 1 or measured.fused_rates[measured.k] >= 1.1 * measured.single_rate


# --- the worker: K = 1 trains alone, with train() ---------------------------------------------


@pytest.mark.parametrize("k", [1, 2])
def test_a_worker_whose_auto_chose_one_trains_each_trial_alone(
    k: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'hpo.db'}",
        artifact_dir=tmp_path / "artifacts",
        tokens="admin:admin-token,worker:worker-token",  # type: ignore[arg-type]
        run_reaper=False,
        run_scheduler=False,
        long_poll_step_s=0.05,
        diagnostics_plot_every=0,
    )
    app = create_app(settings)
    fused: list[int] = []
    alone: list[int] = []
    real_population = population_worker.train_population

    def recording_population(members: Any, *args: Any, **kwargs: Any) -> Any:
        members = list(members)
        fused.append(len(members))
        return real_population(members, *args, **kwargs)

    def recording_train(config: Any, *args: Any, **kwargs: Any) -> Any:
        alone.append(1)
        return train(config, *args, **kwargs)

    monkeypatch.setattr(population_worker, "train_population", recording_population)
    monkeypatch.setattr(population_worker, "auto_population", lambda cfg: k)
    with TestClient(app) as client:
        study = {
            "name": "auto",
            "dataset": "synthetic",
            "epochs": 2,
            "budget": {"n_trials": 3, "max_concurrent": 3},
            "pruner": {"name": "none"},
            "fixed": {key: value for key, value in TINY.items() if key != "dataset"},
        }
        admin = {"Authorization": "Bearer admin-token"}
        assert client.post("/v1/studies", json=study, headers=admin).status_code == 201
        client.headers.update({"Authorization": "Bearer worker-token"})
        options = WorkerOptions(worker_id="w", wait_s=0, idle_exit_s=0, population="auto")
        worker = Worker(HPOClient(client), options, train_fn=recording_train)
        assert worker.run() == 3
        trials = client.get("/v1/studies/auto/trials", headers=admin).json()["trials"]
    app.state.service.storage.engine.dispose()
    assert [t["state"] for t in trials] == ["complete"] * 3
    assert worker.auto_population == k
    if k == 1:  # every trial by train(), none in a stack of one
        assert (fused, len(alone)) == ([], 3)
    else:
        assert alone == [] and sum(fused) >= 2
