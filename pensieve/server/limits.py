"""The request body size limit: a pure ASGI middleware, so a body over the limit is refused (413,
OpenAI-shaped) before it is read whole, parsed or tokenized. (FastAPI's own `max_body_size` answers
a declared Content-Length over the limit with a plain-text 413 whatever the handlers say.)"""
from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pensieve.server.errors import error_response


def too_large_message(limit: int) -> str:
    return f"Request body too large: the limit is {limit} bytes (--max-request-body-bytes)"


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:   # refused unread
            await error_response(413, too_large_message(limit), code="request_too_large")(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            # a chunked body (no Content-Length) is counted as it arrives; the handler reading it
            # gets the 413 (FastAPI's body parsing lets an HTTPException through unchanged)
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, too_large_message(limit))
            return message

        await self.app(scope, counted, send)
