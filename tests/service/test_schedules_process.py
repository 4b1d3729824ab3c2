"""`hpo scheduler` as real processes: two of them on one PostgreSQL database fire a due schedule
once and stop cleanly on SIGTERM; on SQLite the command refuses (one writer process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import TOKENS, VIEWER
from live import LiveServer
from schedule_helpers import SimClock, nodes, schedule_settings, schedule_spec
from sqlalchemy import select

from hpo_service.models import FiringRow, StudyRow


def wait_for(predicate: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_two_scheduler_processes_fire_a_due_schedule_once_or_refuse_sqlite(
    database_url: str, tmp_path: Path
) -> None:
    if database_url.startswith("sqlite"):
        # SQLite has one writer process, the server: the standalone scheduler refuses.
        refused = subprocess.run(
            [sys.executable, "-m", "hpo_service", "scheduler"],
            env={**os.environ, "HPO_DATABASE_URL": database_url},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode == 2 and "one writer process" in refused.stdout
        return
    now = datetime.now(UTC)
    fired_at = now - timedelta(hours=2)  # a daily fire time two hours ago, well within grace
    clock = SimClock(now - timedelta(days=2))
    with nodes(schedule_settings(database_url), clock, 1) as [node]:
        node.schedules.create(schedule_spec(cron=f"{fired_at.minute} {fired_at.hour} * * *"))
        env = {
            **os.environ,
            "HPO_DATABASE_URL": database_url,
            "HPO_SCHEDULER_TICK_S": "0.5",
            "HPO_LOG_LEVEL": "info",
            "HPO_DB_CONNECT_RETRIES": "0",
        }
        logs = [tmp_path / f"scheduler{i}.log" for i in range(2)]
        processes = [
            subprocess.Popen(
                [sys.executable, "-m", "hpo_service", "scheduler"],
                env=env,
                stdout=log.open("wb"),
                stderr=subprocess.STDOUT,
            )
            for log in logs
        ]
        try:

            def fired() -> list[FiringRow]:
                for process, log in zip(processes, logs, strict=True):
                    assert process.poll() is None, log.read_text()
                with node.studies.db.session() as session:
                    return list(
                        session.scalars(select(FiringRow).where(FiringRow.status == "created"))
                    )

            wait_for(fired, 120, "a created firing")
            # Both keep ticking over the same fire time; wait until each has ticked past it.
            for log in logs:
                wait_for(lambda log=log: "scheduler ticking" in log.read_text(), 60, "ticking")
            time.sleep(2)  # a few more ticks of each (0.5 s apart) over the claimed fire time
        finally:
            for process in processes:
                process.send_signal(signal.SIGTERM)
            codes = [process.wait(timeout=30) for process in processes]
        outputs = [log.read_text() for log in logs]
        assert codes == [0, 0], outputs
        assert all("scheduler stopped" in output for output in outputs)
        with node.studies.db.session() as session:
            studies = list(session.scalars(select(StudyRow.name)))
            created = list(
                session.scalars(select(FiringRow.kind).where(FiringRow.status == "created"))
            )
        assert studies == [f"nightly-{fired_at:%Y-%m-%d}"]
        assert created == ["catch_up"]  # the day before was missed: coalesced into this one


def test_hpo_serve_runs_the_scheduler_embedded(database_url: str) -> None:
    """A real uvicorn server with the default HPO_RUN_SCHEDULER=true fires a due schedule at
    start-up (a catch-up after its downtime) and reports it through the API."""
    now = datetime.now(UTC)
    fired_at = now - timedelta(hours=2)
    with nodes(schedule_settings(database_url), SimClock(now - timedelta(days=2)), 1) as [node]:
        node.schedules.create(schedule_spec(cron=f"{fired_at.minute} {fired_at.hour} * * *"))
    settings = schedule_settings(
        database_url, tokens=TOKENS, run_scheduler=True, scheduler_tick_s=0.5
    )
    with LiveServer(settings) as live, httpx.Client(base_url=live.url, headers=VIEWER) as http:

        def last_firing() -> dict[str, Any] | None:
            firing = http.get("/v1/schedules/nightly").json()["last_firing"]
            return firing if firing and firing["status"] == "created" else None

        firing = wait_for(last_firing, 60, "the embedded scheduler to fire")
        assert firing["kind"] == "catch_up"
        assert firing["study"] == f"nightly-{fired_at:%Y-%m-%d}"
        assert http.get(f"/v1/studies/{firing['study']}").json()["state"] == "running"
