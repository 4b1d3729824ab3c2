"""The request-body limit: every body larger than ``max_body_bytes`` is answered 413.

A body announced larger (``Content-Length``) is refused before one byte of it is read; a body
sent without a length (chunked) is counted as it arrives and refused the moment it passes the
limit, so neither is ever held in memory whole nor parsed. Without it one 40 MiB report took
21 s and 650 MiB of server memory, and was stored.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hpo_service.api.errors import BodyTooLarge, error_response


class BodyLimit:
    """ASGI middleware enforcing ``limit`` bytes per request body (see the module docstring)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        announced = _content_length(scope)
        if announced is not None and announced > self.limit:
            too_large = BodyTooLarge(self.limit)
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
                if received > self.limit:
                    # Raised inside the app's body read; FastAPI passes an HTTPException on and
                    # the handler in api/errors.py answers 413.
                    raise BodyTooLarge(self.limit)
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
