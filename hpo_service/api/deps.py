"""Request dependencies: the domain service and token auth with scopes.

A token arrives as a bearer header, or as the ``hpo_token`` cookie that ``POST /login`` sets for
browsers. The cookie is admitted only on safe methods (GET, HEAD): a browser attaches it to any
request to this host, including a form another site submits, whereas a bearer header is set by
the caller itself, so every write needs the header (no cross-site request forgery).
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from hpo_service.config import Scope
from hpo_service.errors import AuthError
from hpo_service.studies import StudyService

_bearer = HTTPBearer(auto_error=False)

#: The cookie ``POST /login`` sets; it carries the token itself (HttpOnly, SameSite=Strict).
TOKEN_COOKIE = "hpo_token"
#: The methods a cookie may authenticate: they change nothing.
SAFE_METHODS = frozenset({"GET", "HEAD"})


# The dependencies below are ``async`` though they never await: FastAPI runs a plain ``def``
# dependency in its thread pool, a hop per dependency per request (measured: ~0.2 ms each on
# the worker protocol's hot path); these only read memory, so they run on the event loop.


async def get_service(request: Request) -> StudyService:
    service: StudyService = request.app.state.service
    return service


ServiceDep = Annotated[StudyService, Depends(get_service)]


def cookie_token(request: Request) -> str | None:
    """The login cookie's token, on a safe method only (see the module docstring)."""
    return request.cookies.get(TOKEN_COOKIE) if request.method in SAFE_METHODS else None


def presented_token(request: Request) -> str | None:
    """The bearer token, else (on GET/HEAD) the login cookie's."""
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return cookie_token(request)


def scope_of(request: Request, token: str | None) -> Scope | None:
    """The scope a token grants, compared in constant time against every configured token."""
    tokens: dict[str, Scope] = request.app.state.tokens
    if not tokens:
        return "admin"  # no tokens configured: a loopback-only server, open by design
    if token is None:
        return None
    found: Scope | None = None
    for candidate, scope in tokens.items():
        # Compare against every token (no early exit) so timing does not reveal a prefix.
        if secrets.compare_digest(candidate.encode(), token.encode()):
            found = scope
    return found


def require(*allowed: Scope) -> Callable[..., Awaitable[Scope]]:
    """A dependency that admits admin and the given scopes."""

    async def check(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Scope:
        if credentials is not None:
            token: str | None = credentials.credentials
        else:
            token = cookie_token(request)
        scope = scope_of(request, token)
        if scope is None:
            raise AuthError("a valid bearer token is required")
        if scope != "admin" and scope not in allowed:
            raise AuthError(f"the {scope!r} scope cannot do this", forbidden=True)
        return scope

    # Read by api/openapi.py to state each route's scope in the document.
    check.scopes = ("admin", *allowed)  # type: ignore[attr-defined]
    return check


Admin = Depends(require())
Worker = Depends(require("worker"))
Reader = Depends(require("viewer", "worker"))
