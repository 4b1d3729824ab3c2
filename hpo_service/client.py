"""A typed client of the REST API over an injected ``httpx.Client``.

Used by the ``hpo`` CLI and by the trainer worker. Tests hand it FastAPI's ``TestClient`` so the
real server code runs without sockets.

Exceptions::

    ClientError                 any failed call
    ├── ServerUnavailable       connection refused / timed out / 502-504: worth retrying
    └── APIError                the server answered with an error body (``status``, ``code``)
        ├── LeaseLost           409/404 on a trial: the lease is gone (reaped, finished,
        │                       mismatch, deleted); ``state`` says how a finished trial ended
        └── RequestRejected     422: the request is invalid (``details`` name the fields)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import BaseModel

from hpo_service.schemas import (
    WORK_HEADER,
    BatchCompleteAnswer,
    BatchFailAnswer,
    BatchHeartbeatAnswer,
    BatchLeases,
    BatchReportAnswer,
    CheckpointAnswer,
    CompleteAnswer,
    CompleteItem,
    EnqueueResponse,
    FailAnswer,
    FailItem,
    FinalEvaluationAnswer,
    FiringInfo,
    HeartbeatAnswer,
    HeartbeatItem,
    Lease,
    LRRangeTestAnswer,
    ReportAnswer,
    ReportItem,
    ReproRecord,
    ResumedAnswer,
    ScheduleInfo,
    ScheduleReport,
    ScheduleSpec,
    StudyInfo,
    StudySpec,
    TrialComplete,
    TrialConfig,
    TrialFail,
    TrialHistory,
    TrialPage,
    TrialReport,
)

API_PREFIX = "/v1"


class ClientError(Exception):
    pass


class ServerUnavailable(ClientError):
    pass


class APIError(ClientError):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: list[dict[str, Any]] | None = None,
        state: str | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details or []
        self.state = state  # trial_finished / trial_reaped: how the trial ended


class LeaseLost(APIError):
    pass


class RequestRejected(APIError):
    pass


@dataclass(frozen=True)
class NoWork:
    """``POST /v1/leases`` gave no trial. ``idle``: no study can give work now (the server's
    ``HPO-Work: idle``), so a worker may exit; otherwise wait and ask again."""

    idle: bool


def make_http_client(
    base_url: str, token: str | None = None, timeout_s: float = 90.0
) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s)


class HPOClient:
    def __init__(self, http: httpx.Client) -> None:
        self.http = http

    # --- plumbing -------------------------------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        trial: bool = False,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        try:
            response = self.http.request(
                method,
                API_PREFIX + path,
                json=json,
                params=params,
                content=content,
                headers=headers,
            )
        except (httpx.TransportError, OSError) as error:
            raise ServerUnavailable(f"{method} {path}: {error}") from error
        if response.status_code in (502, 503, 504):
            raise ServerUnavailable(f"{method} {path}: HTTP {response.status_code}")
        if response.status_code >= 400:
            try:
                body = response.json()["error"]
                code, message, details = body["code"], body["message"], body.get("details", [])
                state = body.get("state")
            except (ValueError, KeyError, TypeError, AttributeError):
                code, message, details, state = "http_error", response.text[:500], [], None
            kind: type[APIError] = APIError
            if response.status_code == 422:
                kind = RequestRejected
            elif trial and response.status_code in (404, 409):
                kind = LeaseLost
            raise kind(response.status_code, code, message, details, state)
        return response

    @staticmethod
    def _body(model: BaseModel) -> Any:
        return model.model_dump(mode="json")

    # --- studies --------------------------------------------------------------------------------

    def create_study(self, spec: StudySpec | dict[str, Any]) -> StudyInfo:
        body = self._body(spec) if isinstance(spec, StudySpec) else spec
        return StudyInfo.model_validate(self._call("POST", "/studies", json=body).json())

    def list_studies(self, state: str | None = None) -> list[StudyInfo]:
        params = {"state": state} if state else None
        data = self._call("GET", "/studies", params=params).json()
        return [StudyInfo.model_validate(item) for item in data]

    def get_study(self, name: str) -> StudyInfo:
        return StudyInfo.model_validate(self._call("GET", f"/studies/{name}").json())

    def list_trials(self, name: str, offset: int = 0, limit: int = 100) -> TrialPage:
        data = self._call(
            "GET", f"/studies/{name}/trials", params={"offset": offset, "limit": limit}
        ).json()
        return TrialPage.model_validate(data)

    def stop_study(self, name: str) -> StudyInfo:
        return StudyInfo.model_validate(self._call("POST", f"/studies/{name}/stop").json())

    def cancel_study(self, name: str) -> StudyInfo:
        return StudyInfo.model_validate(self._call("POST", f"/studies/{name}/cancel").json())

    def delete_study(self, name: str) -> None:
        self._call("DELETE", f"/studies/{name}")

    def enqueue(self, name: str, params: list[dict[str, Any]]) -> int:
        data = self._call("POST", f"/studies/{name}/enqueue", json={"params": params}).json()
        return EnqueueResponse.model_validate(data).enqueued

    # --- the worker protocol ----------------------------------------------------------------

    def lease(
        self,
        worker_id: str,
        wait_s: float = 0.0,
        device: str | None = None,
        kinds: Sequence[str] | None = None,
    ) -> Lease | None:
        """A lease, or None if no work within ``wait_s``. ``kinds``: the lease kinds this
        worker runs (``LeaseKind``; None: the server's default, trials only)."""
        granted = self.next_lease(worker_id, wait_s, device, kinds)
        return granted if isinstance(granted, Lease) else None

    def next_lease(
        self,
        worker_id: str,
        wait_s: float = 0.0,
        device: str | None = None,
        kinds: Sequence[str] | None = None,
    ) -> Lease | NoWork:
        """A lease, or ``NoWork`` saying whether work may still come."""
        body: dict[str, Any] = {"worker_id": worker_id, "wait_s": wait_s, "device": device}
        if kinds is not None:
            body["kinds"] = list(kinds)
        response = self._call("POST", "/leases", json=body)
        if response.status_code == 204:
            return NoWork(idle=response.headers.get(WORK_HEADER) == "idle")
        return Lease.model_validate(response.json())

    def lr_range_test(
        self, trial_id: int, token: str, result: Mapping[str, Any]
    ) -> LRRangeTestAnswer:
        """Finish an ``lr_range_test`` lease with its curve (``LRRangeTestResult`` fields)."""
        body = {"lease_token": token, **result}
        response = self._call("POST", f"/trials/{trial_id}/lr-range-test", json=body, trial=True)
        return LRRangeTestAnswer.model_validate(response.json())

    def final_evaluation(
        self, trial_id: int, token: str, results: Sequence[Mapping[str, Any]]
    ) -> FinalEvaluationAnswer:
        """Finish a ``final_evaluation`` lease with its winners' results (``WinnerEvaluation``)."""
        body = {"lease_token": token, "results": list(results)}
        response = self._call("POST", f"/trials/{trial_id}/final-evaluation", json=body, trial=True)
        return FinalEvaluationAnswer.model_validate(response.json())

    def best_model(self, trial_id: int, task_id: int, token: str) -> tuple[bytes, str]:
        """A finished trial's kept best model and its SHA-256 (``trainers.checkpoints.
        load_best_model`` reads them), for the ``final_evaluation`` lease ``task_id`` with
        ``token`` that names it. Raises ``APIError`` (``checkpoint_not_found``,
        ``lease_required``, ``trial_reaped``…)."""
        headers = {"X-Lease-Trial": str(task_id), "X-Lease-Token": token}
        response = self._call("GET", f"/trials/{trial_id}/best-model", headers=headers)
        return response.content, response.headers.get("X-Checkpoint-SHA256", "")

    def heartbeat(self, trial_id: int, token: str) -> HeartbeatAnswer:
        response = self._call(
            "POST", f"/trials/{trial_id}/heartbeat", json={"lease_token": token}, trial=True
        )
        return HeartbeatAnswer.model_validate(response.json())

    def report(
        self, trial_id: int, token: str, epoch: int, value: float | None, metrics: dict[str, Any]
    ) -> ReportAnswer:
        body = {
            "lease_token": token,
            "epoch": epoch,
            "value": value,
            "metrics": finite_metrics(metrics),
        }
        response = self._call("POST", f"/trials/{trial_id}/report", json=body, trial=True)
        return ReportAnswer.model_validate(response.json())

    def complete(
        self,
        trial_id: int,
        token: str,
        values: list[float],
        metrics: dict[str, Any],
        output_tail: str | None = None,
    ) -> CompleteAnswer:
        body = {"lease_token": token, "values": values, "metrics": finite_metrics(metrics)}
        if output_tail:
            body["output_tail"] = output_tail
        response = self._call("POST", f"/trials/{trial_id}/complete", json=body, trial=True)
        return CompleteAnswer.model_validate(response.json())

    def fail(
        self,
        trial_id: int,
        token: str,
        reason: str,
        *,
        retryable: bool = False,
        pruned: bool = False,
        diverged: bool = False,
        output_tail: str | None = None,
    ) -> FailAnswer:
        body: dict[str, Any] = {
            "lease_token": token,
            "reason": reason,
            "retryable": retryable,
            "pruned": pruned,
        }
        if diverged:  # issue 10: the server completes a diverged trial as infeasible
            body["diverged"] = True
        if output_tail:
            body["output_tail"] = output_tail
        response = self._call("POST", f"/trials/{trial_id}/fail", json=body, trial=True)
        return FailAnswer.model_validate(response.json())

    # --- a trial's own records (issue 14) ---------------------------------------------------

    def record(self, trial_id: int, token: str, record: ReproRecord | dict[str, Any]) -> None:
        """Store how the trial is being trained (``ReproRecord``) on it; send once at start."""
        body = record.model_dump(mode="json") if isinstance(record, ReproRecord) else record
        self._call(
            "POST",
            f"/trials/{trial_id}/record",
            json={"lease_token": token, "record": body},
            trial=True,
        )

    def trial_config(self, study: str, number: int) -> TrialConfig:
        """Trial ``number``'s resolved config, seed and reproducibility record."""
        data = self._call("GET", f"/studies/{study}/trials/{number}/config").json()
        return TrialConfig.model_validate(data)

    def trial_history(self, study: str, number: int) -> TrialHistory:
        """Every epoch trial ``number`` reported, oldest first."""
        data = self._call("GET", f"/studies/{study}/trials/{number}/history").json()
        return TrialHistory.model_validate(data)

    # --- the batched worker protocol: many trials per request, an answer or error per trial --

    # --- issue 14: checkpoints and resume (raw bytes; the lease token in a header) -----------

    def upload_checkpoint(
        self,
        trial_id: int,
        token: str,
        epoch: int,
        content: bytes,
        sha256: str,
        *,
        best_model: bool = False,
    ) -> CheckpointAnswer:
        """Store the running trial's checkpoint (or, with ``best_model``, its selected model's
        weights) of ``epoch``. Raises ``LeaseLost``, ``APIError`` (413: over the limit)."""
        kind = "best-model" if best_model else "checkpoint"
        response = self._call(
            "PUT",
            f"/trials/{trial_id}/{kind}",
            params={"epoch": epoch},
            content=content,
            headers={
                "X-Lease-Token": token,
                "X-Checkpoint-SHA256": sha256,
                "Content-Type": "application/octet-stream",
            },
            trial=True,
        )
        return CheckpointAnswer.model_validate(response.json())

    def resume_checkpoint(self, trial_id: int, token: str) -> tuple[bytes, str] | None:
        """The bytes and SHA-256 of the checkpoint a leased retry resumes from; None when the
        server has none (``checkpoint_not_found``). Raises ``LeaseLost``."""
        try:
            response = self._call(
                "GET",
                f"/trials/{trial_id}/resume-checkpoint",
                headers={"X-Lease-Token": token},
                trial=True,
            )
        except LeaseLost as error:
            if error.code == "checkpoint_not_found":
                return None
            raise
        return response.content, response.headers.get("X-Checkpoint-SHA256", "")

    def resumed(
        self,
        trial_id: int,
        token: str,
        from_trial_number: int,
        epoch: int | None,
        reason: str | None = None,
    ) -> ResumedAnswer:
        """Say how a retry started: resumed at ``epoch``, or fresh (None) for ``reason``."""
        body = {
            "lease_token": token,
            "from_trial_number": from_trial_number,
            "epoch": epoch,
            "reason": reason,
        }
        response = self._call("POST", f"/trials/{trial_id}/resumed", json=body, trial=True)
        return ResumedAnswer.model_validate(response.json())

    def lease_many(
        self,
        worker_id: str,
        count: int,
        wait_s: float = 0.0,
        device: str | None = None,
        slots: list[str] | None = None,
        kinds: Sequence[str] | None = None,
    ) -> list[Lease]:
        """Up to ``count`` leases (the worker's own running trials first); [] if no work.
        ``slots``: ``count`` distinct lease identities, one per lease (``Lease.worker_id``).
        ``kinds``: the lease kinds this worker runs (``LeaseKind``; None: the server's
        default, trials only); a task comes alone, held by the first slot."""
        granted = self.next_leases(worker_id, count, wait_s, device, slots, kinds)
        return granted if isinstance(granted, list) else []

    def next_leases(
        self,
        worker_id: str,
        count: int,
        wait_s: float = 0.0,
        device: str | None = None,
        slots: list[str] | None = None,
        kinds: Sequence[str] | None = None,
    ) -> list[Lease] | NoWork:
        """``lease_many``, or ``NoWork`` saying whether work may still come."""
        body: dict[str, Any] = {
            "worker_id": worker_id, "count": count, "wait_s": wait_s, "device": device,
        }  # fmt: skip
        if slots is not None:
            body["slots"] = slots
        if kinds is not None:
            body["kinds"] = list(kinds)
        response = self._call("POST", "/batch/leases", json=body)
        answer = BatchLeases.model_validate(response.json())
        return answer.leases or NoWork(idle=answer.idle)

    def heartbeat_many(self, leases: list[tuple[int, str]]) -> list[HeartbeatItem]:
        """One beat for many leases, given as (trial id, lease token); an item per lease."""
        body = {"leases": [{"trial_id": t, "lease_token": token} for t, token in leases]}
        response = self._call("POST", "/batch/heartbeat", json=body)
        return BatchHeartbeatAnswer.model_validate(response.json()).items

    def report_many(self, reports: list[TrialReport]) -> list[ReportItem]:
        """Many trials' epochs in one request; an item per report (answer or error)."""
        body = {"reports": [self._body(report) for report in reports]}
        response = self._call("POST", "/batch/report", json=body)
        return BatchReportAnswer.model_validate(response.json()).items

    def complete_many(self, results: list[TrialComplete]) -> list[CompleteItem]:
        body = {"results": [self._body(result) for result in results]}
        response = self._call("POST", "/batch/complete", json=body)
        return BatchCompleteAnswer.model_validate(response.json()).items

    def fail_many(self, failures: list[TrialFail]) -> list[FailItem]:
        body = {"failures": [self._body(failure) for failure in failures]}
        response = self._call("POST", "/batch/fail", json=body)
        return BatchFailAnswer.model_validate(response.json()).items

    # --- schedules (recurring sweeps) ---------------------------------------------------------

    def create_schedule(self, spec: ScheduleSpec | dict[str, Any]) -> ScheduleInfo:
        body = self._body(spec) if isinstance(spec, ScheduleSpec) else spec
        return ScheduleInfo.model_validate(self._call("POST", "/schedules", json=body).json())

    def list_schedules(self) -> list[ScheduleInfo]:
        return [ScheduleInfo.model_validate(x) for x in self._call("GET", "/schedules").json()]

    def get_schedule(self, ref: str) -> ScheduleInfo:
        return ScheduleInfo.model_validate(self._call("GET", f"/schedules/{ref}").json())

    def update_schedule(self, ref: str, changes: dict[str, Any]) -> ScheduleInfo:
        data = self._call("PATCH", f"/schedules/{ref}", json=changes).json()
        return ScheduleInfo.model_validate(data)

    def pause_schedule(self, ref: str) -> ScheduleInfo:
        return ScheduleInfo.model_validate(self._call("POST", f"/schedules/{ref}/pause").json())

    def resume_schedule(self, ref: str) -> ScheduleInfo:
        return ScheduleInfo.model_validate(self._call("POST", f"/schedules/{ref}/resume").json())

    def delete_schedule(self, ref: str) -> None:
        self._call("DELETE", f"/schedules/{ref}")

    def run_schedule(self, ref: str) -> FiringInfo:
        return FiringInfo.model_validate(self._call("POST", f"/schedules/{ref}/run").json())

    def list_firings(self, ref: str, limit: int = 50) -> list[FiringInfo]:
        data = self._call("GET", f"/schedules/{ref}/firings", params={"limit": limit}).json()
        return [FiringInfo.model_validate(item) for item in data]

    def schedule_report(self, ref: str, nights: int = 30) -> ScheduleReport:
        data = self._call("GET", f"/schedules/{ref}/report", params={"nights": nights}).json()
        return ScheduleReport.model_validate(data)

    def schedule_report_png(self, ref: str, nights: int = 30) -> bytes:
        """The report's plot: best value per run with regressions marked (PNG bytes)."""
        return self._call("GET", f"/schedules/{ref}/report.png", params={"nights": nights}).content


# --- reliability branch: the server refuses NaN/Infinity in metrics (422 naming the key) -------
def finite_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics with each non-finite number sent as null, the wire's "could not be computed"."""

    def clean(value: Any) -> Any:
        if isinstance(value, list):
            return [clean(item) for item in value]
        return None if isinstance(value, float) and not math.isfinite(value) else value

    return {key: clean(value) for key, value in metrics.items()}


# --- end of the reliability branch's lines ------------------------------------------------------
