"""Readiness and metrics. ``/healthz`` (the process answers) lives in ``app.py``.

``/readyz`` is open, like ``/healthz``, so load balancers and compose can probe it; it names no
host or credentials. ``/metrics`` is read-scoped (any viewer, worker or admin token): it names
studies. Prometheus sends the token with ``authorization: {credentials_file: ...}``.
"""

from __future__ import annotations

import logging

import anyio.to_thread
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError

from hpo_service.api.deps import Reader, ServiceDep
from hpo_service.api.errors import drop_pooled_connections
from hpo_service.health import readiness
from hpo_service.metrics import ServiceMetrics
from hpo_service.storage import write_refusal

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get(
    "/readyz",
    responses={
        503: {"description": "Database unreachable, refusing writes, or a schema not at head"}
    },
)
def readyz(request: Request, service: ServiceDep) -> JSONResponse:
    """200 when the database answers, would take a write, and both schemas are at head; 503
    with the reasons. Each probe looks afresh (nothing cached) and writes no row."""
    ready, checks = readiness(service.storage)
    if ready:
        try:
            refusal = write_refusal(service.storage)
        except SQLAlchemyError as error:
            log.warning("readiness: write check failed: %s", error)
            refusal = f"unreachable ({type(error).__name__})"
        checks["writes"] = refusal or "ok"
        ready = refusal is None
    was_refused = getattr(request.app.state, "writes_refused", False)
    request.app.state.writes_refused = not ready
    if ready and was_refused:
        # Connections opened while the database refused writes may keep refusing them (SQLite
        # opens a read-only file read-only for good): start afresh now that it takes them.
        drop_pooled_connections(request.app)
    body = {"status": "ready" if ready else "unavailable", "checks": checks}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", dependencies=[Reader], response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of this process's metrics."""
    registry: ServiceMetrics = request.app.state.metrics
    # Counting trials reads the database: keep it off the event loop.
    body, content_type = await anyio.to_thread.run_sync(registry.render)
    return Response(body, media_type=content_type)
