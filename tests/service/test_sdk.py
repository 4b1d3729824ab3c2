"""The worker SDK against a real uvicorn server: complete, prune, stop (cancel), an exception,
Ctrl-C and SIGTERM sent to a real process, and the bring-your-own-VAE example training for real."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from byo_helpers import admin, live_server, study_trials, wait_for
from helpers import spec
from live import LiveServer

from hpo_service import sdk

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LiveServer]:
    with live_server(tmp_path) as live:
        yield live


def worker_trials(server: LiveServer, **options: Any) -> Iterator[sdk.Trial]:
    defaults: dict[str, Any] = {"wait_s": 0.5, "idle_exit_s": 1.0, "handle_sigterm": False}
    return sdk.trials(server.url, token="worker-token", **{**defaults, **options})


def test_a_normal_exit_completes_with_the_last_report_and_params_come_with_the_trial(
    server: LiveServer,
) -> None:
    admin(server).create_study(spec("done", budget={"n_trials": 2, "max_concurrent": 1}))
    seen = []
    for trial in worker_trials(server):
        with trial:
            assert trial.params and set(trial.params) <= set(trial.config) | {"max_lr_factor"}
            for epoch, value in enumerate([12.0, 11.0, 10.0 + trial.number]):
                trial.report(epoch, value, val_kl=1.5)
        seen.append(trial)
    assert [t.outcome for t in seen] == ["complete", "complete"]
    finished = study_trials(server, "done")
    assert [t.state for t in finished] == [optuna.trial.TrialState.COMPLETE] * 2
    assert [t.values for t in finished] == [[10.0], [11.0]]
    assert finished[0].intermediate_values == {0: 12.0, 1: 11.0, 2: 10.0}
    assert [t.params for t in finished] == [t.params for t in seen]


def test_complete_by_metric_name_and_a_missing_objective_is_refused(server: LiveServer) -> None:
    admin(server).create_study(spec("named", budget={"n_trials": 1, "max_concurrent": 1}))
    for trial in worker_trials(server):
        with trial:
            with pytest.raises(ValueError, match="val_neg_elbo"):
                trial.complete(test_neg_elbo=3.0)
            trial.complete(val_neg_elbo=7.5, test_neg_elbo=8.0)
    (finished,) = study_trials(server, "named")
    assert finished.values == [7.5]
    assert finished.user_attrs["metrics"]["test_neg_elbo"] == 8.0


def test_a_pruned_trial_ends_its_loop_and_is_told_pruned(server: LiveServer) -> None:
    # Phase-aware pruning would wait out a sampled warm-up; this test is about the SDK.
    pruner = {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0, "phase_aware": False}
    admin(server).create_study(
        spec("prune", pruner=pruner, budget={"n_trials": 2, "max_concurrent": 1})
    )
    epochs_run = []
    for trial in worker_trials(server):
        with trial:
            for epoch in range(5):
                trial.report(epoch, 1.0 if trial.number == 0 else 100.0)
                epochs_run.append((trial.number, epoch))
    assert epochs_run == [(0, e) for e in range(5)]  # trial 1: pruned at its first report
    states = [t.state for t in study_trials(server, "prune")]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED]


def test_exit_when_idle_leaves_the_loop_once_no_study_can_give_work(server: LiveServer) -> None:
    admin(server).create_study(spec("idle", budget={"n_trials": 1, "max_concurrent": 1}))
    # No idle_exit_s: only the server's `HPO-Work: idle` ends this loop (issue 16).
    loop = worker_trials(server, idle_exit_s=None, exit_when_idle=True)
    for trial in loop:
        with trial:
            trial.report(0, 5.0)
    (done,) = study_trials(server, "idle")
    assert done.state == optuna.trial.TrialState.COMPLETE


def test_a_cancelled_study_stops_the_trial_for_good(server: LiveServer) -> None:
    client = admin(server)
    client.create_study(spec("cancel", budget={"n_trials": 3, "max_concurrent": 1}))
    outcomes, reached = [], False
    for trial in worker_trials(server):
        with trial:
            trial.report(0, 5.0)
            client.cancel_study("cancel")
            wait_for(lambda t=trial: t.should_stop, 10, "a heartbeat to carry the cancel")
            trial.report(1, 4.0)  # raises TrialStopped, which the block turns into a fail
            reached = True
        outcomes.append(trial.outcome)
    assert not reached
    assert outcomes == ["stopped"]  # the loop ended: a cancelled study hands out nothing more
    (stopped,) = study_trials(server, "cancel")
    assert stopped.state == optuna.trial.TrialState.FAIL
    assert "cancelled" in stopped.user_attrs["fail_reason"]


def test_an_exception_fails_the_trial_with_its_message_and_the_loop_goes_on(
    server: LiveServer,
) -> None:
    admin(server).create_study(spec("boom", budget={"n_trials": 2, "max_concurrent": 1}))
    for trial in worker_trials(server):
        with trial:
            trial.report(0, 3.0)
            if trial.number == 0:
                raise ValueError("decoder produced NaN at epoch 0")
    first, second = study_trials(server, "boom")
    assert first.state == optuna.trial.TrialState.FAIL
    assert "ValueError: decoder produced NaN at epoch 0" in first.user_attrs["fail_reason"]
    assert "Traceback" in first.user_attrs["fail_reason"]
    assert second.state == optuna.trial.TrialState.COMPLETE
    assert "retry_history" not in second.system_attrs  # a code error is not retried


def test_raise_errors_re_raises_after_failing_the_trial(server: LiveServer) -> None:
    admin(server).create_study(spec("raise", budget={"n_trials": 2, "max_concurrent": 1}))
    with pytest.raises(RuntimeError, match="my bug"):
        for trial in worker_trials(server, raise_errors=True):
            with trial:
                raise RuntimeError("my bug")
    (failed,) = study_trials(server, "raise")
    assert failed.state == optuna.trial.TrialState.FAIL


SIGNALLED_WORKER = """
import sys, time
from pathlib import Path
from hpo_service import sdk

for trial in sdk.trials(sys.argv[1], token="worker-token", wait_s=1):
    with trial:
        trial.report(0, 50.0)
        Path(sys.argv[2]).write_text(str(trial.number))
        while True:  # a long epoch, interrupted by the signal
            time.sleep(0.05)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_hands_the_trial_back_for_an_immediate_retry(
    server: LiveServer, tmp_path: Path, sig: signal.Signals
) -> None:
    admin(server).create_study(spec("signal", budget={"n_trials": 2, "max_concurrent": 1}))
    script, marker = tmp_path / "worker.py", tmp_path / "leased"
    script.write_text(textwrap.dedent(SIGNALLED_WORKER))
    process = subprocess.Popen(
        [sys.executable, str(script), server.url, str(marker)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: marker.exists() or process.poll() is not None, 60, "a leased trial")
        assert process.poll() is None, process.communicate()[0].decode()
        process.send_signal(sig)
        output = process.communicate(timeout=60)[0].decode()
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0, output  # the interrupt still ends the program
    # The lease timeout is 120 s and no reaper runs: only the fail route can have queued this.
    failed, retry = study_trials(server, "signal")
    assert failed.state == optuna.trial.TrialState.FAIL
    assert "handed back for retry" in failed.user_attrs["fail_reason"], output
    assert retry.state == optuna.trial.TrialState.WAITING
    assert retry.params == failed.params
    assert retry.system_attrs["retry_history"] == [failed.number]


def test_the_own_vae_example_trains_through_the_sdk(server: LiveServer, train_device: str) -> None:
    example = REPO / "examples" / "own_vae" / "train.py"
    assert len(example.read_text().splitlines()) < 60
    body = spec(
        "own-vae",
        dataset="digits",
        epochs=3,
        budget={"n_trials": 2, "max_concurrent": 1},
        fixed={"hidden_sizes": [64], "latent_dim": 4, "device": train_device},
        pruner={"name": "none"},
    )
    admin(server).create_study(body)
    env = {
        **os.environ,
        "HPO_SERVER_URL": server.url,
        "HPO_WORKER_TOKEN": "worker-token",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, str(example)], env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stdout + done.stderr
    trials = study_trials(server, "own-vae")
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    for trial in trials:
        assert sorted(trial.intermediate_values) == [0, 1, 2]
        # 64 Bernoulli pixels at p = 0.5 cost 64·ln 2 ≈ 44.4 nats; a VAE that learned is below.
        assert trial.values[0] < 44.0, trial.intermediate_values


def test_the_techniques_are_the_trainers_own_functions_not_copies() -> None:
    from trainers import losses, lr_finder, metrics, schedules, techniques

    homes = (schedules, losses, lr_finder, metrics)
    for name in techniques.__all__:
        if name == "TrainConfig":
            continue
        obj = getattr(techniques, name)
        assert any(getattr(home, name, None) is obj for home in homes), name
    assert {"kl_beta", "learning_rate", "lr_scale_factor", "free_bits_kl", "range_test"} <= set(
        techniques.__all__
    )
    assert {"active_units", "importance_sampled_nll"} <= set(techniques.__all__)
