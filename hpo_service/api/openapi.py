"""The OpenAPI document says, for every ``/v1`` route, who may call it and how it can fail.

Each operation gets ``x-scope`` (the least scope admitted: ``viewer``, ``worker`` or
``admin``; admin is admitted everywhere), a first line in its description naming it, and the
error answers every route shares, all with the service's error body
(``{"error": {"code", "message", "details"}}``, never FastAPI's ``HTTPValidationError``):

* 401 (no or unknown token), 403 (a token of another scope), 503 (storage unavailable, with
  ``Retry-After``) on every route;
* 422 (a field and its reason) on every route with parameters or a body;
* 400 (a body that is not JSON) and 413 (body over ``HPO_MAX_BODY_BYTES``) on every route
  with a body.

Route-specific answers (404, 409, and a route's own wording of 422) are declared beside the
route and kept. Done on the generated document rather than route by route, so a route added
later (in any router) is documented the same way.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute, RouteContext, iter_route_contexts

from hpo_service.schemas import ErrorBody, ErrorResponse

API_PREFIX = "/v1"
ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}

_SHARED: dict[str, str] = {
    "400": "The body is not JSON (`malformed_body`).",
    "401": "No bearer token, or one this server does not know (`unauthorized`).",
    "403": "The token's scope may not do this (`forbidden`).",
    "413": "The body is larger than the server's limit, HPO_MAX_BODY_BYTES (`body_too_large`).",
    "422": "A field is invalid: `details` lists each as `{field, reason}` "
    "(`invalid_request`, `invalid_spec`).",
    "503": "The database is unavailable (`storage_unavailable`); nothing was changed or the "
    "change is safe to repeat. Retry after `Retry-After` seconds.",
}


def _error(description: str, *, retry_after: bool = False) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": ERROR_REF}},
    }
    if retry_after:
        answer["headers"] = {
            "Retry-After": {
                "description": "Seconds to wait before retrying.",
                "schema": {"type": "integer", "minimum": 1},
            }
        }
    return answer


def route_scope(route: APIRoute | RouteContext) -> str | None:
    """The least scope the route's auth dependency admits, or None for an open route."""
    pending = list(route.dependant.dependencies)
    while pending:
        dependency = pending.pop()
        scopes = getattr(dependency.call, "scopes", None)
        if scopes is not None:
            allowed = [scope for scope in scopes if scope != "admin"]
            return "viewer" if "viewer" in allowed else (allowed[0] if allowed else "admin")
        pending.extend(dependency.dependencies)
    return None


def _document(app: FastAPI) -> dict[str, Any]:
    document = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
    )
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    ref_template = "#/components/schemas/{model}"
    for model in (ErrorResponse, ErrorBody):
        schema = model.model_json_schema(ref_template=ref_template)
        schema.pop("$defs", None)
        schemas.setdefault(model.__name__, schema)
    # Routers are included lazily (FastAPI ≥ 0.16x): walk the effective routes, prefixes applied.
    routes = {
        (route.path_format, method.lower()): route
        for route in iter_route_contexts(app.routes)
        if isinstance(route.original_route, APIRoute)
        for method in route.methods or ()
    }
    for path, operations in document.get("paths", {}).items():
        for method, operation in operations.items():
            route = routes.get((path, method))
            if route is None:
                continue
            scope = route_scope(route)
            if scope is None:
                continue
            operation["x-scope"] = scope
            who = "any token" if scope == "viewer" else f"a `{scope}` or `admin` token"
            if scope == "admin":
                who = "an `admin` token"
            line = f"**Scope: {scope}** ({who})."
            operation["description"] = f"{line}\n\n{operation.get('description', '')}".strip()
            answers = operation.setdefault("responses", {})
            wanted = ["401", "403", "503"]
            if operation.get("parameters") or "requestBody" in operation:
                wanted.append("422")
            if "requestBody" in operation:
                wanted += ["400", "413"]
            for status in wanted:
                declared = answers.get(status)
                answer = _error(_SHARED[status], retry_after=status == "503")
                if declared is not None:
                    # Keep the route's own wording; make sure the body is the service's.
                    answer["description"] = declared.get("description") or answer["description"]
                answers[status] = answer
            for status, declared in answers.items():
                if status.startswith(("4", "5")):
                    declared.setdefault("content", {})["application/json"] = {"schema": ERROR_REF}
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    return document


def install_openapi(app: FastAPI) -> None:
    """Make ``app.openapi()`` build (once) the document described in the module docstring."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _document(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
