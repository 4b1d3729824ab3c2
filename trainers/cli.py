"""``hpo-train``: one training run, the LR range test, or a preview of β(t) and LR(t).

* ``run --config cfg.yaml [--set key=value ...] [--out DIR] [--patience N]`` trains once with a
  progress bar per epoch, writes ``metrics.jsonl`` (one JSON object per epoch), ``curves.png``
  and ``final.json`` to ``DIR`` and prints the final metrics. ``--patience N`` ends the run
  once the validation −ELBO has not improved for N epochs (the test set is still evaluated).
  ``run --from-trial STUDY NUMBER --server URL [--token T]`` reruns a trial of the service
  exactly: its resolved config and seed (``--set device=cpu`` and the like still apply).
* ``lr-find --config cfg.yaml [--out DIR]`` writes ``lr_find.json`` and ``lr_find.png`` and
  prints the suggested ``base_lr``/``max_lr``.
* ``schedules --config cfg.yaml --plot out.png [--steps-per-epoch N]`` plots the schedules
  without training or loading data.

The config file is a YAML mapping of ``TrainConfig`` fields; ``--set`` values are parsed as YAML
(``--set hidden_sizes=[64,32]``). Exit codes: 0 success, 1 the run diverged (NaN/Inf loss),
2 the config or the command line is invalid (the message names the field and the reason).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hpo_service.schemas import train_split_size as split_size
from trainers.config import TrainConfig
from trainers.errors import ConfigError, NonFiniteLossError

if TYPE_CHECKING:
    from hpo_service.schemas import TrialConfig
    from trainers.schedules import KLSchedule
    from trainers.train import EpochMetrics

# What `hpo-train --help` shows: plain words (click's formatting reflows paragraphs; the module
# docstring's reST markup would show as literal backquotes).
APP_HELP = (
    "hpo-train: one training run, the LR range test, or a preview of β(t) and LR(t).\n\n"
    "The config file is a YAML mapping of TrainConfig fields; --set values are parsed as YAML "
    "(--set hidden_sizes=[64,32]). Exit codes: 0 success, 1 the run diverged (NaN/Inf loss), "
    "2 the config or the command line is invalid (the message names the field and the reason)."
)
app = typer.Typer(add_completion=False, no_args_is_help=True, help=APP_HELP, rich_markup_mode=None)
console = Console()
err_console = Console(stderr=True)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML file of TrainConfig fields.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a field: key=value (value parsed as YAML). Repeatable."),
]

#: The schedules plot evaluates at most this many steps (evenly strided beyond it).
MAX_PLOT_POINTS = 200_000


# --- config loading: the one place CLI input becomes a TrainConfig --------------------------------


def _fail(message: str, code: int) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)


def parse_set_value(text: str) -> Any:
    """A ``--set`` value as YAML, with numbers YAML 1.1 leaves as strings (``1e-3``) made floats."""
    value = yaml.safe_load(text) if text.strip() else ""
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_config(path: Path, sets: list[str] | None) -> TrainConfig:
    """Read ``path`` (YAML mapping), apply ``key=value`` overrides, validate.

    Raises ``ConfigError`` naming the field (``config`` for an unreadable file, ``--set`` for a
    malformed override).
    """
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError("config", f"cannot read {str(path)!r}: {e}") from e
    if not isinstance(data, Mapping):
        raise ConfigError("config", f"{str(path)!r} must hold a mapping of TrainConfig fields")
    return config_with_sets(data, sets)


def config_with_sets(data: Mapping[str, Any], sets: list[str] | None) -> TrainConfig:
    """``data`` with ``key=value`` overrides applied, validated. Raises ``ConfigError``."""
    values = dict(data)
    for item in sets or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError("--set", f"expected key=value (got {item!r})")
        values[key.strip()] = parse_set_value(raw)
    # Lists become tuples in from_mapping; one place maps pydantic errors to (field, reason).
    from trainers.train import parse_config

    return parse_config(values)


def _config_or_exit(path: Path, sets: list[str] | None) -> TrainConfig:
    try:
        return load_config(path, sets)
    except ConfigError as e:
        raise _fail(f"invalid config — `{e.field}`: {e.reason}", 2) from None


def train_split_size(cfg: TrainConfig) -> int:
    """Training examples of ``cfg.dataset`` without loading it (``TRAIN_SPLIT_SIZES``)."""
    return split_size(cfg.dataset, cfg.synthetic_size)


def steps_per_epoch_for(cfg: TrainConfig) -> int:
    """Optimizer steps per epoch as training counts them: ⌊N_train / batch_size⌋ (ragged last
    batch dropped). Raises ``ConfigError`` when the batch is larger than the training set."""
    n_train = train_split_size(cfg)
    if cfg.batch_size > n_train:
        raise ConfigError(
            "batch_size",
            f"larger than the training set of {cfg.dataset!r} ({cfg.batch_size} > {n_train})",
        )
    return n_train // cfg.batch_size


# --- run ------------------------------------------------------------------------------------------


def _epoch_line(epoch: EpochMetrics) -> dict[str, Any]:
    return {"epoch": epoch.epoch, **epoch.values, "kl_per_dim": epoch.kl_per_dim}


def _progress_text(m: EpochMetrics) -> str:
    v = m.values
    return (
        f"−ELBO {v['val_neg_elbo']:.2f} (train {v['train_neg_elbo']:.2f})  "
        f"KL {v['val_kl']:.2f}  AU {v['active_units']:.0f}  β {v['beta']:.3g}  "
        f"LR {v['lr']:.2e}"
    )


def _trial_config_or_exit(
    study: str, number: int, server: str, token: str | None, sets: list[str] | None
) -> tuple[TrainConfig, TrialConfig]:
    """Trial ``number`` of ``study``'s resolved config from the server, with ``--set``
    overrides (``device=cpu`` to rerun a GPU trial here), validated."""
    from hpo_service.client import ClientError, HPOClient, make_http_client

    with make_http_client(server, token) as http:
        try:
            found = HPOClient(http).trial_config(study, number)
        except ClientError as e:
            raise _fail(f"cannot fetch trial {number} of {study!r} from {server}: {e}", 2) from None
    try:
        return config_with_sets(found.config, sets), found
    except ConfigError as e:
        raise _fail(f"invalid config — `{e.field}`: {e.reason}", 2) from None


@app.command(short_help="Train once: per-epoch JSON lines, curves PNG, final metrics.")
def run(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML file of TrainConfig fields.")
    ] = None,
    set_: SetOpt = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output folder (default: runs/<time>).")
    ] = None,
    patience: Annotated[
        int | None,
        typer.Option(
            help="End the run once the validation −ELBO has not improved for this many epochs "
            "(the best model is still evaluated on the test set). Default: run all epochs."
        ),
    ] = None,
    from_trial: Annotated[
        tuple[str, int] | None,
        typer.Option(
            "--from-trial",
            metavar="STUDY NUMBER",
            help="Rerun trial NUMBER of STUDY exactly: its resolved config and seed, fetched "
            "from --server (with any --set applied).",
        ),
    ] = None,
    server: Annotated[
        str, typer.Option(envvar="HPO_SERVER_URL", help="Server of --from-trial.")
    ] = "http://127.0.0.1:8000",
    token: Annotated[
        str | None, typer.Option(envvar="HPO_TOKEN", help="A token of --server (any scope).")
    ] = None,
) -> None:
    """Train once; write per-epoch JSON lines, the curves PNG and the final metrics."""
    source: TrialConfig | None = None
    if from_trial is not None and config is not None:
        raise _fail("give --config or --from-trial, not both", 2)
    if from_trial is not None:
        cfg, source = _trial_config_or_exit(*from_trial, server, token, set_)
    elif config is not None:
        cfg = _config_or_exit(config, set_)
    else:
        raise _fail("give --config FILE or --from-trial STUDY NUMBER", 2)
    if patience is not None and patience < 1:
        raise _fail(f"`--patience` must be at least 1 epoch (got {patience})", 2)
    out_dir = out or Path("runs") / time.strftime("run-%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    if source is not None:  # what the trial was, to compare the rerun with
        (out_dir / "trial.json").write_text(source.model_dump_json(indent=2))
    lines_path = out_dir / "metrics.jsonl"
    lines_path.write_text("")

    from trainers.train import resolve_device, train, uses_bf16

    try:
        device = resolve_device(cfg.device)
    except ConfigError as e:
        raise _fail(f"invalid config — `{e.field}`: {e.reason}", 2) from None
    precision = "bf16 autocast" if uses_bf16(cfg, device) else "fp32"
    err_console.print(f"training on {device} ({precision}, amp={cfg.amp})", highlight=False)
    if source is not None:
        _say_how_the_trial_ran(source, str(device), precision)
    history: list[EpochMetrics] = []
    progress = Progress(
        TextColumn("epoch {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        console=err_console,
    )

    def on_epoch(metrics: EpochMetrics) -> None:
        history.append(metrics)
        with lines_path.open("a") as handle:  # one line per epoch, visible while it runs
            handle.write(json.dumps(_epoch_line(metrics)) + "\n")
        progress.update(task, advance=1, stats=_progress_text(metrics))

    with progress:
        task = progress.add_task("train", total=cfg.epochs, stats="")
        try:
            result = train(cfg, on_epoch, patience=patience)
        except ConfigError as e:
            raise _fail(f"invalid config — `{e.field}`: {e.reason}", 2) from None
        except NonFiniteLossError as e:
            plot_curves(history, out_dir / "curves.png")
            raise _fail(f"the run diverged: {e}", 1) from None

    plot_curves(history, out_dir / "curves.png")
    (out_dir / "final.json").write_text(json.dumps(result.metrics, indent=2))
    if result.plateaued:
        console.print(
            f"plateau: ended at epoch {result.epochs_run}, no better validation −ELBO for "
            f"{patience} epochs",
            soft_wrap=True,
        )
    table = Table(title=f"final metrics (best epoch {result.best_epoch})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in sorted(result.metrics.items()):
        table.add_row(name, f"{value:.6g}")
    console.print(table)
    console.print(f"wrote {lines_path}, {out_dir / 'curves.png'}, {out_dir / 'final.json'}")


def _say_how_the_trial_ran(source: TrialConfig, device: str, precision: str) -> None:
    """Print how the trial ran, and warn where this rerun differs (it then cannot match)."""
    record = source.repro
    head = f"rerunning trial {source.trial_number} of {source.study} (seed {source.seed})"
    if record is None:
        err_console.print(f"{head}; its worker sent no reproducibility record", highlight=False)
        return
    err_console.print(
        f"{head}, trained on {record.device} ({record.device_name}, {record.precision}) with "
        f"vae-hpo {record.package_version} {record.git_commit or ''}, torch {record.torch}",
        highlight=False,
    )
    if (record.device.split(":")[0], record.precision) != (device.split(":")[0], precision):
        err_console.print(
            f"[yellow]warning:[/yellow] this rerun uses {device} ({precision}); the trial used "
            f"{record.device} ({record.precision}): expect different numbers",
            highlight=False,
        )


def plot_curves(history: list[EpochMetrics], path: Path) -> None:
    """Four panels over epochs: −ELBO (train, val), KL (train, val), β and the effective LR."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 7), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    epochs = [m.epoch for m in history]

    def series(name: str) -> list[float]:
        return [m.values[name] for m in history]

    panels = (
        (axes[0][0], "−ELBO (nats/example)", ("train_neg_elbo", "val_neg_elbo")),
        (axes[0][1], "KL (nats/example)", ("train_kl", "val_kl")),
        (axes[1][0], "β (last step of the epoch)", ("beta",)),
        (axes[1][1], "effective LR (last step of the epoch)", ("lr",)),
    )
    for ax, title, names in panels:
        for name in names:
            ax.plot(epochs, series(name), marker="o", ms=3, label=name)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if len(names) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")


# --- lr-find --------------------------------------------------------------------------------------


@app.command("lr-find", short_help="LR range test (Smith 2017): suggested base and max LR.")
def lr_find(
    config: ConfigOpt,
    set_: SetOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("."),
    start_lr: Annotated[float, typer.Option(help="First LR of the ramp (effective).")] = 1e-6,
    end_lr: Annotated[float, typer.Option(help="Last LR of the ramp (effective).")] = 1.0,
    num_iter: Annotated[int, typer.Option(help="Steps of the ramp.")] = 100,
) -> None:
    """LR range test (Smith 2017) at the config's batch size and β = beta_target."""
    cfg = _config_or_exit(config, set_)
    from trainers.lr_finder import find_lr, plot_lr_finder

    try:
        result = find_lr(cfg, start_lr=start_lr, end_lr=end_lr, num_iter=num_iter)
    except ConfigError as e:
        raise _fail(f"invalid config — `{e.field}`: {e.reason}", 2) from None
    except ValueError as e:  # a range-test argument (the message names it)
        raise _fail(str(e), 2) from None
    out.mkdir(parents=True, exist_ok=True)
    (out / "lr_find.json").write_text(result.to_json())
    plot_lr_finder(result, out / "lr_find.png")
    status = "stopped on divergence" if result.stopped_on_divergence else "full ramp"
    console.print(f"{len(result.lrs)} steps, {status}; wrote {out / 'lr_find.json'}, .png")
    if result.suggested_max_lr is None or result.suggested_base_lr is None:
        raise _fail("too few points for a suggestion: lower --start-lr", 1)
    ref = result.reference_lrs()
    console.print(
        f"suggested (effective, batch {result.batch_size}): "
        f"base_lr {result.suggested_base_lr:.3g}, max_lr {result.suggested_max_lr:.3g} "
        f"(steepest {result.steepest_lr:.3g})"
    )
    console.print(
        f"in config units (reference batch {cfg.reference_batch_size}, {cfg.lr_scaling} "
        f"rule): base_lr={ref['base_lr']:.3g} max_lr={ref['max_lr']:.3g}"
    )


# --- schedules ------------------------------------------------------------------------------------


@app.command(short_help="Plot β(t) and LR(t) for a config, without training.")
def schedules(
    config: ConfigOpt,
    plot: Annotated[Path, typer.Option("--plot", help="PNG to write.")],
    set_: SetOpt = None,
    steps_per_epoch: Annotated[
        int | None,
        typer.Option(help="Steps per epoch (default: from the dataset's training split size)."),
    ] = None,
) -> None:
    """Plot β(t) and LR(t) (and β1 when cycled) for a config, without training."""
    cfg = _config_or_exit(config, set_)
    from trainers.schedules import (
        beta1_at,
        kl_beta,
        kl_schedule_from_config,
        learning_rate,
        lr_schedule_from_config,
    )

    if steps_per_epoch is not None and steps_per_epoch < 1:
        raise _fail(f"`--steps-per-epoch` must be at least 1 (got {steps_per_epoch})", 2)
    try:
        spe = steps_per_epoch or steps_per_epoch_for(cfg)
    except ConfigError as e:
        raise _fail(f"invalid config — `{e.field}`: {e.reason}", 2) from None
    ks, ls = kl_schedule_from_config(cfg, spe), lr_schedule_from_config(cfg, spe)
    total = cfg.epochs * spe
    stride = max(1, math.ceil(total / MAX_PLOT_POINTS))
    steps = list(range(0, total, stride))
    if steps[-1] != total - 1:
        steps.append(total - 1)  # always show the last step
    betas = [kl_beta(t, ks) for t in steps]
    lrs = [learning_rate(t, ls) for t in steps]
    beta1s = [beta1_at(t, ls) for t in steps]

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cycled = beta1s[0] is not None
    fig = Figure(figsize=(9, 7 if cycled else 5.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(3 if cycled else 2, 1, sharex=True)
    axes[0].plot(steps, betas, color="C0")
    axes[0].set_ylabel("β (KL weight)")
    axes[0].set_title(
        f"kl_schedule={cfg.kl_schedule}, lr_policy={cfg.lr_policy}, {spe} steps/epoch"
    )
    axes[1].plot(steps, lrs, color="C3")
    axes[1].set_ylabel(f"effective LR (batch {cfg.batch_size})")
    if cycled:
        axes[2].plot(steps, [b or 0.0 for b in beta1s], color="C2")
        axes[2].set_ylabel("Adam β1")
    axes[-1].set_xlabel("optimizer step")
    fig.tight_layout()
    plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(plot, format="png")
    console.print(
        f"{total} steps ({cfg.epochs} epochs × {spe}); {describe_kl(ks)}, "
        f"LR warm-up {ls.warmup_steps} steps; LR {min(lrs):.3g} … {max(lrs):.3g}, "
        f"β {min(betas):.3g} … {max(betas):.3g}; wrote {plot}",
        soft_wrap=True,
    )


def describe_kl(ks: KLSchedule) -> str:
    """The KL schedule in words and steps, as ``kl_beta`` runs it: a cyclical one as its cycles
    (Fu et al. 2019: M cycles of P steps, rising over R·P of each), never as a warm-up."""
    if ks.kind == "constant":
        return f"KL weight constant β = {ks.beta_target:g}"
    if ks.kind == "cyclical":
        cycles = math.ceil(ks.total_steps / ks.cycle_steps)
        rise = math.ceil(ks.ratio * ks.cycle_steps)
        return (
            f"KL cyclical: {cycles} cycles of {ks.cycle_steps} steps, β rising "
            f"{ks.beta_min:g} → {ks.beta_target:g} over the first {rise} ({ks.ramp} ramp), "
            f"then held"
        )
    return f"KL warm-up {ks.warmup_steps} steps ({ks.kind}, β {ks.beta_min:g} → {ks.beta_target:g})"


def main() -> None:
    app()


if __name__ == "__main__":
    main()
