"""Limits on what the server takes in, as pure ASGI middleware (streaming-safe, no per-request task).

BodySizeLimit: a body over the limit is refused (413, OpenAI-shaped) before it is read whole, parsed
or tokenized. (FastAPI's own `max_body_size` answers a declared Content-Length over the limit with a
plain-text 413 whatever the handlers say.) AdmissionControl: the waiting-queue bound.
"""
from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pensieve.server.errors import error_response
from pensieve.server.runtime import ServerState


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


GENERATION_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})


class AdmissionControl:
    """Sheds load before latency runs away: a generation request is refused (503 + Retry-After) while
    the requests already admitted exceed what the engine runs at once (max_num_seqs) by `max_waiting`,
    or while the engine's own queue is that long (its KV may hold fewer than max_num_seqs). A request
    counts from its arrival to its last byte (a stream's end), so a burst counts in full before the
    engine has seen any of it. While the server shuts down, every new request gets 503."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state
        self.admitted = 0

    def refusal(self) -> tuple[str, str] | None:
        state = self.state
        if state.drain.draining:
            return "The server is shutting down; retry the request", "server_shutting_down"
        running = state.engine.config.scheduler.max_num_seqs
        limit = state.settings.max_waiting if state.settings.max_waiting is not None else running
        waiting = max(state.engine.stats().num_waiting, self.admitted - running)
        if waiting >= limit:
            return f"Server overloaded: {waiting} requests waiting (limit {limit}); retry later", "overloaded"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in GENERATION_ROUTES:
            await self.app(scope, receive, send)
            return
        refused = self.refusal()
        if refused is not None:
            retry = {"Retry-After": str(self.state.settings.retry_after_s)}
            await error_response(503, refused[0], code=refused[1], headers=retry)(scope, receive, send)
            return
        self.admitted += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.admitted -= 1
