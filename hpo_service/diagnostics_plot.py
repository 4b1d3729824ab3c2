"""A trial's per-epoch diagnostics drawn as one PNG (server-side, matplotlib's Agg backend).

Nine panels over epochs, the triplet and the knobs VAE practitioners read when a run goes bad
(VAE_DEFINITIONS.md, "What a VAE practitioner monitors"): −ELBO, reconstruction and KL (train
and validation); KL per latent dimension as a heat map (a collapsed dimension is a dark row);
active units (Burda et al. 2016); β(t); LR(t); the pre-clip gradient norm; the clip rate. The
title names what went wrong where it can tell: the epoch a posterior collapse began, and the
epoch of the LR peak.

Only ``matplotlib.figure.Figure`` with an Agg canvas is used, never ``pyplot``: pyplot keeps
global state and is not thread-safe, and renders here run on a background thread.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from hpo_service.history import DIAGNOSTIC_KEYS

#: Below this many nats per example a latent dimension carries no information (the active-units
#: threshold of Burda et al. 2016 is on Var(E[z]) = 0.01; for KL a dimension at ≤ 0.01 nats
#: is as good as the prior).
COLLAPSED_KL = 0.01


@dataclass
class PlotData:
    """What the plot draws, per epoch: scalar series by name and the KL-per-dimension matrix."""

    epochs: list[int]
    series: dict[str, list[float | None]]
    kl_per_dim: list[list[float | None]]  # [dimension][epoch]
    notes: list[str] = field(default_factory=list)

    def last(self, name: str) -> float | None:
        values = [v for v in self.series.get(name, []) if v is not None]
        return values[-1] if values else None


#: The scalar series drawn: every kept diagnostic but the KL-per-dimension matrix (the heat map).
SERIES = tuple(key for key in DIAGNOSTIC_KEYS if key != "kl_per_dim")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def plot_data(records: Sequence[Mapping[str, Any]]) -> PlotData:
    """The series of ``records`` (``history.EpochHistory.records``, oldest first)."""
    epochs = [int(r["epoch"]) for r in records]
    series = {name: [_number(r.get(name)) for r in records] for name in SERIES}
    rows: list[list[Any]] = []
    for record in records:
        row = record.get("kl_per_dim")
        rows.append(row if isinstance(row, list) else [])
    dims = max((len(row) for row in rows), default=0)
    matrix = [[_number(row[d]) if d < len(row) else None for row in rows] for d in range(dims)]
    data = PlotData(epochs=epochs, series=series, kl_per_dim=matrix)
    data.notes = _diagnosis(data)
    return data


def _diagnosis(data: PlotData) -> list[str]:
    """Short findings for the title: where a collapse began, where the LR peaked."""
    notes: list[str] = []
    collapse = data.series["posterior_collapse"]
    kl = data.series["val_kl"]
    floor = COLLAPSED_KL * max(1, len(data.kl_per_dim))  # every dimension at the prior

    def collapsed(index: int) -> bool:
        flagged = (collapse[index] or 0) >= 1  # the trainer's own verdict (KL and AU)
        return flagged or (kl[index] is not None and (kl[index] or 0.0) <= floor)

    # A collapse that lasts to the last epoch (an early dip the model recovers from is not one):
    # the first epoch of the collapsed run at the end.
    start = len(data.epochs)
    while start > 0 and collapsed(start - 1):
        start -= 1
    if start < len(data.epochs):
        notes.append(f"posterior collapse from epoch {data.epochs[start]}")
    lrs = [(lr, e) for lr, e in zip(data.series["lr"], data.epochs, strict=True) if lr is not None]
    if len(lrs) > 1 and max(lr for lr, _ in lrs) > min(lr for lr, _ in lrs):
        peak = max(lr for lr, _ in lrs)
        notes.append(f"LR peak at epoch {next(e for lr, e in lrs if lr == peak)}")
    return notes


def _style(ax: Any, label: str) -> None:
    # Few ticks: laying out tick labels is most of the drawing time (profiled).
    ax.set_title(label, fontsize=10)
    ax.set_xlabel("epoch", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(6, integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(5))


def render_diagnostics(records: Sequence[Mapping[str, Any]], title: str) -> bytes:
    """The PNG of ``records``: nine panels, about 1000×750 pixels."""
    data = plot_data(records)
    figure = Figure(figsize=(12.5, 9.4), dpi=80)
    figure.subplots_adjust(left=0.06, right=0.97, bottom=0.06, top=0.92, wspace=0.28, hspace=0.42)
    FigureCanvasAgg(figure)
    axes = figure.subplots(3, 3)
    epochs = data.epochs

    def lines(ax: Any, names: Sequence[str], label: str, *, log: bool = False) -> None:
        for name in names:
            values = data.series.get(name, [])
            if any(v is not None for v in values):
                ys = [math.nan if v is None else v for v in values]
                ax.plot(epochs, ys, marker="o", ms=2.5, lw=1.2, label=name)
        _style(ax, label)
        if log and any(v is not None and v > 0 for n in names for v in data.series.get(n, [])):
            ax.set_yscale("log")
        if len(names) > 1 and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)

    lines(axes[0][0], ("train_neg_elbo", "val_neg_elbo"), "−ELBO (nats/example)")
    lines(axes[0][1], ("train_recon", "val_recon"), "reconstruction (nats/example)")
    lines(axes[0][2], ("train_kl", "val_kl"), "KL (nats/example)")
    heat = axes[1][0]
    if data.kl_per_dim:
        grid = [[math.nan if v is None else v for v in row] for row in data.kl_per_dim]
        image = heat.imshow(
            grid,
            aspect="auto",
            origin="lower",
            interpolation="nearest",
            cmap="viridis",
            extent=(epochs[0] - 0.5, epochs[-1] + 0.5, -0.5, len(grid) - 0.5),
        )
        figure.colorbar(image, ax=heat, label="nats")
    _style(heat, "validation KL per latent dimension")
    heat.yaxis.set_major_locator(MaxNLocator(6, integer=True))
    heat.set_ylabel("dimension", fontsize=8)
    lines(axes[1][1], ("active_units",), "active units (Burda et al. 2016)")
    lines(axes[1][2], ("beta",), "β (KL weight, last step of the epoch)")
    lines(axes[2][0], ("lr",), "effective LR (last step of the epoch)", log=True)
    lines(
        axes[2][1], ("grad_norm_mean", "grad_norm_max"), "gradient norm before clipping", log=True
    )
    lines(axes[2][2], ("clip_fraction",), "fraction of steps clipped")
    axes[2][2].set_ylim(-0.05, 1.05)
    suffix = f" — {'; '.join(data.notes)}" if data.notes else ""
    figure.suptitle(f"{title}{suffix}", fontsize=12)
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()


@functools.cache
def placeholder_png() -> bytes:
    """What a trial's plot shows until its first drawing replaces it (a trial that finished
    before its plot was drawn): the real plot's size, one line of text. Drawn once per
    process, in the caller's thread (one small figure, not worth the drawing process)."""
    figure = Figure(figsize=(12.5, 9.4), dpi=80)
    FigureCanvasAgg(figure)
    figure.text(0.5, 0.5, "The diagnostics plot is being drawn.", ha="center", fontsize=20)
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()
