"""``hpo demo``: the whole product on one machine in under three minutes on two CPU cores.

Starts ``hpo serve`` on a SQLite file and local ``hpo-worker`` processes, submits two studies on
the bundled MNIST digits — the untuned default configuration (a one-trial study with every
parameter dropped, so it trains ``TrainConfig``'s defaults) and the default VAE search — follows
progress, and ends with the best trial against the default. Workers are separate processes that
talk HTTP only, exactly as GPU workers on other machines would.

The server binds a free port on 127.0.0.1 with tokens generated for this run (admin for the demo,
worker for its workers): another local process can neither submit to it nor lease from it.
"""

from __future__ import annotations

import os
import secrets
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from hpo_service.client import HPOClient, make_http_client
from hpo_service.schemas import StudyInfo, StudySpec
from hpo_service.search_space import default_space

# Small enough to finish in under three minutes on two busy CPU cores: a short final IS-NLL
# (k=20 on 200 test digits, about a second); the full one (k=5000) is for benchmarks.
DEMO_FIXED = {"final_is_samples": 20, "final_is_examples": 200, "device": "cpu"}
#: Seconds the server may take to come up: generous, a busy machine is slow, not broken.
READY_TIMEOUT_S = 300.0


def demo_specs(
    stamp: str, n_trials: int, epochs: int, n_workers: int
) -> tuple[StudySpec, StudySpec]:
    baseline = StudySpec(
        name=f"demo-{stamp}-untuned",
        dataset="mnist5k",
        epochs=epochs,
        budget={"n_trials": 1, "max_concurrent": 1},
        pruner={"name": "none"},
        drop=[p.name for p in default_space(epochs)],
        fixed=DEMO_FIXED,
    )
    tuned = StudySpec(
        name=f"demo-{stamp}-tuned",
        dataset="mnist5k",
        epochs=epochs,
        budget={"n_trials": n_trials, "max_concurrent": n_workers},
        sampler={"name": "tpe", "seed": 0, "n_startup_trials": max(4, n_trials // 3)},
        pruner={"name": "median", "n_startup_trials": 3, "n_warmup_steps": 1},
        fixed=DEMO_FIXED,
    )
    return baseline, tuned


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_healthy(
    url: str, server: subprocess.Popen[bytes], timeout_s: float = READY_TIMEOUT_S
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the server did not become healthy at {url} within {timeout_s:.0f}s")


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def run_demo(
    console: Console,
    *,
    n_trials: int,
    epochs: int,
    n_workers: int,
    database: Path,
    port: int | None = None,
) -> None:
    """Run the demo; ``port`` None: a free one. Raises ``RuntimeError`` when it cannot finish."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    admin_token, worker_token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    env = {
        **os.environ,
        "HPO_DATABASE_URL": f"sqlite:///{database}",
        "HPO_HOST": "127.0.0.1",
        "HPO_PORT": str(port),
        "HPO_TOKENS": f"admin:{admin_token},worker:{worker_token}",
        "HPO_LOG_LEVEL": "warning",
        "OMP_NUM_THREADS": "1",  # one core per worker process
    }
    worker_env = {**env, "HPO_WORKER_TOKEN": worker_token}  # in the environment, not in `ps`
    logs = database.parent / "hpo-demo-logs"
    logs.mkdir(exist_ok=True)
    say = _printer(console)
    say(
        f"hpo demo: server {url} (tokens generated for this run), database {database}, "
        f"{n_workers} workers, {n_trials} trials of {epochs} epochs, logs in {logs}"
    )
    processes: list[subprocess.Popen[bytes]] = []
    try:
        with (logs / "server.log").open("wb") as server_log:
            server = subprocess.Popen(
                [sys.executable, "-m", "hpo_service", "serve", "--port", str(port)],
                env=env,
                stdout=server_log,
                stderr=subprocess.STDOUT,
            )
        processes.append(server)
        _wait_healthy(url, server)
        client = HPOClient(make_http_client(url, admin_token))
        baseline, tuned = demo_specs(time.strftime("%Y%m%d-%H%M%S"), n_trials, epochs, n_workers)
        client.create_study(baseline)
        client.create_study(tuned)
        for index in range(n_workers):
            worker_id = f"demo-worker-{index + 1}"
            with (logs / f"worker-{index + 1}.log").open("wb") as worker_log:
                processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "trainers.worker_cli", "--server", url,
                         "--worker-id", worker_id, "--device", "cpu", "--wait", "2"],
                        env=worker_env,
                        stdout=worker_log,
                        stderr=subprocess.STDOUT,
                    )
                )  # fmt: skip
        started = time.monotonic()
        last = ""
        while True:
            infos = [client.get_study(baseline.name), client.get_study(tuned.name)]
            line = "; ".join(
                f"{i.name.rsplit('-', 1)[-1]} {i.counts.complete} done, {i.counts.pruned} "
                f"pruned, {i.counts.running} running, {i.counts.fail} failed"
                for i in infos
            )
            if line != last:
                say(f"[{time.monotonic() - started:4.0f} s] {line}")
                last = line
            if all(i.state in ("completed", "failed") for i in infos):
                break
            dead = [p for p in processes[1:] if p.poll() is not None]
            if len(dead) == n_workers:
                raise RuntimeError(f"all workers exited; see {logs}")
            time.sleep(1)
        _report(console, client, infos[0], infos[1], database, time.monotonic() - started)
    finally:
        _stop(processes[1:])
        _stop(processes[:1])


def _printer(console: Console) -> Any:
    """``console.print`` that never wraps a line: off a terminal rich would break progress lines
    at 80 columns, mid-phrase."""

    def say(text: str) -> None:
        console.print(text, soft_wrap=True, markup=False, highlight=False)

    return say


def command(name: str) -> str:
    """How to call ``name`` (``hpo``, ``python``) from this interpreter's environment, as a
    shell word: ``.venv/bin/hpo`` from the checkout, the full path elsewhere, the bare name when
    the environment has no such script."""
    script = Path(sys.executable).parent / name
    if not script.exists():
        return name
    try:
        return shlex.quote(str(script.relative_to(Path.cwd())))
    except ValueError:
        return shlex.quote(str(script))


def _report(
    console: Console,
    client: HPOClient,
    baseline: StudyInfo,
    tuned: StudyInfo,
    database: Path,
    seconds: float,
) -> None:
    if not baseline.best_trials or not tuned.best_trials:
        raise RuntimeError("a demo study finished without a completed trial; see the logs")
    base = client.list_trials(baseline.name).trials[0]
    best = tuned.best_trials[0]
    table = Table(
        title=f"best of {tuned.counts.complete + tuned.counts.pruned} trials vs the "
        f"untuned default ({seconds:.0f}s)"
    )
    table.add_column("metric (nats/example)")
    table.add_column("untuned default", justify="right")
    table.add_column(f"best trial #{best.number}", justify="right")
    for metric in ("val_neg_elbo", "test_neg_elbo", "test_is_nll", "val_kl", "active_units"):
        a, b = base.metrics.get(metric), best.metrics.get(metric)
        table.add_row(metric, "-" if a is None else f"{a:.3f}", "-" if b is None else f"{b:.3f}")
    console.print(table)
    say = _printer(console)
    say(
        "best parameters: "
        + ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items()
        )
    )
    hpo, python = command("hpo"), command("python")
    storage = f"sqlite:///{database}"
    load = (  # double quotes inside, so the shell's single quotes around it stay plain
        f'import optuna; study = optuna.load_study(study_name="{tuned.name}", '
        f'storage="{storage}"); print(study.best_trial.params)'
    )
    say("")
    say("next steps (the demo's server has stopped; these open the same database):")
    say(f"  {python} -c {shlex.quote(load)}")
    say(f"  HPO_DATABASE_URL={shlex.quote(storage)} {hpo} serve --port 8000")
    say("  then, in another shell, while it runs:")
    say(f"  {hpo} studies --server http://127.0.0.1:8000")
    say(f"  {hpo} best {tuned.name} --server http://127.0.0.1:8000")
    say("  and http://127.0.0.1:8000/ (the Optuna dashboard), http://127.0.0.1:8000/v1/docs (API)")
