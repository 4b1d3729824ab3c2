"""The LR range test's drawing (``hpo_service.lr_range_plot``): what a study's outcome puts on
the plot, in the curve's own (effective) LR units."""

from __future__ import annotations

import pytest

from hpo_service.lr_range_plot import render_study_lr_range, study_curve

PNG = b"\x89PNG\r\n\x1a\n"


def outcome(**overrides: object) -> dict:
    lrs = [1e-6 * 10 ** (i / 4) for i in range(20)]
    base = {
        "probe_trial": 0,
        "status": "applied",
        "ranges": {"base_lr": [1e-4, 2e-3], "max_lr_factor": [2.0, 10.0]},
        "suggested": {"base_lr": 1e-4, "max_lr": 2e-3},
        "curve": {"lrs": lrs, "losses": [100.0 - i for i in range(20)], "smoothed": []},
        "lr_scale": 2.0,  # batch 256 against a reference of 128, linear scaling
        "batch_size": 256,
        "stopped_on_divergence": True,
    }
    return {**base, **overrides}


def test_suggestions_and_the_applied_range_are_drawn_at_effective_lrs() -> None:
    curve = study_curve("s", outcome())
    assert curve is not None
    # stored in config units (reference batch), drawn on the ramp's effective axis: × lr_scale
    assert [(m.label, m.lr) for m in curve.marks] == [
        ("suggested base_lr", pytest.approx(2e-4)),
        ("suggested max_lr (Smith)", pytest.approx(4e-3)),
    ]
    assert curve.applied == (pytest.approx(2e-4), pytest.approx(4e-3))
    assert curve.batch_size == 256 and curve.stopped_on_divergence
    assert any("max_lr_factor" in note and "10" in note for note in curve.notes)


def test_a_failed_test_shows_its_curve_and_why_without_a_range() -> None:
    failed = outcome(status="failed", reason="the curve gave no range; the default ranges are kept")
    failed.pop("ranges")
    failed["suggested"] = {"base_lr": None, "max_lr": None}
    curve = study_curve("s", failed)
    assert curve is not None
    assert curve.applied is None and curve.marks == []
    assert curve.notes == ["the curve gave no range; the default ranges are kept"]
    png = render_study_lr_range("s", failed)
    assert png is not None and png[:8] == PNG


def test_no_curve_draws_nothing() -> None:
    assert study_curve("s", outcome(curve={})) is None
    assert render_study_lr_range("s", {"status": "failed", "reason": "probe died"}) is None


def test_the_drawing_is_a_png_that_changes_with_the_range() -> None:
    applied = render_study_lr_range("s", outcome())
    narrower = render_study_lr_range(
        "s", outcome(ranges={"base_lr": [5e-4, 1e-3], "max_lr_factor": [2.0, 2.5]})
    )
    assert applied is not None and narrower is not None
    assert applied[:8] == PNG and narrower[:8] == PNG
    assert applied != narrower  # the shaded range is drawn
