"""Study resources: create, list, inspect, page trials, stop/cancel, delete, enqueue."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Query, Request, Response, status

from hpo_service.api.deps import Admin, Reader, ServiceDep
from hpo_service.schemas import (
    EnqueueRequest,
    EnqueueResponse,
    ErrorResponse,
    StudyInfo,
    StudySpec,
    StudyState,
    TrialPage,
)

router = APIRouter(prefix="/studies", tags=["studies"])

_ERRORS: dict[int | str, dict[str, object]] = {
    404: {"model": ErrorResponse, "description": "No such study"},
    422: {"model": ErrorResponse, "description": "Invalid request: field and reason"},
}
#: Routes that change a study's state: refused once it has ended.
_STATE_ERRORS: dict[int | str, dict[str, object]] = {
    **_ERRORS,
    409: {
        "model": ErrorResponse,
        "description": "The study is no longer running (`study_not_running`): it was stopped, "
        "cancelled, completed or failed.",
    },
}


def _with_links(request: Request, info: StudyInfo) -> StudyInfo:
    base = str(request.url_for("get_study", name=info.name))
    info.links = {
        "self": base,
        "trials": f"{base}/trials",
        "stop": f"{base}/stop",
        "cancel": f"{base}/cancel",
        "dashboard": str(request.base_url) + f"dashboard/studies/{info.study_id}",
    }
    return info


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=StudyInfo,
    responses={
        422: _ERRORS[422],
        409: {
            "model": ErrorResponse,
            "description": "A study of this name exists (`study_exists`)",
        },
    },
    dependencies=[Admin],
)
def create_study(
    request: Request,
    response: Response,
    service: ServiceDep,
    spec: Annotated[StudySpec, Body()],
) -> StudyInfo:
    info = _with_links(request, service.create_study(spec))
    response.headers["Location"] = info.links["self"]
    return info


@router.get("", response_model=list[StudyInfo], dependencies=[Reader])
def list_studies(
    request: Request, service: ServiceDep, state: StudyState | None = None
) -> list[StudyInfo]:
    return [_with_links(request, info) for info in service.list_studies(state)]


@router.get("/{name}", response_model=StudyInfo, responses=_ERRORS, dependencies=[Reader])
def get_study(request: Request, service: ServiceDep, name: str) -> StudyInfo:
    return _with_links(request, service.get_study(name))


@router.get("/{name}/trials", response_model=TrialPage, responses=_ERRORS, dependencies=[Reader])
def list_trials(
    service: ServiceDep,
    name: str,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> TrialPage:
    return service.list_trials(name, offset, limit)


@router.post(
    "/{name}/stop", response_model=StudyInfo, responses=_STATE_ERRORS, dependencies=[Admin]
)
def stop_study(request: Request, service: ServiceDep, name: str) -> StudyInfo:
    """No new trials; running trials finish."""
    return _with_links(request, service.set_state(name, "stopped"))


@router.post(
    "/{name}/cancel", response_model=StudyInfo, responses=_STATE_ERRORS, dependencies=[Admin]
)
def cancel_study(request: Request, service: ServiceDep, name: str) -> StudyInfo:
    """No new trials; running trials are told to stop at their next heartbeat or report."""
    return _with_links(request, service.set_state(name, "cancelled"))


@router.delete(
    "/{name}", status_code=status.HTTP_204_NO_CONTENT, responses=_ERRORS, dependencies=[Admin]
)
def delete_study(service: ServiceDep, name: str) -> Response:
    service.delete_study(name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{name}/enqueue",
    response_model=EnqueueResponse,
    responses=_STATE_ERRORS,
    dependencies=[Admin],
)
def enqueue(service: ServiceDep, name: str, body: EnqueueRequest) -> EnqueueResponse:
    """Queue known configurations; they are leased before newly sampled ones."""
    return EnqueueResponse(enqueued=service.enqueue(name, body.params))
