"""``hpo demo`` end to end, as a user runs it from the checkout: real server and worker processes
on a free port with generated tokens, progress lines whole off a terminal, next steps that work
as printed."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from live import free_port, stop, wait_until_healthy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
HPO = str(Path(sys.executable).parent / "hpo")
PROGRESS = re.compile(
    r"^\[ *\d+ s\] untuned \d+ done, \d+ pruned, \d+ running, \d+ failed; "
    r"tuned \d+ done, \d+ pruned, \d+ running, \d+ failed$"
)


def test_demo_binds_a_free_port_with_tokens_and_prints_next_steps_that_work(
    tmp_path: Path,
) -> None:
    database = tmp_path / "demo.db"
    demo = subprocess.Popen(
        [HPO, "demo", "--trials", "2", "--epochs", "2", "--workers", "1",
         "--database", str(database)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "COLUMNS": "80"},
    )  # fmt: skip
    assert demo.stdout is not None
    try:
        first = demo.stdout.readline()
        url = re.search(r"server (http://127\.0\.0\.1:(\d+))", first)
        assert url, first
        assert url.group(2) != "8765"  # not the old fixed port
        lines = [first]
        # Read the rest on a thread, so the main one can probe the server while it runs.
        reader = threading.Thread(target=lambda: lines.extend(demo.stdout or []), daemon=True)
        reader.start()
        wait_until_healthy(url.group(1), lambda: demo.poll() is None, "the demo's server")
        spec = {"name": "intruder", "dataset": "digits", "budget": {"n_trials": 1}}
        intruder = httpx.post(f"{url.group(1)}/v1/studies", json=spec, timeout=30)
        assert intruder.status_code == 401, intruder.text  # another local process is refused
        lease = httpx.post(f"{url.group(1)}/v1/leases", json={"worker_id": "x"}, timeout=30)
        assert lease.status_code == 401
        assert demo.wait(timeout=600) == 0, "".join(lines)
        reader.join(timeout=30)
    finally:
        stop(demo)  # type: ignore[arg-type]  # text mode; stop only signals and waits
    output = "".join(lines)

    progress = [line.rstrip("\n") for line in lines if line.startswith("[")]
    assert progress and all(PROGRESS.match(line) for line in progress), progress
    last = re.findall(r"\d+", progress[-1].split("]", 1)[1])
    untuned_done, tuned_done, tuned_pruned = int(last[0]), int(last[4]), int(last[5])
    assert untuned_done == 1 and tuned_done + tuned_pruned == 2  # every trial ended
    assert "untuned default" in output and "best trial #" in output

    steps = [line.strip() for line in output.split("next steps", 1)[1].splitlines()[1:]]
    python_step = next(s for s in steps if " -c " in s)
    serve_step = next(s for s in steps if " serve " in s)
    studies_step = next(s for s in steps if " studies " in s)
    best_step = next(s for s in steps if " best " in s)
    for step in (python_step, serve_step, studies_step, best_step):
        words = shlex.split(step)
        program = next(w for w in words if "=" not in w)
        assert program.startswith(".venv/bin/"), step  # as called from the checkout

    # Verbatim: the printed Optuna one-liner.
    loaded = subprocess.run(step_words(python_step), cwd=REPO, capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.startswith("{") and "base_lr" in loaded.stdout

    # The printed server, on a free port instead of 8000 (another process may hold 8000 here).
    port = str(free_port())
    env_words = shlex.split(serve_step)[: -len(step_words(serve_step))]
    env = {**os.environ, **dict(w.split("=", 1) for w in env_words)}
    assert env_words == [f"HPO_DATABASE_URL=sqlite:///{database}"]
    serve_words = [w.replace("8000", port) for w in step_words(serve_step)]
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            serve_words, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", lambda: server.poll() is None, "serve", log)
        for step in (studies_step, best_step):
            words = [w.replace("8000", port) for w in step_words(step)]
            result = subprocess.run(words, cwd=REPO, capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, (step, result.stdout, result.stderr)
            assert "demo-" in result.stdout, result.stdout
    finally:
        stop(server)


def step_words(step: str) -> list[str]:
    """A printed command as argv, without its leading ``NAME=value`` environment words."""
    words = shlex.split(step)
    while words and re.match(r"^[A-Z_]+=", words[0]):
        words.pop(0)
    return words
