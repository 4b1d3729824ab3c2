"""The OpenAPI document and its Swagger UI, under ``/v1``; ``/openapi.json`` redirects there.

Once tokens are set they need one (any scope: a viewer may read the protocol) unless
``HPO_PUBLIC_DOCS`` is true: the document names every route an attacker could try. The UI
page fetches the document with the browser's login cookie (``POST /login``).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse

from hpo_service.api.deps import require


def router_for(prefix: str, *, public: bool) -> APIRouter:
    """The docs routes at ``{prefix}/openapi.json`` and ``{prefix}/docs``."""
    guard = [] if public else [Depends(require("viewer", "worker"))]
    router = APIRouter(include_in_schema=False)
    document_url = f"{prefix}/openapi.json"

    @router.get(document_url, dependencies=guard)
    async def openapi_document(request: Request) -> JSONResponse:
        document: dict[str, Any] = request.app.openapi()
        return JSONResponse(document)

    @router.get(f"{prefix}/docs", dependencies=guard)
    async def swagger_ui(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=document_url, title=f"{request.app.title} — API")

    @router.get("/openapi.json")
    async def openapi_redirect() -> RedirectResponse:
        # The conventional place tools look first; the document lives with its API version.
        return RedirectResponse(document_url, status_code=308)

    return router
