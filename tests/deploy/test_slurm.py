"""``deploy/slurm/hpo-worker.sbatch``: shellcheck-clean, the Slurm directives the README promises,
a dry run of its command line, and that command line run for real against a live server."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "deploy" / "slurm" / "hpo-worker.sbatch"
sys.path.insert(0, str(ROOT / "tests" / "service"))  # the live-server helpers

ARRAY_ENV = {"SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "3", "SLURM_JOB_ID": "4245"}


def test_shellcheck_finds_nothing() -> None:
    if shutil.which("shellcheck") is None:
        if os.environ.get("CI"):
            pytest.fail("shellcheck is required in CI (.ci/run installs it)")
        pytest.skip("shellcheck is not installed")
    result = subprocess.run(["shellcheck", str(SBATCH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_a_job_array_one_gpu_per_task_requeued_on_preemption() -> None:
    directives = dict(
        re.match(r"#SBATCH --([a-z-]+)(?:=(.*))?", line).groups()  # type: ignore[union-attr]
        for line in SBATCH.read_text().splitlines()
        if line.startswith("#SBATCH")
    )
    assert re.fullmatch(r"\d+-\d+", directives["array"] or "")
    assert directives["gres"] == "gpu:1"
    assert "requeue" in directives  # a preempted task comes back under the same array index
    assert (directives["signal"] or "").startswith("B:TERM@")  # time to hand the trial back


def _dry_run(**env: str) -> list[str]:
    result = subprocess.run(
        ["bash", str(SBATCH), "--max-trials", "1"],
        env={**os.environ, "HPO_DRY_RUN": "1", **env}, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout)


def test_the_worker_id_comes_from_the_array_job_and_index_so_a_requeue_keeps_it() -> None:
    words = _dry_run(HPO_SERVER_URL="http://hpo:8000", **ARRAY_ENV)
    assert words[0] == "hpo-worker"
    assert words[words.index("--worker-id") + 1] == "slurm-4242-3"
    requeued = _dry_run(HPO_SERVER_URL="http://hpo:8000", **{**ARRAY_ENV, "SLURM_JOB_ID": "9999"})
    assert requeued == words  # a new job id after the requeue, the same worker
    assert words[words.index("--device") + 1] == "cuda"
    assert words[-2:] == ["--max-trials", "1"]  # extra sbatch arguments reach the worker


def test_without_a_server_url_it_refuses_to_start() -> None:
    env = {k: v for k, v in os.environ.items() if k != "HPO_SERVER_URL"}
    result = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "HPO_SERVER_URL" in result.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_its_command_line_runs_a_real_worker_against_a_live_server(tmp_path: Path) -> None:
    from live import serve_process

    token_file = tmp_path / "worker_token"
    token_file.write_text("worker-token\n")
    env = {
        **os.environ,
        "HPO_DATABASE_URL": f"sqlite:///{tmp_path / 'hpo.db'}",
        "HPO_TOKENS": "admin:admin-token,worker:worker-token",
        "HPO_LOG_LEVEL": "warning",
    }
    with serve_process(env, tmp_path / "server.log") as (_, url):
        worker_env = {
            **os.environ,
            **ARRAY_ENV,
            "HPO_SERVER_URL": url,
            "HPO_WORKER_TOKEN_FILE": str(token_file),
            "HPO_WORKER": str(Path(sys.executable).parent / "hpo-worker"),
            "HPO_WORKER_DEVICE": "cpu",
            "HPO_LOG_FORMAT": "text",
        }
        result = subprocess.run(
            ["bash", str(SBATCH), "--idle-exit", "1", "--wait", "0.5"],
            env=worker_env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "worker_id=slurm-4242-3" in result.stderr  # it leased as the array task's worker
