"""Browser login for the dashboard: a token typed into a form, exchanged for a cookie.

``GET /login`` shows the form; ``POST /login`` checks the token and sets the ``hpo_token`` cookie
(HttpOnly: page scripts cannot read it; SameSite=Strict: other sites' requests do not carry it)
and redirects to where the browser was going; ``POST /logout`` clears it. The cookie
authenticates GET and HEAD only (``api/deps.py``), so it opens the read-only dashboard and the
``/v1`` reads, never a write. A server without tokens (loopback only) needs no login.
"""

from __future__ import annotations

import html
from typing import Annotated
from urllib.parse import parse_qs

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from hpo_service.api.deps import TOKEN_COOKIE, cookie_token, scope_of
from hpo_service.config import Scope

router = APIRouter(tags=["login"], include_in_schema=False)

HOME = "/dashboard"
#: A login form is a few dozen bytes; refuse to buffer anything much larger.
MAX_FORM_BYTES = 8192

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Log in · VAE HPO</title>
<style>
body {{ font-family: system-ui, sans-serif; display: flex; justify-content: center;
       margin-top: 15vh; background: #f5f5f5; }}
form {{ background: white; padding: 2rem 2.5rem; border-radius: 8px;
       box-shadow: 0 4px 16px rgba(0, 0, 0, .08); min-width: 22rem; }}
h1 {{ font-size: 1.3rem; margin-top: 0; }}
input[type=password] {{ width: 100%; padding: .5rem; margin: .5rem 0 1rem;
                        box-sizing: border-box; }}
button {{ padding: .5rem 1.2rem; }}
.error {{ color: #b00020; }}
</style>
</head>
<body>
{logged_in}
<form method="post" action="/login">
<h1>VAE HPO dashboard</h1>
{error}
<label for="token">API token (viewer, worker or admin)</label>
<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
<input type="hidden" name="next" value="{next}">
<button type="submit">Log in</button>
</form>
</body>
</html>
"""
# The page has no scripts and posts only to itself.
_CSP = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"


def safe_next(target: str | None) -> str:
    """Where to go after logging in: a path on this server, never another site."""
    if target and target.startswith("/") and not target.startswith(("//", "/\\")):
        return target
    return HOME


_LOGGED_IN = """<form method="post" action="/logout">
<p>Logged in with a {scope} token. <a href="{home}">Open the dashboard</a></p>
<button type="submit">Log out</button>
</form>
"""


def _form(
    next_path: str,
    error: str | None = None,
    status_code: int = 200,
    scope: Scope | None = None,
) -> HTMLResponse:
    message = f'<p class="error">{html.escape(error)}</p>' if error else ""
    logged_in = _LOGGED_IN.format(scope=scope, home=HOME) if scope else ""
    body = _PAGE.format(logged_in=logged_in, error=message, next=html.escape(next_path, quote=True))
    return HTMLResponse(body, status_code=status_code, headers={"Content-Security-Policy": _CSP})


def _no_login_needed(request: Request) -> bool:
    return not request.app.state.tokens


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: Annotated[str | None, Query()] = None) -> Response:
    target = safe_next(next)
    if _no_login_needed(request):
        return RedirectResponse(target, status_code=303)
    # Already logged in: offer the way out (the cookie is HttpOnly, scripts cannot drop it).
    return _form(target, scope=scope_of(request, cookie_token(request)))


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    """Check the posted ``token``; on success set the cookie and redirect (303) to ``next``.

    A wrong or missing token gets the form again with 401; an oversized body gets 413.
    """
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        return _form(HOME, "The form was too large.", status_code=413)
    fields = parse_qs(body.decode("utf-8", errors="replace"))
    token = fields.get("token", [""])[0].strip()
    target = safe_next(fields.get("next", [""])[0])
    if _no_login_needed(request):
        return RedirectResponse(target, status_code=303)
    if not token or scope_of(request, token) is None:
        return _form(target, "That token is not valid.", status_code=401)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        TOKEN_COOKIE,
        token,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


@router.post("/logout")
def logout() -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(TOKEN_COOKIE, path="/", httponly=True, samesite="strict")
    return response
