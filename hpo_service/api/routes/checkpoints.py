"""Checkpoints and resume (issue 14): a worker sends its trial's checkpoint and best model, and a
retry fetches the checkpoint it resumes from. Authenticated like every worker route (a worker
token) and by the trial's lease token (``X-Lease-Token``); workers hold no database or bucket
credentials, only this server writes the artifact store. The bodies are raw bytes with their
own size limit (``HPO_MAX_CHECKPOINT_BYTES``, see ``api/limits.py``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from hpo_service.api.deps import ServiceDep, Worker
from hpo_service.api.routes.workers import TrialId
from hpo_service.schemas import CheckpointAnswer, ErrorResponse, ResumedAnswer, ResumedRequest

router = APIRouter(tags=["workers"], dependencies=[Worker])

LeaseTokenHeader = Annotated[
    str,
    Header(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9_\-]+$",
        description="The `lease_token` of the trial's lease.",
    ),
]
Sha256Header = Annotated[
    str | None,
    Header(
        pattern=r"^[0-9a-fA-F]{64}$",
        description="SHA-256 (hex) of the body; a body that does not match is refused (422).",
    ),
]
Epoch = Annotated[int, Query(ge=1, le=1_000_000, description="The epoch the state is from.")]

_ANSWERS: dict[int | str, dict[str, object]] = {
    404: {"model": ErrorResponse, "description": "No trial with this id holds a lease."},
    409: {
        "model": ErrorResponse,
        "description": "`lease_mismatch` or `trial_reaped`: not this trial's lease, or the "
        "trial no longer runs (nothing is stored).",
    },
    413: {"model": ErrorResponse, "description": "Larger than `HPO_MAX_CHECKPOINT_BYTES`."},
    422: {
        "model": ErrorResponse,
        "description": "`epoch` missing or below 1, a malformed `X-Lease-Token`, or an "
        "`X-Checkpoint-SHA256` that does not match the body.",
    },
}
_BODY = {"requestBody": {"content": {"application/octet-stream": {"schema": {"type": "string"}}}}}


async def _store(
    request: Request,
    service: ServiceDep,
    trial_id: int,
    kind: Literal["checkpoint", "best_model"],
    epoch: int,
    token: str,
    sha256: str | None,
) -> CheckpointAnswer:
    content = await request.body()  # bounded by the body limit before it is read whole
    return await run_in_threadpool(
        service.checkpoints.store, trial_id, token, kind, epoch, content, sha256
    )


@router.put(
    "/trials/{trial_id}/checkpoint",
    response_model=CheckpointAnswer,
    responses=_ANSWERS,
    openapi_extra=_BODY,
)
async def put_checkpoint(
    request: Request,
    service: ServiceDep,
    trial_id: TrialId,
    epoch: Epoch,
    x_lease_token: LeaseTokenHeader,
    x_checkpoint_sha256: Sha256Header = None,
) -> CheckpointAnswer:
    """Store the running trial's checkpoint of `epoch` (raw bytes; it replaces the previous
    one). A retry of this trial resumes from the latest one. Send one every
    `checkpoint_every_epochs` of the lease."""
    return await _store(
        request, service, trial_id, "checkpoint", epoch, x_lease_token, x_checkpoint_sha256
    )


@router.put(
    "/trials/{trial_id}/best-model",
    response_model=CheckpointAnswer,
    responses=_ANSWERS,
    openapi_extra=_BODY,
)
async def put_best_model(
    request: Request,
    service: ServiceDep,
    trial_id: TrialId,
    epoch: Epoch,
    x_lease_token: LeaseTokenHeader,
    x_checkpoint_sha256: Sha256Header = None,
) -> CheckpointAnswer:
    """Store the selected model's weights (from `epoch`, the best one) before `complete`, when
    the lease says `keep_best_model`: the study's best trials keep them."""
    return await _store(
        request, service, trial_id, "best_model", epoch, x_lease_token, x_checkpoint_sha256
    )


@router.get(
    "/trials/{trial_id}/resume-checkpoint",
    response_class=Response,
    responses={
        200: {
            "content": {"application/octet-stream": {}},
            "description": "The checkpoint's bytes; `X-Checkpoint-SHA256`, `X-Checkpoint-Epoch` "
            "and `X-Checkpoint-Trial` (its trial number) describe them.",
        },
        404: {
            "model": ErrorResponse,
            "description": "`checkpoint_not_found`: no earlier attempt stored one, or its file "
            "is gone (start fresh and say so with `resumed`); `trial_not_found`.",
        },
        409: _ANSWERS[409],
    },
)
def resume_checkpoint(
    service: ServiceDep, trial_id: TrialId, x_lease_token: LeaseTokenHeader
) -> Response:
    """The checkpoint this retry resumes from (the lease's `resume_from`)."""
    content, source = service.checkpoints.fetch(trial_id, x_lease_token)
    return Response(
        content,
        media_type="application/octet-stream",
        headers={
            "X-Checkpoint-SHA256": source.sha256,
            "X-Checkpoint-Epoch": str(source.epoch),
            "X-Checkpoint-Trial": str(source.trial_number),
        },
    )


@router.post(
    "/trials/{trial_id}/resumed",
    response_model=ResumedAnswer,
    responses={404: _ANSWERS[404], 409: _ANSWERS[409], 422: _ANSWERS[422]},
)
def resumed(service: ServiceDep, trial_id: TrialId, body: ResumedRequest) -> ResumedAnswer:
    """Say how the retry started, before its first report: resumed at `epoch` (the earlier
    attempt's intermediate values up to it are carried over, and `resumed_from` records it),
    or fresh (`epoch` null) with the `reason` (recorded as `resume_fallback`)."""
    return service.checkpoints.resumed(
        trial_id, body.lease_token, body.from_trial_number, body.epoch, body.reason
    )
