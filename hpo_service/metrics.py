"""Prometheus metrics of one server process, served at ``/metrics``.

* ``hpo_trials{study,state}`` — trials per study by state, read through Optuna's storage API
  (through the service's shared Optuna cache, so only unfinished trials are re-read) and reused for
  ``metrics_cache_s`` seconds, so a scrape costs little even with many trials.
* ``hpo_active_workers`` — distinct worker ids holding a lease on a trial that is RUNNING.
* ``hpo_leases_reaped_total`` — trials this process failed because their lease expired.
* ``hpo_http_request_duration_seconds{method,route,status}`` — latency per route template
  (``/v1/leases``, ``/v1/trials/{trial_id}/report``, …). The lease route long-polls: its
  204 answers include the wait, its 200 answers the time until a trial was found.
* ``hpo_storage_up`` — 0 when the last count failed to reach the database.
* the standard ``process_*``, ``python_gc_*`` and ``python_info`` metrics.

Trial counts and active workers come from the shared database, so every replica reports the
same values (aggregate them with ``max``); latencies and reaped leases are per process (``sum``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import optuna
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hpo_service.models import LeaseRow, StudyRow
from hpo_service.studies import StudyService

log = logging.getLogger(__name__)

TRIAL_STATES = tuple(state.name.lower() for state in optuna.trial.TrialState)
# From a heartbeat (~10 ms) to a lease long-poll (default wait 20 s, up to 60 s).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass
class _Snapshot:
    trials: dict[str, dict[str, int]] = field(default_factory=dict)  # study -> state -> count
    active_workers: int = 0
    storage_up: bool = True


class StudyCollector(Collector):
    """Counts trials and live leases at scrape time, at most once per ``cache_s`` seconds."""

    def __init__(self, service: StudyService, cache_s: float) -> None:
        self._service = service
        self._cache_s = cache_s
        self._lock = threading.Lock()
        self._snapshot: _Snapshot | None = None
        self._taken_at = 0.0

    def _count(self) -> _Snapshot:
        with self._service.db.session() as session:
            studies = list(session.execute(select(StudyRow.study_id, StudyRow.name)))
            open_leases = list(
                session.execute(
                    select(LeaseRow.trial_id, LeaseRow.worker_id).where(LeaseRow.outcome.is_(None))
                )
            )
        snapshot = _Snapshot()
        running: set[int] = set()
        for study_id, name in studies:
            try:
                # The service's shared cache: finished trials are read once per process.
                trials = self._service.cache.get_all_trials(study_id, deepcopy=False)
            except KeyError:  # deleted since the listing
                continue
            counts = dict.fromkeys(TRIAL_STATES, 0)
            for trial in trials:
                counts[trial.state.name.lower()] += 1
                if trial.state == optuna.trial.TrialState.RUNNING:
                    running.add(trial._trial_id)
            snapshot.trials[name] = counts
        # A lease whose trial was reaped keeps no outcome; only RUNNING trials make a worker live.
        snapshot.active_workers = len({w for trial_id, w in open_leases if trial_id in running})
        return snapshot

    def snapshot(self) -> _Snapshot:
        with self._lock:
            now = time.monotonic()
            if self._snapshot is not None and now - self._taken_at < self._cache_s:
                return self._snapshot
            try:
                self._snapshot = self._count()
            except Exception:  # a scrape must answer while the database is down
                log.warning("counting trials for /metrics failed", exc_info=True)
                stale = self._snapshot or _Snapshot()
                return _Snapshot(stale.trials, stale.active_workers, storage_up=False)
            self._taken_at = now
            return self._snapshot

    def describe(self) -> Iterable[Metric]:
        # Named here so registering the collector does not query the database.
        return self._families(None)

    def collect(self) -> Iterable[Metric]:
        return self._families(self.snapshot())

    def _families(self, snapshot: _Snapshot | None) -> Iterator[Metric]:
        trials = GaugeMetricFamily(
            "hpo_trials", "Trials per study by state (Optuna storage).", labels=["study", "state"]
        )
        workers = GaugeMetricFamily(
            "hpo_active_workers", "Distinct workers holding a lease on a running trial."
        )
        reaped = CounterMetricFamily(
            "hpo_leases_reaped", "Trials this process failed because their lease expired."
        )
        up = GaugeMetricFamily(
            "hpo_storage_up", "1 if the last trial count reached the database, else 0."
        )
        if snapshot is not None:
            for study, counts in sorted(snapshot.trials.items()):
                for state, count in counts.items():
                    trials.add_metric([study, state], count)
            workers.add_metric([], snapshot.active_workers)
            reaped.add_metric([], self._service.reaped_leases)
            up.add_metric([], 1 if snapshot.storage_up else 0)
        yield from (trials, workers, reaped, up)


class ServiceMetrics:
    """One registry per app, so two apps in one process (tests, replicas) never share counts."""

    def __init__(self, service: StudyService, cache_s: float) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.registry.register(StudyCollector(service, cache_s))
        self.request_seconds = Histogram(
            "hpo_http_request_duration_seconds",
            "HTTP request latency by route template, in seconds.",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestTimer:
    """ASGI middleware: time each HTTP request and label it by the route that matched."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client sees if the app raises before answering

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.request_seconds.labels(
                scope["method"], route_label(scope), str(status)
            ).observe(time.perf_counter() - started)


def route_label(scope: Scope) -> str:
    """The matched route's template, e.g. ``/v1/trials/{trial_id}/report``.

    Never the raw path, which holds trial ids and would grow the label set without bound. The
    router leaves the matched route in the scope, but FastAPI gives an included router's route
    its path without the prefix (``/trials/{trial_id}/report``), so the prefix is taken from the
    leading segments of the raw path the template does not cover (our templates have no
    ``{name:path}`` parameters, so one template segment matches one path segment).
    """
    route = scope.get("route")
    template = getattr(route, "path", None)
    if route is None:
        return "<unmatched>"
    if not template:
        return "/"  # a mount at the root (the dashboard)
    raw = scope["path"].rstrip("/").split("/")
    covered = len(template.rstrip("/").split("/")) - 1
    prefix = "/".join(raw[: len(raw) - covered]) if covered < len(raw) else ""
    return f"{prefix}{template}"
