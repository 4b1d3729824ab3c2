"""Request dependencies: the domain service and bearer-token auth with scopes."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from hpo_service.config import Scope
from hpo_service.errors import AuthError
from hpo_service.studies import StudyService

_bearer = HTTPBearer(auto_error=False)


def get_service(request: Request) -> StudyService:
    service: StudyService = request.app.state.service
    return service


ServiceDep = Annotated[StudyService, Depends(get_service)]


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


def require(*allowed: Scope) -> Callable[..., Scope]:
    """A dependency that admits admin and the given scopes."""

    def check(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Scope:
        token = credentials.credentials if credentials is not None else None
        token = token or request.cookies.get("hpo_token")
        scope = scope_of(request, token)
        if scope is None:
            raise AuthError("a valid bearer token is required")
        if scope != "admin" and scope not in allowed:
            raise AuthError(f"the {scope!r} scope cannot do this", forbidden=True)
        return scope

    return check


Admin = Depends(require())
Worker = Depends(require("worker"))
Reader = Depends(require("viewer", "worker"))
