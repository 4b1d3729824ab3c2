"""``hpo-worker``: pull trials from the service and train them on this machine's device."""

from __future__ import annotations

import logging
import os
import signal
import socket
from types import FrameType
from typing import Annotated

import typer

from hpo_service.client import HPOClient, make_http_client
from trainers.worker import Worker, WorkerOptions

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def run(
    server: Annotated[str, typer.Option(help="Base URL of the HPO server.")] = (
        "http://127.0.0.1:8000"
    ),
    token: Annotated[
        str | None, typer.Option(envvar="HPO_WORKER_TOKEN", help="A token with worker scope.")
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="Training device, e.g. cuda:0 or cpu (default: auto).")
    ] = None,
    worker_id: Annotated[
        str | None,
        typer.Option(help="Stable id: a restarted worker with the same id resumes its trial."),
    ] = None,
    max_trials: Annotated[int | None, typer.Option(help="Exit after this many trials.")] = None,
    idle_exit: Annotated[
        float | None, typer.Option(help="Exit after this many seconds without work.")
    ] = None,
    wait: Annotated[float, typer.Option(help="Long-poll seconds per lease request.")] = 20.0,
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    identity = worker_id or f"{socket.gethostname()}-{os.getpid()}"
    worker = Worker(
        HPOClient(make_http_client(server, token)),
        WorkerOptions(
            worker_id=identity,
            device=device,
            wait_s=wait,
            max_trials=max_trials,
            idle_exit_s=idle_exit,
        ),
    )

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        logging.getLogger("hpo.worker").info("SIGTERM: finishing the epoch, handing back")
        worker.request_shutdown()

    signal.signal(signal.SIGTERM, on_sigterm)
    logging.getLogger("hpo.worker").info(
        "worker %s on %s (device %s)", identity, server, device or "auto"
    )
    done = worker.run()
    logging.getLogger("hpo.worker").info("worker %s exiting after %d trials", identity, done)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
