"""``hpo-worker``: pull trials from the service and train them on this machine's device."""

from __future__ import annotations

import logging
import os
import signal
import socket
from pathlib import Path
from types import FrameType
from typing import Annotated, Literal

import typer

from hpo_service.client import HPOClient, make_http_client
from trainers.logs import LogFormat, configure_logging
from trainers.worker import Worker, WorkerOptions

app = typer.Typer(
    add_completion=False,
    help="hpo-worker: pull trials from the service and train them on this machine's device.",
    rich_markup_mode=None,
)


@app.command()
def run(
    server: Annotated[
        str, typer.Option(envvar="HPO_SERVER_URL", help="Base URL of the HPO server.")
    ] = "http://127.0.0.1:8000",
    token: Annotated[
        str | None, typer.Option(envvar="HPO_WORKER_TOKEN", help="A token with worker scope.")
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(
            envvar="HPO_WORKER_TOKEN_FILE",
            help="Read the worker token from this file (a mounted secret).",
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            envvar="HPO_WORKER_DEVICE", help="Training device, e.g. cuda:0 or cpu (default: auto)."
        ),
    ] = None,
    worker_id: Annotated[
        str | None,
        typer.Option(help="Stable id: a restarted worker with the same id resumes its trial."),
    ] = None,
    max_trials: Annotated[int | None, typer.Option(help="Exit after this many trials.")] = None,
    idle_exit: Annotated[
        float | None, typer.Option(help="Exit after this many seconds without work.")
    ] = None,
    exit_when_idle: Annotated[
        bool,
        typer.Option(
            "--exit-when-idle",
            help="Exit (status 0) once the server says no study can give work now: every "
            "study is stopped, cancelled, completed or failed, or there is none.",
        ),
    ] = False,
    wait: Annotated[float, typer.Option(help="Long-poll seconds per lease request.")] = 20.0,
    population: Annotated[
        str,
        typer.Option(
            envvar="HPO_WORKER_POPULATION",
            help="Trials trained at once as one stacked model (MLP VAEs of one shape and batch "
            "size), or 'auto': as many as free memory allows while samples/s still rises.",
        ),
    ] = "1",
    patience: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="End a trial once its validation -ELBO has not improved for this many epochs "
            "(alone or inside a population); default: every epoch runs.",
        ),
    ] = None,
    log_format: Annotated[
        str, typer.Option(envvar="HPO_LOG_FORMAT", help="text or json (one object per line).")
    ] = "text",
) -> None:
    if log_format not in ("text", "json"):
        raise typer.BadParameter("must be 'text' or 'json'", param_hint="--log-format")
    fmt: LogFormat = "json" if log_format == "json" else "text"
    configure_logging(fmt)
    if token_file is not None and token is None:
        try:
            token = token_file.read_text().strip()
        except OSError as error:
            hint = "--token-file"
            raise typer.BadParameter(f"cannot read it: {error}", param_hint=hint) from error
    members = parse_population(population)
    identity = worker_id or f"{socket.gethostname()}-{os.getpid()}"
    worker = Worker(
        HPOClient(make_http_client(server, token)),
        WorkerOptions(
            worker_id=identity,
            device=device,
            wait_s=wait,
            max_trials=max_trials,
            idle_exit_s=idle_exit,
            exit_when_idle=exit_when_idle,
            population=members,
            patience=patience,
        ),
    )

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        logging.getLogger("hpo.worker").info("SIGTERM: finishing the epoch, handing back")
        worker.request_shutdown()

    signal.signal(signal.SIGTERM, on_sigterm)
    described = describe_device(device)
    logging.getLogger("hpo.worker").info(
        "worker %s on %s (device %s)",
        identity,
        server,
        described,
        extra={"event": "worker_started", "worker_id": identity, "device": described},
    )
    done = worker.run()
    logging.getLogger("hpo.worker").info("worker %s exiting after %d trials", identity, done)


def parse_population(value: str) -> int | Literal["auto"]:
    """``--population``: a whole number ≥ 1, or ``auto``."""
    if value == "auto":
        return "auto"
    try:
        members = int(value)
    except ValueError:
        members = 0
    if members < 1:
        raise typer.BadParameter(
            f"must be a whole number >= 1 or 'auto' (got {value!r})", param_hint="--population"
        )
    return members


def describe_device(device: str | None) -> str:
    """The device trials will run on, by name: ``cuda:0 (NVIDIA H100 80GB HBM3)``, ``cpu (16
    threads)``. ``None``/``auto`` is resolved the way the trainer resolves it."""
    import torch

    name = device or "auto"
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(name).index
        index = torch.cuda.current_device() if index is None else index
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    if name == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return name  # e.g. cuda asked for without CUDA: the trainer names the error per trial


def main() -> None:
    app()


if __name__ == "__main__":
    main()
