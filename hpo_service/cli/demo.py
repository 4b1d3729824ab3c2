"""``hpo demo``: a server and local workers tuning a VAE on bundled MNIST digits
(hpo_service/demo.py does the work)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hpo_service.cli._common import _fail, console


def demo(
    # 12 trials of 4 epochs on 2 workers: under three minutes on two busy CPU cores.
    trials_: Annotated[int, typer.Option("--trials", help="Trials in the demo study.")] = 12,
    epochs: Annotated[int, typer.Option(help="Epochs per trial.")] = 4,
    workers: Annotated[int, typer.Option(help="Local worker processes.")] = 2,
    database: Annotated[Path, typer.Option(help="SQLite file.")] = Path("hpo.db"),
    port: Annotated[
        int | None, typer.Option(help="Port of the demo server (default: a free one).")
    ] = None,
) -> None:
    """Start a server and local workers, tune a VAE on bundled MNIST digits, compare with the
    untuned default configuration."""
    from hpo_service.demo import run_demo

    try:
        run_demo(
            console,
            n_trials=trials_,
            epochs=epochs,
            n_workers=workers,
            database=database.resolve(),
            port=port,
        )
    except RuntimeError as error:
        raise _fail(str(error)) from error
