"""The one module that maps domain errors to HTTP status codes.

Every error body is ``{"error": {"code": ..., "message": ..., "details": [...]}}`` with a stable
``code``; validation errors list ``{"field": "body.budget.n_trials", "reason": ...}``.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from hpo_service.errors import (
    AuthError,
    Conflict,
    HPOError,
    InvalidSpec,
    NotFound,
    ReadOnly,
    StorageUnavailable,
)

log = logging.getLogger(__name__)

_STATUS: list[tuple[type[HPOError], int]] = [
    (InvalidSpec, 422),
    (NotFound, 404),
    (Conflict, 409),
    (StorageUnavailable, 503),
]
# Model-level validators name the field inside the message: "`search_space.foo`: reason".
_NAMED_FIELD = re.compile(r"^(?:Value error, )?`([^`]+)`:? (.*)$", re.DOTALL)


def error_response(
    status: int, code: str, message: str, details: list[dict[str, Any]] | None = None
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "details": details or []}}
    return JSONResponse(status_code=status, content=jsonable_encoder(body))


def _field_errors(error: RequestValidationError) -> list[dict[str, Any]]:
    details = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"])
        reason = str(item["msg"])
        named = _NAMED_FIELD.match(reason)
        if named:
            field, reason = f"{field}.{named.group(1)}", named.group(2)
        details.append({"field": field, "reason": reason.removeprefix("Value error, ")})
    return details


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, error: RequestValidationError) -> JSONResponse:
        details = _field_errors(error)
        summary = "; ".join(f"{d['field']}: {d['reason']}" for d in details[:3])
        return error_response(422, "invalid_request", summary, details)

    @app.exception_handler(HPOError)
    async def _domain(request: Request, error: HPOError) -> JSONResponse:
        if isinstance(error, AuthError):
            status = 403 if error.forbidden else 401
            response = error_response(status, error.code, error.message)
            if status == 401:
                response.headers["WWW-Authenticate"] = "Bearer"
            return response
        if isinstance(error, ReadOnly):
            response = error_response(405, error.code, error.message)
            response.headers["Allow"] = "GET, HEAD"
            return response
        if isinstance(error, InvalidSpec):
            details = [{"field": f"body.{error.field}", "reason": error.reason}]
            return error_response(422, error.code, error.message, details)
        for kind, status in _STATUS:
            if isinstance(error, kind):
                return error_response(status, error.code, error.message)
        log.error("unmapped domain error: %r", error)
        return error_response(500, error.code, error.message)
