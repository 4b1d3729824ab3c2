"""Readiness and metrics. ``/healthz`` (the process answers) lives in ``app.py``.

``/readyz`` is open, like ``/healthz``, so load balancers and compose can probe it; it names no
host or credentials. ``/metrics`` is read-scoped (any viewer, worker or admin token): it names
studies. Prometheus sends the token with ``authorization: {credentials_file: ...}``.
"""

from __future__ import annotations

import anyio.to_thread
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from hpo_service.api.deps import Reader, ServiceDep
from hpo_service.health import readiness
from hpo_service.metrics import ServiceMetrics

router = APIRouter(tags=["health"])


@router.get(
    "/readyz",
    responses={503: {"description": "Database unreachable or a schema not at head"}},
)
def readyz(service: ServiceDep) -> JSONResponse:
    """200 when the database answers and both schemas are at head; 503 with the reasons."""
    ready, checks = readiness(service.storage)
    body = {"status": "ready" if ready else "unavailable", "checks": checks}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", dependencies=[Reader], response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of this process's metrics."""
    registry: ServiceMetrics = request.app.state.metrics
    # Counting trials reads the database: keep it off the event loop.
    body, content_type = await anyio.to_thread.run_sync(registry.render)
    return Response(body, media_type=content_type)
