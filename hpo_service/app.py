"""The composition root: routers, error handlers, the reaper, the lifespan, the dashboard."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
import optuna
from fastapi import FastAPI

from hpo_service.api.errors import InternalErrorGuard, install_error_handlers
from hpo_service.api.limits import BodyLimit
from hpo_service.api.openapi import install_openapi
from hpo_service.api.routes import (
    batch,
    checkpoints,
    docs,
    final_eval,
    health,
    schedules,
    studies,
    trials,
    workers,
)
from hpo_service.artifacts import build_artifact_store
from hpo_service.config import Settings
from hpo_service.dashboard import mount_dashboard
from hpo_service.metrics import RequestTimer, ServiceMetrics
from hpo_service.scheduler import Scheduler, run_scheduler
from hpo_service.schedules import ScheduleService
from hpo_service.studies import StudyService

log = logging.getLogger(__name__)

API_PREFIX = "/v1"  # not /api: the dashboard owns /api/* when mounted at the root


def _reaper(service: StudyService, interval_s: float, stop: threading.Event) -> None:
    while not stop.wait(interval_s):
        try:
            service.reap()
        except Exception:  # keep reaping after a transient database error
            log.exception("reaping expired leases failed")


def create_app(settings: Settings, storage: optuna.storages.RDBStorage | None = None) -> FastAPI:
    """Build the app. Raises ValueError if the settings are unsafe (open non-loopback bind)."""
    settings.check_safe_to_serve()
    # Checkpoints and diagnostics plots (artifacts.py); the dashboard serves them too.
    artifact_store = build_artifact_store(settings)
    service = StudyService(settings, storage, artifact_store)
    scheduler = Scheduler(service, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Long-polling leases hold a worker thread each; allow many concurrent workers.
        anyio.to_thread.current_default_thread_limiter().total_tokens = 200
        stop = threading.Event()
        reaper = threading.Thread(
            target=_reaper,
            args=(service, settings.reap_interval_s, stop),
            daemon=True,
            name="hpo-reaper",
        )
        if settings.run_reaper:
            reaper.start()
        # The embedded scheduler; replicas may all run one (firing is exactly-once in the DB).
        ticker = threading.Thread(
            target=run_scheduler,
            args=(scheduler, settings.scheduler_tick_s, stop),
            daemon=True,
            name="hpo-scheduler",
        )
        if settings.run_scheduler:
            ticker.start()
        yield
        stop.set()
        if reaper.is_alive():
            reaper.join(timeout=5)
        if ticker.is_alive():
            ticker.join(timeout=30)
        service.diagnostics.shutdown()

    app = FastAPI(
        title="VAE HPO service",
        version="1",
        description="Optuna studies for VAE training over REST; GPU workers pull trials.",
        lifespan=lifespan,
        # Served by routes/docs.py, behind a token once tokens are set (HPO_PUBLIC_DOCS).
        docs_url=None,
        openapi_url=None,
        redoc_url=None,
    )
    app.state.service = service
    app.state.artifact_store = artifact_store
    app.state.schedules = ScheduleService(service, settings)
    app.state.scheduler = scheduler
    app.state.settings = settings
    app.state.tokens = settings.token_scopes()
    install_error_handlers(app)
    # Middleware, innermost first: the guard answers what escaped every handler (no dropped
    # connection), the body limit refuses before anything reads, the timer sees final statuses.
    app.add_middleware(InternalErrorGuard, retry_after_s=settings.storage_retry_after_s)
    app.add_middleware(
        BodyLimit, limit=settings.max_body_bytes, large_limit=settings.max_checkpoint_bytes
    )
    # Observability: /readyz, /metrics and per-route latencies (metrics.py).
    app.state.metrics = ServiceMetrics(service, settings.metrics_cache_s)
    app.add_middleware(RequestTimer, metrics=app.state.metrics)
    app.include_router(health.router)
    app.include_router(studies.router, prefix=API_PREFIX)
    app.include_router(workers.router, prefix=API_PREFIX)
    app.include_router(checkpoints.router, prefix=API_PREFIX)
    app.include_router(final_eval.router, prefix=API_PREFIX)  # issue 14.4
    app.include_router(batch.router, prefix=API_PREFIX)
    app.include_router(trials.router, prefix=API_PREFIX)  # issue 14: history, config, record
    app.include_router(schedules.router, prefix=API_PREFIX)
    app.include_router(docs.router_for(API_PREFIX, public=settings.public_docs))

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    # The dashboard answers only what no route above (or added later) matched: see dashboard.py.
    mount_dashboard(app, service.storage, app.state.artifact_store)
    install_openapi(app)  # scopes and error answers of every route, however it was added
    return app
