"""The morning report: per-night results, drift, importances, and a planted regression flagged —
through the REST API, with the nights made by the scheduler on a simulated clock."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import TOKENS, VIEWER
from matplotlib.image import imread
from schedule_helpers import (
    Node,
    SimClock,
    nodes,
    plant,
    schedule_settings,
    schedule_spec,
    template,
    utc,
)

from hpo_service.app import create_app
from hpo_service.reports import MIN_TRIALS_FOR_IMPORTANCE, build_report

#: Best value planted per night (minimised); night 4 is 15.8 % worse than night 2's 95.
NIGHTS: list[list[Any]] = [
    [100.0, 104.0, "pruned", "fail"],
    [95.0 + i for i in range(MIN_TRIALS_FOR_IMPORTANCE)],  # enough trials for importances
    [96.0],  # 1 % worse than the best so far: within the 5 % threshold
    [110.0, 111.0],  # the planted regression
    [],  # nothing finished: no value, no flag
]


def run_nights(node: Node, nights: list[list[Any]]) -> list[list[dict[str, Any]]]:
    planted = []
    for day, values in enumerate(nights, start=1):
        node.scheduler.tick(utc(2026, 1, day, 2, 30))
        study = f"nightly-2026-01-{day:02d}"
        planted.append(plant(node.studies, study, values))
        node.studies.set_state(study, "stopped")
    return planted


@pytest.fixture
def api(database_url: str) -> Iterator[TestClient]:
    app = create_app(schedule_settings(database_url, tokens=TOKENS))
    with TestClient(app) as client:
        yield client
    app.state.service.storage.engine.dispose()


def red_pixels(png: bytes) -> int:
    image = imread(io.BytesIO(png))
    red = (image[..., 0] > 0.9) & (image[..., 1] < 0.2) & (image[..., 2] < 0.2)
    return int(np.count_nonzero(red))


def test_the_report_flags_a_planted_regression(database_url: str, api: TestClient) -> None:
    clock = SimClock(utc(2026, 1, 1))
    with nodes(schedule_settings(database_url), clock, 1) as [node]:
        node.schedules.create(schedule_spec(warm_start_top_k=0, regression_threshold=0.05))
        planted = run_nights(node, NIGHTS)

    response = api.get("/v1/schedules/nightly/report", headers=VIEWER)
    assert response.status_code == 200, response.text
    report = response.json()
    nights = report["nights"]
    assert [n["date"] for n in nights] == [f"2026-01-0{d}" for d in range(1, 6)]
    assert [n["best_value"] for n in nights] == [100.0, 95.0, 96.0, 110.0, None]
    assert [n["regression"] for n in nights] == [False, False, False, True, False]
    assert report["regressions"] == ["nightly-2026-01-04"]
    assert report["best_study"] == "nightly-2026-01-02" and report["best_value"] == 95.0
    assert nights[2]["change_vs_best"] == pytest.approx(1 / 95)
    assert nights[3]["change_vs_best"] == pytest.approx(15 / 95)
    assert nights[4]["note"] == "no complete trial"
    assert nights[0]["trials"] == {
        "waiting": 0,
        "running": 0,
        "complete": 2,
        "pruned": 1,
        "fail": 1,
    }
    assert nights[1]["best_params"] == planted[1][0]  # the 95.0 trial
    # Drift of night 2's best against night 1's best, parameter by parameter.
    drift = {d["name"]: d for d in nights[1]["drift"]}
    before, after = planted[0][0]["base_lr"], planted[1][0]["base_lr"]
    assert drift["base_lr"]["previous"] == before and drift["base_lr"]["current"] == after
    assert drift["base_lr"]["relative_change"] == pytest.approx((after - before) / before)
    assert drift["base_lr"]["changed"] is True
    assert nights[0]["drift"] == []  # nothing to compare the first night with
    # Importances only where there are enough complete trials.
    importances = nights[1]["importances"]
    assert importances and set(importances) <= {k for params in planted[1] for k in params}
    assert sum(importances.values()) == pytest.approx(1.0)
    assert nights[0]["importances"] == {}
    assert "importances need" in nights[0]["importance_note"]

    png = api.get("/v1/schedules/nightly/report.png", headers=VIEWER)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert imread(io.BytesIO(png.content)).shape[:2] == (450, 900)
    assert red_pixels(png.content) > 0  # the regression marker
    # In a window of the last two nights, night 4 has no earlier run to be worse than.
    window = api.get("/v1/schedules/nightly/report?nights=2", headers=VIEWER).json()
    assert [n["study"] for n in window["nights"]] == ["nightly-2026-01-04", "nightly-2026-01-05"]
    assert window["regressions"] == []
    assert (
        red_pixels(api.get("/v1/schedules/nightly/report.png?nights=2", headers=VIEWER).content)
        == 0
    )


@pytest.mark.parametrize(("second", "flagged"), [(8.0, True), (9.5, False), (12.0, False)])
def test_regressions_follow_the_objectives_direction(
    database_url: str, second: float, flagged: bool
) -> None:
    """``active_units`` is maximised: dropping from 10 to 8 is 20 % worse (threshold 10 %)."""
    clock = SimClock(utc(2026, 1, 1))
    spec = schedule_spec(
        template=template(objectives=[{"metric": "active_units"}]),
        warm_start_top_k=0,
        regression_threshold=0.1,
    )
    with nodes(schedule_settings(database_url), clock, 1) as [node]:
        node.schedules.create(spec)
        run_nights(node, [[10.0], [second]])
        report = build_report(node.studies, "nightly")
    assert report.direction == "maximize"
    assert [n.regression for n in report.nights] == [False, flagged]
    assert report.nights[1].change_vs_best == pytest.approx((10.0 - second) / 10.0)


def test_a_multi_objective_template_is_reported_on_its_first_objective(database_url: str) -> None:
    clock = SimClock(utc(2026, 1, 1))
    objectives = [{"metric": "val_neg_elbo"}, {"metric": "active_units"}]
    with nodes(schedule_settings(database_url), clock, 1) as [node]:
        node.schedules.create(schedule_spec(template=template(objectives=objectives)))
        node.scheduler.tick(utc(2026, 1, 1, 2, 30))
        report = build_report(node.studies, "nightly")
    assert report.metric == "val_neg_elbo" and report.direction == "minimize"
    assert report.note is not None and "follows the first" in report.note
    assert [n.study for n in report.nights] == ["nightly-2026-01-01"]
