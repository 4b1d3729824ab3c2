"""The LR range test's curve drawn as a PNG: loss against LR on a log axis, raw and smoothed,
the suggestions marked and the range a study took from them shaded (Smith 2017, §3.3).

One drawing for both sides: ``hpo-train lr-find`` writes it next to its JSON
(``trainers.lr_finder.plot_lr_finder``) and the server attaches it to a study whose LR range test
step has run (``studies._probes``), so the dashboard shows it on the study's page. Only
``matplotlib.figure.Figure`` with an Agg canvas is used, never ``pyplot`` (global state, not
thread-safe, wants a display); no torch, so the server may import it.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Mark:
    """A vertical line at an LR on the curve's (effective) axis."""

    lr: float
    label: str
    color: str


@dataclass(frozen=True)
class RangeCurve:
    """What the drawing shows. LRs are effective (the ramp's own, after batch-size scaling)."""

    lrs: Sequence[float]
    losses: Sequence[float]
    smoothed: Sequence[float]
    batch_size: int
    marks: Sequence[Mark] = ()
    #: The range a study set for ``base_lr`` from the test, effective units; None: none set.
    applied: tuple[float, float] | None = None
    stopped_on_divergence: bool = False
    ylabel: str = "objective (nats/example)"
    title: str = "LR range test"
    notes: Sequence[str] = field(default_factory=tuple)


def render_lr_range(curve: RangeCurve) -> bytes:
    """The PNG bytes of ``curve``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    drawn = bool(curve.lrs) and len(curve.losses) == len(curve.lrs)
    has_smoothed = len(curve.smoothed) == len(curve.lrs)
    smoothed = list(curve.smoothed) if has_smoothed else list(curve.losses)
    if drawn:
        ax.plot(curve.lrs, curve.losses, color="0.75", lw=1, label="loss")
        if has_smoothed:
            ax.plot(curve.lrs, smoothed, color="C0", lw=2, label="smoothed (debiased EMA)")
        ax.set_xscale("log")
        # Clip the y axis at twice the initial drop: the exploding tail would squash the descent.
        low = min(*smoothed, *curve.losses)
        top = min(max(smoothed), smoothed[0] + (smoothed[0] - low))
        pad = 0.05 * (top - low) + 1e-9 * (abs(low) + 1.0)  # never an empty range
        ax.set_ylim(low - pad, top + pad)
    if curve.applied is not None:
        lo, hi = curve.applied
        ax.axvspan(lo, hi, color="C2", alpha=0.12, label=f"base_lr range {lo:.2e}–{hi:.2e}")
    for mark in curve.marks:
        ax.axvline(mark.lr, color=mark.color, ls="--", lw=1, label=f"{mark.label} {mark.lr:.2e}")
    ax.set_xlabel(f"learning rate (effective, batch {curve.batch_size})")
    ax.set_ylabel(curve.ylabel)
    title = curve.title + (" — stopped on divergence" if curve.stopped_on_divergence else "")
    ax.set_title(title)
    for row, note in enumerate(curve.notes):
        ax.text(0.01, 0.02 + 0.05 * row, note, transform=ax.transAxes, fontsize=8, color="0.3")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def study_curve(study_name: str, outcome: dict) -> RangeCurve | None:
    """The drawing of a study's ``lr_range_test`` outcome attribute (``hpo_service.lr_range``),
    or None when the outcome holds no curve. Suggestions are stored in config units (the
    reference batch size); the curve is effective, so both are drawn on the effective axis."""
    points = outcome.get("curve") or {}
    lrs = list(points.get("lrs") or [])
    if not lrs:
        return None
    scale = float(outcome.get("lr_scale") or 1.0)
    suggested = outcome.get("suggested") or {}
    marks = [
        Mark(value * scale, label, color)
        for key, label, color in (
            ("base_lr", "suggested base_lr", "C2"),
            ("max_lr", "suggested max_lr (Smith)", "C3"),
        )
        if (value := suggested.get(key)) is not None
    ]
    applied = None
    notes: list[str] = []
    if outcome.get("status") == "applied":
        low, high = outcome["ranges"]["base_lr"]
        applied = (low * scale, high * scale)
        factor = outcome["ranges"].get("max_lr_factor")
        if factor:
            notes.append(f"max_lr_factor range set to {factor[0]:g}–{factor[1]:.3g}")
    else:
        notes.append(str(outcome.get("reason", "no range set")))
    return RangeCurve(
        lrs=lrs,
        losses=list(points.get("losses") or []),
        smoothed=list(points.get("smoothed") or []),
        batch_size=int(outcome.get("batch_size") or 0),
        marks=marks,
        applied=applied,
        stopped_on_divergence=bool(outcome.get("stopped_on_divergence")),
        title=f"{study_name} · LR range test (probe trial {outcome.get('probe_trial')})",
        notes=notes,
    )


def render_study_lr_range(study_name: str, outcome: dict) -> bytes | None:
    """The PNG of a study's test outcome, or None when it holds no curve (a module-level
    function, so the server's drawing process can run it)."""
    curve = study_curve(study_name, outcome)
    return None if curve is None else render_lr_range(curve)
