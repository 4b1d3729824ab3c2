"""The one module that maps errors to HTTP status codes.

Every error body is ``{"error": {"code": ..., "message": ..., "details": [...]}}`` with a stable
``code``; validation errors list ``{"field": "body.budget.n_trials", "reason": ...}``.

Storage failures of every kind (Optuna's ``StorageInternalError``, SQLAlchemy's
``OperationalError``/``PendingRollbackError``/…, a disk full or read-only database, our own
``StorageUnavailable``) answer 503 ``storage_unavailable`` with ``Retry-After``; the body says only
that the storage is unavailable, the details (which may name the host, port or database) go to
the server log. Anything else unexpected answers a JSON 500 ``internal_error`` from
``InternalErrorGuard``, which never lets the exception reach the server, so the client's
keep-alive connection survives it.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hpo_service.errors import (
    AuthError,
    Conflict,
    HPOError,
    InvalidSpec,
    NotFound,
    ReadOnly,
    StorageUnavailable,
    TrialFinished,
)
from hpo_service.storage import STORAGE_ERRORS

log = logging.getLogger(__name__)

_STATUS: list[tuple[type[HPOError], int]] = [
    (InvalidSpec, 422),
    (NotFound, 404),
    (Conflict, 409),
    (StorageUnavailable, 503),
]
STORAGE_MESSAGE = "the storage is unavailable; retry after the Retry-After delay"
# Model-level validators name the field inside the message: "`search_space.foo`: reason".
_NAMED_FIELD = re.compile(r"^(?:Value error, )?`([^`]+)`:? (.*)$", re.DOTALL)


def error_response(
    status: int,
    code: str,
    message: str,
    details: list[dict[str, Any]] | None = None,
    *,
    state: str | None = None,
) -> JSONResponse:
    error: dict[str, Any] = {"code": code, "message": message, "details": details or []}
    if state is not None:  # trial_finished / trial_reaped: how the trial ended
        error["state"] = state
    body = {"error": error}
    return JSONResponse(status_code=status, content=jsonable_encoder(body))


def storage_unavailable_response(retry_after_s: int) -> JSONResponse:
    response = error_response(503, StorageUnavailable.code, STORAGE_MESSAGE)
    response.headers["Retry-After"] = str(retry_after_s)
    return response


def log_storage_error(method: str, path: str, error: BaseException) -> None:
    # The cause chain holds the driver's message (host, port, database name): log only.
    cause = error.__cause__ or error
    log.warning("storage unavailable on %s %s: %s: %s", method, path, type(cause).__name__, cause)


def drop_pooled_connections(app: Any) -> None:
    """After a storage failure, let the next request open fresh connections.

    A pooled connection may be the broken part: a SQLite connection opened while the file was
    read-only stays read-only after the disk is writable again, and one whose server restarted
    is dead. Connections in use are discarded when they come back. Cheap next to the outage.
    """
    service = getattr(app.state, "service", None)
    if service is not None:
        service.storage.engine.dispose()


class BodyTooLarge(HTTPException):
    """A request body over ``max_body_bytes``; an ``HTTPException`` so that FastAPI's body
    reader passes it through instead of turning it into a 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than the limit of {limit} bytes")
        self.limit = limit


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


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path: Starlette's 405 names only the first
    route's (``Allow: POST`` for ``/v1/studies``, which also answers GET)."""
    methods: set[str] = set()
    for route in iter_route_contexts(request.app.routes):
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            methods |= set(route.methods or ())
    return sorted(methods)


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
        if isinstance(error, TrialFinished):
            return error_response(409, error.code, error.message, state=error.state)
        for kind, status in _STATUS:
            if isinstance(error, kind):
                return error_response(status, error.code, error.message)
        log.error("unmapped domain error: %r", error)
        return error_response(500, error.code, error.message)

    async def _storage(request: Request, error: Exception) -> JSONResponse:
        log_storage_error(request.method, request.url.path, error)
        drop_pooled_connections(request.app)
        return storage_unavailable_response(request.app.state.settings.storage_retry_after_s)

    for kind in STORAGE_ERRORS:
        # Registered per class: Starlette looks handlers up along the exception's MRO, so this
        # wins over the HPOError handler for StorageUnavailable.
        app.add_exception_handler(kind, _storage)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        # The router's own 404/405 answers, in the service's error body (headers kept: Allow).
        codes = {400: "malformed_body", 404: "not_found", 405: "method_not_allowed"}
        response = error_response(
            error.status_code, codes.get(error.status_code, "http_error"), str(error.detail)
        )
        response.headers.update(error.headers or {})
        if error.status_code == 405:
            response.headers["Allow"] = ", ".join(_allowed_methods(request))
        return response

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, error: BodyTooLarge) -> JSONResponse:
        return error_response(413, "body_too_large", str(error.detail))


class InternalErrorGuard:
    """ASGI middleware: an exception nothing else handled becomes a JSON 500 (or 503 for a
    storage failure) *here*, and is not re-raised.

    Starlette's outermost ``ServerErrorMiddleware`` would answer too, but then re-raise, and
    uvicorn closes the connection of a request whose app raised: the client's next request on
    that keep-alive connection would fail. Installed as the innermost user middleware, so the
    request timer still sees the status.
    """

    def __init__(self, app: ASGIApp, retry_after_s: int) -> None:
        self.app = app
        self.retry_after_s = retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def note_start(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, note_start)
        except Exception as error:
            if started:  # too late to answer: let the server close the connection
                raise
            method, path = scope.get("method", ""), scope.get("path", "")
            if isinstance(error, STORAGE_ERRORS):
                log_storage_error(method, path, error)
                drop_pooled_connections(scope["app"])
                response = storage_unavailable_response(self.retry_after_s)
            else:
                log.exception("unhandled error on %s %s", method, path)
                response = error_response(500, "internal_error", "internal server error")
            await response(scope, receive, send)
