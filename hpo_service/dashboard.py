"""The stock optuna-dashboard, served by this server, read-only and behind the service's auth.

Why in process and at ``/``: the dashboard reads the server's own storage object (through
``ReadOnlyView``), so there is no second process holding a SQLite file that only the server may
write (a separate dashboard process has crashed running studies with lock errors); and its page
loads ``/static/bundle.js`` and calls ``/api/*`` by absolute path, so it only works at the root.
The service's own routes live under ``/v1`` (plus ``/healthz``, ``/login`` …) and never collide.

The dashboard is installed as the router's *default* app, not as a route: it receives only the
requests no service route matched, so routes added to ``create_app`` before or after this call
keep working. In front of it, ``DashboardGate``:

1. answers 404 for any path the dashboard does not own (``/v1/nope`` is not the dashboard's);
2. requires a token (any scope; a bearer header, or the cookie ``POST /login`` sets): a page
   without one redirects to ``/login``, anything else gets 401 (a write too: authenticate first);
3. answers 405 to every method but GET and HEAD: the dashboard's own write routes (create,
   rename or delete studies, tell trials, notes, artifact uploads, ``POST
   /incompatible-rdb-schema`` which upgrades the schema) are unreachable, for every scope.
"""

from __future__ import annotations

from typing import cast
from urllib.parse import quote

import optuna_dashboard
from a2wsgi import WSGIMiddleware
from fastapi import FastAPI
from optuna.artifacts._protocol import ArtifactStore
from optuna.storages import BaseStorage
from starlette.requests import Request
from starlette.responses import RedirectResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocketClose

from hpo_service.api.deps import SAFE_METHODS, presented_token, scope_of
from hpo_service.api.routes import login
from hpo_service.dashboard_view import ReadOnlyView, StorageOutage
from hpo_service.errors import AuthError, NotFound, ReadOnly, StorageUnavailable

#: The dashboard's HTML pages; a browser without a token is sent to log in.
PAGE_PATHS = ("/", "/dashboard")
#: Every other path prefix the dashboard serves (its JSON API, bundle, CSV export, artifacts).
ASSET_PREFIXES = ("/api/", "/static/", "/csv/", "/artifacts/")
# GET /incompatible-rdb-schema only ever redirects to /dashboard here: the view is no RDBStorage,
# so the dashboard never offers its schema upgrade (the service owns Optuna's schema).
ASSET_PATHS = ("/favicon.ico", "/incompatible-rdb-schema")


def is_page(path: str) -> bool:
    return path in PAGE_PATHS or path.startswith("/dashboard/")


def is_dashboard_path(path: str) -> bool:
    """Whether the dashboard serves ``path``; anything else is answered 404 by the gate."""
    return is_page(path) or path in ASSET_PATHS or path.startswith(ASSET_PREFIXES)


class DashboardGate:
    """ASGI app in front of the dashboard: ownership, then read-only, then auth (see module)."""

    def __init__(self, dashboard: ASGIApp) -> None:
        self.dashboard = dashboard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await WebSocketClose()(scope, receive, send)
            return
        request = Request(scope)
        path = request.url.path
        if not is_dashboard_path(path):
            raise NotFound(f"no route {request.method} {path}")
        # reliability branch: authenticate before saying "read-only" (401 before 405).
        if scope_of(request, presented_token(request)) is None:
            if is_page(path) and request.method in SAFE_METHODS:
                target = path + (f"?{request.url.query}" if request.url.query else "")
                redirect = RedirectResponse(f"/login?next={quote(target)}", status_code=303)
                await redirect(scope, receive, send)
                return
            raise AuthError("log in at /login, or send a bearer token")
        if request.method not in SAFE_METHODS:
            raise ReadOnly(
                f"{request.method} {path}: the dashboard is read-only through this server; "
                "change studies with the /v1 API"
            )
        try:
            await self.dashboard(scope, receive, send)
        except StorageOutage as outage:  # reliability branch: the service's 503 (api/errors.py)
            raise StorageUnavailable("the dashboard could not read the storage") from (
                outage.__cause__
            )


def mount_dashboard(
    app: FastAPI, storage: BaseStorage, artifact_store: ArtifactStore | None = None
) -> None:
    """Serve the dashboard over ``storage`` (read-only) at ``/``, and the login pages.

    With ``artifact_store`` the dashboard lists each trial's artifacts (checkpoints, diagnostics
    plots) on its page and serves them by GET; uploads stay refused like every other write.
    """
    app.include_router(login.router)
    wsgi_app = optuna_dashboard.wsgi(ReadOnlyView(storage), artifact_store=artifact_store)
    # reliability branch: let errors out of bottle (which would answer its own HTML 500), so
    # a database failure under /api/* is the service's 503 (api/errors.py).
    wsgi_app.config["catchall"] = False
    # a2wsgi types the ASGI callable more narrowly than Starlette does; it is one.
    dashboard = cast("ASGIApp", WSGIMiddleware(wsgi_app))
    app.router.default = DashboardGate(dashboard)
