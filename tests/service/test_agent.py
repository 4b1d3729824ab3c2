"""``hpo agent`` as a real process against a live server, running shell scripts (not Python)
once per trial: metrics on fd 3 and on stdout, a crash, a program that ignores the prune signal,
a cancelled study, the agent interrupted, and a Python program that uses the SDK under it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from byo_helpers import admin, live_server, study_trials, wait_for
from helpers import spec
from live import LiveServer
from optuna.trial import TrialState


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LiveServer]:
    with live_server(tmp_path) as live:
        yield live


def write_script(folder: Path, body: str, name: str = "train.sh") -> Path:
    script = folder / name
    script.write_text(textwrap.dedent(body).lstrip())
    return script


def start_agent(
    server: LiveServer, folder: Path, command: list[str], *options: str
) -> subprocess.Popen[str]:
    log = (folder / "agent.log").open("w")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hpo_service",
            "agent",
            "--server",
            server.url,
            "--token",
            "worker-token",
            "--wait",
            "0.5",
            "--idle-exit",
            "1",
            "--grace",
            "1",
            *options,
            "--",
            *command,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "CHILD_PID_FILE": str(folder / "child.pid")},
    )


def finish(agent: subprocess.Popen[str], folder: Path) -> str:
    try:
        agent.wait(timeout=120)
    finally:
        if agent.poll() is None:
            agent.kill()
    return (folder / "agent.log").read_text()


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody has reaped yet counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


GOOD = """
    #!/bin/sh
    # A training program that is not Python: config from the environment and the JSON file.
    set -e
    grep -q '"latent_dim": 4' "$HPO_CONFIG_FILE"
    echo "trial $HPO_TRIAL_NUMBER of $HPO_STUDY: latent_dim=$HPO_CONFIG_LATENT_DIM"
    for epoch in 0 1 2; do
      echo "HPO_METRIC {\\"epoch\\": $epoch, \\"value\\": $((20 - epoch)), \\"val_kl\\": 1.5}"
    done
    latent=$HPO_CONFIG_LATENT_DIM
    echo "{\\"final\\": true, \\"val_neg_elbo\\": 17, \\"seen_latent\\": $latent}" >&3
"""


def test_a_shell_script_trains_every_trial_of_a_study(server: LiveServer, tmp_path: Path) -> None:
    admin(server).create_study(spec("sh", budget={"n_trials": 2, "max_concurrent": 1}))
    agent = start_agent(server, tmp_path, ["sh", str(write_script(tmp_path, GOOD))])
    output = finish(agent, tmp_path)
    assert agent.returncode == 0, output
    assert "trial 0 of sh: latent_dim=4" in output  # the program's output is echoed
    trials = study_trials(server, "sh")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2, output
    for trial in trials:
        assert trial.values == [17.0]  # the `final` line on fd 3 ...
        assert trial.intermediate_values == {0: 20.0, 1: 19.0, 2: 18.0}  # ... reports on stdout
        assert trial.user_attrs["metrics"]["seen_latent"] == 4.0
        tail = trial.user_attrs["output_tail"]  # kept with a completed trial too
        assert f"trial {trial.number} of sh: latent_dim=4" in tail


CRASH = """
    #!/bin/sh
    echo "loading 60000 images"
    echo '{"epoch": 0, "value": 30}' >&3
    echo "RuntimeError: CUDA error: an illegal memory access was encountered" >&2
    exit 3
"""


def test_a_crash_fails_the_trial_with_its_exit_code_and_last_output(
    server: LiveServer, tmp_path: Path
) -> None:
    admin(server).create_study(spec("crash", budget={"n_trials": 1, "max_concurrent": 1}))
    agent = start_agent(server, tmp_path, ["sh", str(write_script(tmp_path, CRASH))])
    output = finish(agent, tmp_path)
    assert agent.returncode == 0, output  # the agent survives its program's crash
    (trial,) = study_trials(server, "crash")
    assert trial.state == TrialState.FAIL
    reason = trial.user_attrs["fail_reason"]
    assert "exit code 3" in reason
    assert "loading 60000 images" in reason and "illegal memory access" in reason
    assert trial.user_attrs["output_tail"].splitlines() == [
        "loading 60000 images",
        "RuntimeError: CUDA error: an illegal memory access was encountered",
    ]
    assert "retry_history" not in trial.system_attrs  # not retried: the program is at fault


STUBBORN = """
    #!/bin/sh
    # Trial 0 trains well; later trials report badly and ignore SIGTERM, as does their child.
    if [ "$HPO_TRIAL_NUMBER" = 0 ]; then
      for epoch in 0 1 2; do echo "{\\"epoch\\": $epoch, \\"value\\": 1}" >&3; done
      exit 0
    fi
    trap '' TERM
    sleep 1000 &
    echo $! > "$CHILD_PID_FILE"
    epoch=0
    while true; do
      echo "{\\"epoch\\": $epoch, \\"value\\": 100}" >&3
      epoch=$((epoch + 1))
      sleep 0.1
    done
"""


def test_a_program_that_ignores_the_prune_signal_is_killed_with_its_group(
    server: LiveServer, tmp_path: Path
) -> None:
    pruner = {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0, "phase_aware": False}
    admin(server).create_study(
        spec("stubborn", pruner=pruner, budget={"n_trials": 2, "max_concurrent": 1})
    )
    agent = start_agent(server, tmp_path, ["sh", str(write_script(tmp_path, STUBBORN))])
    output = finish(agent, tmp_path)
    assert agent.returncode == 0, output
    states = [t.state for t in study_trials(server, "stubborn")]
    assert states == [TrialState.COMPLETE, TrialState.PRUNED], output
    assert "trial 1 of stubborn: pruned (pruned at epoch 0; killed by SIGKILL" in output
    grandchild = int((tmp_path / "child.pid").read_text())
    wait_for(lambda: not alive(grandchild), 30, "the program's child to die with its group")


LONG = """
    #!/bin/sh
    sleep 1000 &
    echo $! > "$CHILD_PID_FILE"
    epoch=0
    while true; do
      echo "{\\"epoch\\": $epoch, \\"value\\": 5}" >&3
      epoch=$((epoch + 1))
      sleep 0.1
    done
"""


def test_cancelling_the_study_kills_the_program_group(server: LiveServer, tmp_path: Path) -> None:
    client = admin(server)
    client.create_study(spec("cancel", budget={"n_trials": 3, "max_concurrent": 1}))
    agent = start_agent(server, tmp_path, ["sh", str(write_script(tmp_path, LONG))])
    wait_for(
        lambda: any(t.intermediate_values for t in study_trials(server, "cancel")),
        60,
        "a first report",
    )
    client.cancel_study("cancel")
    output = finish(agent, tmp_path)
    assert agent.returncode == 0, output
    (trial,) = study_trials(server, "cancel")
    assert trial.state == TrialState.FAIL
    assert "study cancelled" in trial.user_attrs["fail_reason"], output
    grandchild = int((tmp_path / "child.pid").read_text())
    wait_for(lambda: not alive(grandchild), 30, "the program's child to die with its group")


def test_an_interrupted_agent_hands_the_trial_back_for_retry(
    server: LiveServer, tmp_path: Path
) -> None:
    admin(server).create_study(spec("interrupt", budget={"n_trials": 2, "max_concurrent": 1}))
    agent = start_agent(server, tmp_path, ["sh", str(write_script(tmp_path, LONG))])
    wait_for(
        lambda: any(t.intermediate_values for t in study_trials(server, "interrupt")),
        60,
        "a first report",
    )
    agent.send_signal(signal.SIGINT)
    output = finish(agent, tmp_path)
    failed, retry = study_trials(server, "interrupt")
    assert failed.state == TrialState.FAIL
    assert "handed back for retry" in failed.user_attrs["fail_reason"], output
    assert retry.state == TrialState.WAITING and retry.params == failed.params
    grandchild = int((tmp_path / "child.pid").read_text())
    wait_for(lambda: not alive(grandchild), 30, "the program's child to die with its group")


SDK_PROGRAM = """
    from hpo_service import sdk

    for trial in sdk.trials():
        with trial:
            for epoch in range(3):
                trial.report(epoch, 9.0 - epoch, lr=trial.config["base_lr"])
"""


def test_a_program_using_the_sdk_settles_its_trial_itself(
    server: LiveServer, tmp_path: Path
) -> None:
    admin(server).create_study(spec("sdk", budget={"n_trials": 1, "max_concurrent": 1}))
    script = write_script(tmp_path, SDK_PROGRAM, "train.py")
    agent = start_agent(server, tmp_path, [sys.executable, str(script)])
    output = finish(agent, tmp_path)
    assert agent.returncode == 0, output
    (trial,) = study_trials(server, "sdk")
    assert trial.state == TrialState.COMPLETE, output
    assert trial.values == [7.0]
    assert "settled by the program through the SDK" in output
