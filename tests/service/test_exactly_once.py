"""Repeated identical results over real HTTP: the finish path (Optuna's tell, the sampler's
``after_trial``, the log line, a retry) runs once; every repeat reads the stored answer
(issue 13, item 6)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from helpers import ADMIN, WORKER, spec
from live import LiveServer

from hpo_service.config import Settings

REPEATS = 10


@pytest.fixture
def server(settings: Settings) -> Iterator[LiveServer]:
    # A lease timeout far beyond any tell on a busy machine: no claim is ever taken over here.
    patient = settings.model_copy(update={"lease_timeout_s": 60.0, "heartbeat_interval_s": 10.0})
    with LiveServer(patient) as live:
        yield live


class _Events(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.events: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "event", None)
        if event is not None:
            self.events.append(event)


@pytest.fixture
def events() -> Iterator[_Events]:
    handler = _Events()
    logger = logging.getLogger("hpo_service.studies")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def _lease(server: LiveServer, name: str, **overrides: Any) -> tuple[dict[str, Any], int]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        created = http.post("/v1/studies", json=spec(name, **overrides), headers=ADMIN)
        assert created.status_code == 201, created.text
        granted = http.post("/v1/leases", json={"worker_id": "w"}, headers=WORKER)
        assert granted.status_code == 200, granted.text
    return granted.json(), created.json()["study_id"]


def _all_at_once(server: LiveServer, path: str, body: dict[str, Any]) -> list[httpx.Response]:
    start = threading.Barrier(REPEATS)
    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def send() -> None:
        with httpx.Client(base_url=server.url, headers=WORKER, timeout=120) as http:
            start.wait()
            response = http.post(path, json=body)
        with lock:
            answers.append(response)

    threads = [threading.Thread(target=send) for _ in range(REPEATS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def test_identical_concurrent_completes_finish_the_trial_once(
    server: LiveServer, events: _Events, monkeypatch: pytest.MonkeyPatch
) -> None:
    granted, study_id = _lease(server, "once")
    sampler = server.app.state.service.core.load(study_id).study.sampler
    told: list[int] = []
    original = sampler.after_trial

    def counting(study: Any, trial: Any, state: Any, values: Any) -> None:
        told.append(trial.number)
        # Hold the finish path open a moment, so the repeats arrive while it runs (the window a
        # second tell used to slip through); a slower machine only widens it.
        time.sleep(0.3)
        original(study, trial, state, values)

    monkeypatch.setattr(sampler, "after_trial", counting)
    body = {"lease_token": granted["lease_token"], "values": [101.5], "metrics": {"kl": 1.0}}
    answers = _all_at_once(server, f"/v1/trials/{granted['trial_id']}/complete", body)
    assert [a.status_code for a in answers] == [200] * REPEATS, [a.text for a in answers]
    assert len({a.text for a in answers}) == 1  # the same answer for every repeat
    assert events.events.count("trial_completed") == 1, events.events
    assert told == [granted["trial_number"]]


def test_identical_concurrent_fails_queue_one_retry(server: LiveServer, events: _Events) -> None:
    granted, _ = _lease(server, "fail-once", max_retries=3)
    body = {"lease_token": granted["lease_token"], "reason": "CUDA OOM", "retryable": True}
    answers = _all_at_once(server, f"/v1/trials/{granted['trial_id']}/fail", body)
    assert [a.status_code for a in answers] == [200] * REPEATS, [a.text for a in answers]
    assert len({a.text for a in answers}) == 1
    assert events.events.count("trial_failed") == 1, events.events
    assert events.events.count("retry_queued") == 1, events.events
    with httpx.Client(base_url=server.url, headers=ADMIN) as http:
        counts = http.get("/v1/studies/fail-once").json()["counts"]
    assert (counts["fail"], counts["waiting"], counts["running"]) == (1, 1, 0)
