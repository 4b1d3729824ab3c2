"""The request-body limit: every body larger than ``max_body_bytes`` is answered 413.

A body announced larger (``Content-Length``) is refused before one byte of it is read; a body
sent without a length (chunked) is counted as it arrives and refused the moment it passes the
limit, so neither is ever held in memory whole nor parsed. Without it one 40 MiB report took
21 s and 650 MiB of server memory, and was stored.
"""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hpo_service.api.errors import BodyTooLarge, error_response

#: The routes whose bodies are checkpoints or model weights (issue 14): tens of MB, so they
#: have their own limit (``max_checkpoint_bytes``) instead of the 1 MiB of JSON routes.
CHECKPOINT_PATHS = re.compile(r"^/v1/trials/[0-9]+/(?:checkpoint|best-model)$")


class BodyLimit:
    """ASGI middleware enforcing ``limit`` bytes per request body (see the module docstring),
    or ``large_limit`` on the paths ``large_paths`` matches."""

    def __init__(
        self,
        app: ASGIApp,
        limit: int,
        large_limit: int | None = None,
        large_paths: re.Pattern[str] = CHECKPOINT_PATHS,
    ) -> None:
        self.app = app
        self.limit = limit
        self.large_limit = large_limit if large_limit is not None else limit
        self.large_paths = large_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.large_limit if self.large_paths.match(scope["path"]) else self.limit
        announced = _content_length(scope)
        if announced is not None and announced > limit:
            too_large = BodyTooLarge(limit)
            response = error_response(413, "body_too_large", str(too_large.detail))
            # The body stays unread: tell the client this connection ends here.
            response.headers["Connection"] = "close"
            await response(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Raised inside the app's body read; FastAPI passes an HTTPException on and
                    # the handler in api/errors.py answers 413.
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, counted, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # malformed: the server rejects it before we see it
    return None
