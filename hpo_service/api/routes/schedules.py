"""Schedule resources: recurring sweeps, their firings, run-now, and the morning report.

``{ref}`` is a schedule's name or its numeric id (names start with a letter).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends, Query, Request, Response, status

from hpo_service.api.deps import Admin, Reader, ServiceDep
from hpo_service.reports import build_report, render_png
from hpo_service.scheduler import Scheduler
from hpo_service.schedules import ScheduleService
from hpo_service.schemas import (
    ErrorResponse,
    FiringInfo,
    ScheduleInfo,
    ScheduleReport,
    ScheduleSpec,
    ScheduleUpdate,
)

router = APIRouter(prefix="/schedules", tags=["schedules"])

_ERRORS: dict[int | str, dict[str, object]] = {
    404: {"model": ErrorResponse, "description": "No such schedule"},
    422: {"model": ErrorResponse, "description": "Invalid request: field and reason"},
}


async def get_schedules(request: Request) -> ScheduleService:  # async: see api/deps.py
    schedules: ScheduleService = request.app.state.schedules
    return schedules


async def get_scheduler(request: Request) -> Scheduler:
    scheduler: Scheduler = request.app.state.scheduler
    return scheduler


SchedulesDep = Annotated[ScheduleService, Depends(get_schedules)]
SchedulerDep = Annotated[Scheduler, Depends(get_scheduler)]


def _with_links(request: Request, info: ScheduleInfo) -> ScheduleInfo:
    base = str(request.url_for("get_schedule", ref=info.name))
    info.links = {
        "self": base,
        "firings": f"{base}/firings",
        "run": f"{base}/run",
        "report": f"{base}/report",
        "report_png": f"{base}/report.png",
    }
    return info


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ScheduleInfo,
    responses={**_ERRORS, 409: {"model": ErrorResponse, "description": "Name taken"}},
    dependencies=[Admin],
)
def create_schedule(
    request: Request,
    response: Response,
    schedules: SchedulesDep,
    spec: Annotated[ScheduleSpec, Body()],
) -> ScheduleInfo:
    """Validated in full (cron, zone, template as a study) before anything is written."""
    info = _with_links(request, schedules.create(spec))
    response.headers["Location"] = info.links["self"]
    return info


@router.get("", response_model=list[ScheduleInfo], dependencies=[Reader])
def list_schedules(request: Request, schedules: SchedulesDep) -> list[ScheduleInfo]:
    return [_with_links(request, info) for info in schedules.list_schedules()]


@router.get("/{ref}", response_model=ScheduleInfo, responses=_ERRORS, dependencies=[Reader])
def get_schedule(request: Request, schedules: SchedulesDep, ref: str) -> ScheduleInfo:
    return _with_links(request, schedules.get(ref))


@router.patch("/{ref}", response_model=ScheduleInfo, responses=_ERRORS, dependencies=[Admin])
def update_schedule(
    request: Request, schedules: SchedulesDep, ref: str, patch: ScheduleUpdate
) -> ScheduleInfo:
    """Change any field but the name; a new cron or zone takes effect from now on."""
    return _with_links(request, schedules.update(ref, patch))


@router.post("/{ref}/pause", response_model=ScheduleInfo, responses=_ERRORS, dependencies=[Admin])
def pause_schedule(request: Request, schedules: SchedulesDep, ref: str) -> ScheduleInfo:
    return _with_links(request, schedules.set_enabled(ref, False))


@router.post("/{ref}/resume", response_model=ScheduleInfo, responses=_ERRORS, dependencies=[Admin])
def resume_schedule(request: Request, schedules: SchedulesDep, ref: str) -> ScheduleInfo:
    """Fire times missed while paused are not caught up."""
    return _with_links(request, schedules.set_enabled(ref, True))


@router.delete(
    "/{ref}", status_code=status.HTTP_204_NO_CONTENT, responses=_ERRORS, dependencies=[Admin]
)
def delete_schedule(schedules: SchedulesDep, ref: str) -> Response:
    """The schedule and its firing records go; the studies it created stay."""
    schedules.delete(ref)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{ref}/run",
    status_code=status.HTTP_201_CREATED,
    response_model=FiringInfo,
    responses={**_ERRORS, 409: {"model": ErrorResponse, "description": "Study name taken"}},
    dependencies=[Admin],
)
def run_schedule(
    request: Request, response: Response, scheduler: SchedulerDep, ref: str
) -> FiringInfo:
    """Create a run's study now (warm-started like a scheduled one), paused or not."""
    info = scheduler.run_now(ref)
    if info.study is not None:
        response.headers["Location"] = str(request.url_for("get_study", name=info.study))
    return info


@router.get(
    "/{ref}/firings", response_model=list[FiringInfo], responses=_ERRORS, dependencies=[Reader]
)
def list_firings(
    schedules: SchedulesDep, ref: str, limit: Annotated[int, Query(ge=1, le=1000)] = 50
) -> list[FiringInfo]:
    """Newest first: created, skipped (missed fire times) and failed runs."""
    return schedules.firings(ref, limit)


@router.get(
    "/{ref}/report", response_model=ScheduleReport, responses=_ERRORS, dependencies=[Reader]
)
def report(
    service: ServiceDep, ref: str, nights: Annotated[int, Query(ge=1, le=365)] = 30
) -> ScheduleReport:
    """Per run: best value, trial counts, best parameters and their drift, importances, and a
    regression flag against the best earlier run in the window."""
    return build_report(service, ref, nights)


@router.get(
    "/{ref}/report.png",
    response_class=Response,
    responses={**_ERRORS, 200: {"content": {"image/png": {}}, "description": "PNG plot"}},
    dependencies=[Reader],
)
def report_png(
    service: ServiceDep, ref: str, nights: Annotated[int, Query(ge=1, le=365)] = 30
) -> Response:
    """Best value per run, the running best, regressions marked."""
    return Response(render_png(build_report(service, ref, nights)), media_type="image/png")
