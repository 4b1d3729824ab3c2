"""Per-epoch diagnostics history (issue 14): every epoch kept once, compactly and within its
bound, returned by the API, drawn as a PNG the dashboard lists and serves. On a real SQLite file
and PostgreSQL, through the real app."""

from __future__ import annotations

import json
import struct
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from byo_helpers import wait_for
from fastapi.testclient import TestClient
from helpers import ADMIN, VIEWER, WORKER, spec
from sqlalchemy import func, select

from hpo_service.app import create_app
from hpo_service.artifacts import ARTIFACT_ATTR_PREFIX
from hpo_service.config import Settings
from hpo_service.history import (
    DROPPED_KEY,
    MAX_HISTORY_EPOCHS,
    MAX_RECORD_BYTES,
    compact_record,
)
from hpo_service.models import EpochRecordRow

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def epoch_metrics(epoch: int, dims: int = 4) -> dict[str, Any]:
    return {
        "train_neg_elbo": 200.0 - epoch,
        "val_neg_elbo": 201.123456789 - epoch,
        "train_kl": 10.0 + epoch,
        "val_kl": 9.5 + epoch,
        "active_units": 3,
        "beta": min(1.0, epoch / 2),
        "lr": 1e-3 * epoch,
        "grad_norm_mean": 4.0,
        "clip_fraction": 0.25,
        "kl_per_dim": [0.5 * d + epoch for d in range(dims)],
    }


def test_a_record_is_rounded_and_never_over_its_bound() -> None:
    small = compact_record(epoch_metrics(1))
    assert small["val_neg_elbo"] == 200.123  # 6 significant digits
    assert DROPPED_KEY not in small
    # A report the wire accepts (lists of up to 4096 numbers) but too big to keep whole: the
    # largest lists the plot does not draw go first, the plot's own keys stay.
    big = {
        **epoch_metrics(1, dims=64),
        "per_example_loss": [123.456789] * 4096,
        "other_list": [1.5] * 300,
        **{f"extra_{i:03d}": float(i) for i in range(50)},
    }
    kept = compact_record(big)
    assert len(json.dumps(kept, separators=(",", ":")).encode()) <= MAX_RECORD_BYTES
    assert kept[DROPPED_KEY][0] == "per_example_loss"
    assert "per_example_loss" not in kept and len(kept["kl_per_dim"]) == 64
    assert kept["val_kl"] == 10.5 and "extra_000" in kept
    # Nothing but names too long to list: the count of what was shed stays.
    absurd = {f"{'n' * 90}{i:03d}": [1.0] * 40 for i in range(256)}
    assert compact_record(absurd) == {DROPPED_KEY: 256}


@pytest.fixture
def app_client(settings: Settings) -> Iterator[TestClient]:
    app = create_app(settings.model_copy(update={"diagnostics_plot_every": 2}))
    with TestClient(app) as client:
        yield client
    app.state.service.storage.engine.dispose()


def _lease(client: TestClient, name: str, **overrides: Any) -> dict[str, Any]:
    body = spec(name=name, pruner={"name": "none"}, **overrides)
    created = client.post("/v1/studies", json=body, headers=ADMIN)
    assert created.status_code == 201, created.text
    leased = client.post("/v1/leases", json={"worker_id": "w"}, headers=WORKER)
    assert leased.status_code == 200, leased.text
    return {**leased.json(), "study_id": created.json()["study_id"]}


def _report(client: TestClient, lease: dict[str, Any], epoch: int, **metrics: Any) -> None:
    body = {
        "lease_token": lease["lease_token"],
        "epoch": epoch,
        "value": 100.0 - epoch,
        "metrics": metrics or epoch_metrics(epoch),
    }
    answer = client.post(f"/v1/trials/{lease['trial_id']}/report", json=body, headers=WORKER)
    assert answer.status_code == 200, answer.text


def test_every_epoch_is_kept_once_bounded_and_returned(app_client: TestClient) -> None:
    client = app_client
    lease = _lease(client, "hist")
    for epoch in (1, 2, 3):
        _report(client, lease, epoch)
    _report(client, lease, 2, val_kl=999.0)  # a repeat keeps the first record, as Optuna does
    _report(client, lease, 4, **epoch_metrics(4), huge=[1.0] * 4096)
    _report(client, lease, MAX_HISTORY_EPOCHS + 1)  # beyond the per-trial bound: not kept

    history = client.get("/v1/studies/hist/trials/0/history", headers=VIEWER)
    assert history.status_code == 200, history.text
    body = history.json()
    assert body["trial_id"] == lease["trial_id"] and body["state"] == "running"
    assert (body["max_record_bytes"], body["max_epochs"]) == (MAX_RECORD_BYTES, MAX_HISTORY_EPOCHS)
    epochs = body["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4]
    assert epochs[1]["val_kl"] == 11.5  # the first report of epoch 2, not the repeat
    assert epochs[2]["kl_per_dim"] == [3.0, 3.5, 4.0, 4.5]
    assert epochs[3][DROPPED_KEY] == ["huge"] and epochs[3]["val_kl"] == 13.5
    # Optuna's own attribute still holds only the latest report, as before.
    trials = client.get("/v1/studies/hist/trials", headers=VIEWER).json()["trials"]
    assert trials[0]["metrics"]["epoch"] == MAX_HISTORY_EPOCHS + 1

    # Completing replaces Optuna's metrics with the final ones; the history stays.
    done = client.post(
        f"/v1/trials/{lease['trial_id']}/complete",
        json={"lease_token": lease["lease_token"], "values": [96.0], "metrics": {"x": 1.0}},
        headers=WORKER,
    )
    assert done.status_code == 200, done.text
    after = client.get("/v1/studies/hist/trials/0/history", headers=VIEWER).json()
    assert [e["epoch"] for e in after["epochs"]] == [1, 2, 3, 4]
    assert after["state"] == "complete"


def test_history_answers_name_what_is_missing(app_client: TestClient) -> None:
    client = app_client
    _lease(client, "hist404")
    missing_study = client.get("/v1/studies/nope/trials/0/history", headers=VIEWER)
    assert missing_study.status_code == 404
    assert missing_study.json()["error"]["code"] == "study_not_found"
    missing_trial = client.get("/v1/studies/hist404/trials/7/history", headers=VIEWER)
    assert missing_trial.status_code == 404
    assert missing_trial.json()["error"]["code"] == "trial_not_found"
    assert "no trial number 7" in missing_trial.json()["error"]["message"]
    bad = client.get("/v1/studies/hist404/trials/-1/history", headers=VIEWER)
    assert bad.status_code == 422 and "number" in bad.text
    assert client.get("/v1/studies/hist404/trials/0/history").status_code == 401
    assert client.get("/v1/studies/hist404/trials/0/history", headers=WORKER).status_code == 200


def test_deleting_a_study_deletes_its_history(app_client: TestClient) -> None:
    client = app_client
    lease = _lease(client, "gone")
    _report(client, lease, 1)
    db = client.app.state.service.db  # type: ignore[attr-defined]

    def count() -> int:
        with db.session() as session:
            where = EpochRecordRow.study_id == lease["study_id"]
            return int(session.scalar(select(func.count()).where(where)) or 0)

    assert count() == 1
    assert client.delete("/v1/studies/gone", headers=ADMIN).status_code == 204
    assert count() == 0


def _png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == PNG_SIGNATURE
    assert png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    return int(width), int(height)


def _listed_plot(client: TestClient, study_id: int, trial_id: int) -> list[dict[str, Any]]:
    detail = client.get(f"/api/studies/{study_id}", headers=VIEWER).json()
    (trial,) = [t for t in detail["trials"] if t["trial_id"] == trial_id]
    return [a for a in trial["artifacts"] if a["filename"] == "diagnostics.png"]


def test_the_plot_is_listed_while_running_refreshed_and_served(app_client: TestClient) -> None:
    client = app_client
    lease = _lease(client, "plots")
    study_id, trial_id = lease["study_id"], lease["trial_id"]
    _report(client, lease, 1)  # the first epoch lists the plot (in the background)
    listed = wait_for(lambda: _listed_plot(client, study_id, trial_id), 120, "plot listed")
    assert listed[0]["mimetype"] == "image/png"
    url = f"/artifacts/{study_id}/{trial_id}/{listed[0]['artifact_id']}"
    history = client.get("/v1/studies/plots/trials/0/history", headers=VIEWER).json()
    assert history["plot"] == url
    first = client.get(url, headers=VIEWER)
    assert first.status_code == 200
    assert _png_size(first.content) == (1000, 752) and len(first.content) > 20_000

    # Every 2 epochs (the setting) it is redrawn in place: same listing, new bytes.
    _report(client, lease, 2)
    second = wait_for(
        lambda: (got := client.get(url, headers=VIEWER).content) != first.content and got,
        120,
        "plot redrawn at epoch 2",
    )
    _report(client, lease, 3)  # not a redraw epoch
    done = client.post(
        f"/v1/trials/{trial_id}/complete",
        json={"lease_token": lease["lease_token"], "values": [97.0], "metrics": {}},
        headers=WORKER,
    )
    assert done.status_code == 200, done.text
    # The last drawing (queued before the tell) shows all three epochs.
    last = wait_for(
        lambda: (got := client.get(url, headers=VIEWER).content) != second and got,
        120,
        "last plot drawn after complete",
    )
    assert _png_size(last) == (1000, 752)
    assert len(_listed_plot(client, study_id, trial_id)) == 1  # one listing, refreshed


def test_a_trial_finished_before_its_first_drawing_is_listed_then_drawn(
    settings: Settings,
) -> None:
    app = create_app(settings.model_copy(update={"diagnostics_plot_every": 5}))
    diagnostics = app.state.service.diagnostics
    queue = diagnostics._queue
    with TestClient(app) as client:
        # The first epoch's refresh is never queued: nothing is listed before the result.
        diagnostics._queue = lambda row, last: queue(row, last=True) if last else None  # type: ignore[method-assign]
        lease = _lease(client, "quick")
        _report(client, lease, 1)
        # (asked of the storage: the dashboard would cache its answer for a few seconds)
        attrs = app.state.service.storage.get_trial_system_attrs(lease["trial_id"])
        assert not [key for key in attrs if key.startswith(ARTIFACT_ATTR_PREFIX)]
        failed = client.post(
            f"/v1/trials/{lease['trial_id']}/fail",
            json={"lease_token": lease["lease_token"], "reason": "pruned", "pruned": True},
            headers=WORKER,
        )
        assert failed.status_code == 200, failed.text
        # Listed before the tell (Optuna refuses it after), with a real PNG in place...
        (listed,) = _listed_plot(client, lease["study_id"], lease["trial_id"])
        url = f"/artifacts/{lease['study_id']}/{lease['trial_id']}/{listed['artifact_id']}"
        placeholder = client.get(url, headers=VIEWER).content
        assert _png_size(placeholder) == (1000, 752)
        # ...that the queued last drawing replaces with the trial's curves.
        drawn = wait_for(
            lambda: (got := client.get(url, headers=VIEWER).content) != placeholder and got,
            120,
            "the last drawing replaced the placeholder",
        )
        assert _png_size(drawn) == (1000, 752) and len(drawn) > 20_000
        assert len(_listed_plot(client, lease["study_id"], lease["trial_id"])) == 1
    app.state.service.storage.engine.dispose()


def test_a_result_never_waits_for_the_drawing_process(settings: Settings) -> None:
    """complete answers while every drawing is stuck: the result is told, the plot follows
    (it made 32 concurrent completes wait ≈ 0.3 s each in series before)."""
    app = create_app(settings.model_copy(update={"diagnostics_plot_every": 5}))
    diagnostics = app.state.service.diagnostics
    released = threading.Event()
    in_child = diagnostics._in_child

    def stuck(render: Any, *args: Any) -> Any:
        released.wait()
        return in_child(render, *args)

    diagnostics._in_child = stuck  # type: ignore[method-assign]
    with TestClient(app) as client:
        lease = _lease(client, "stuck")
        _report(client, lease, 1)  # its first drawing is now stuck
        answers: list[int] = []
        completing = threading.Thread(
            target=lambda: answers.append(
                client.post(
                    f"/v1/trials/{lease['trial_id']}/complete",
                    json={"lease_token": lease["lease_token"], "values": [90.0], "metrics": {}},
                    headers=WORKER,
                ).status_code
            )
        )
        completing.start()
        completing.join(timeout=300)  # generous: only a result that waits on the drawing hangs
        alive = completing.is_alive()
        released.set()  # let the drawings (and a hung complete) finish before the app stops
        completing.join()
        assert not alive, "complete waited for the drawing process"
        assert answers == [200]
        (listed,) = _listed_plot(client, lease["study_id"], lease["trial_id"])
        assert listed["filename"] == "diagnostics.png"
    app.state.service.storage.engine.dispose()
