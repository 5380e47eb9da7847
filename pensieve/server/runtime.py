"""Shared server state, request guards (auth, model, overload) and the engine-call wrapper.

EngineCall is the one place that iterates `engine.generate`: it records TTFT/ITL, tracks in-flight
requests for shutdown, and aborts the engine request whenever iteration stops early (client
disconnect, cancellation, error) so its KV blocks are freed at once.
"""
from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Send

from pensieve.engine.outputs import RequestOutput
from pensieve.sampling_params import SamplingParams
from pensieve.server.conversations import Conversation, ConversationRegistry, Owner, ResponseStore
from pensieve.server.errors import APIError
from pensieve.server.metrics import ServerMetrics
from pensieve.server.settings import ServerSettings


@dataclass
class ServerState:
    engine: Any                                  # AsyncEngine (duck-typed so tests of pieces stay light)
    settings: ServerSettings
    metrics: ServerMetrics
    responses: ResponseStore
    conversations: ConversationRegistry
    model_names: tuple[str, ...]
    in_flight: set[str] = field(default_factory=set)
    kv_events: Any = None                        # KVEventPublisher when the replica publishes KV events


def get_state(request: Request) -> ServerState:
    return request.app.state.pensieve


def owner_of(key: str) -> str:
    # A digest, so stored objects never hold a raw key.
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def authenticate(request: Request) -> Owner:
    """FastAPI dependency: the caller's owner id, or 401 when keys are configured and this one is wrong."""
    keys = get_state(request).settings.api_keys
    if not keys:
        return None
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    # Compare against every key so timing does not reveal which one matched.
    matched = [secrets.compare_digest(token.encode(), key.encode()) for key in keys]
    if not any(matched):
        raise APIError(401, "Incorrect API key provided", code="invalid_api_key")
    return owner_of(token)


def check_model(state: ServerState, model: str) -> str:
    if model not in state.model_names:
        raise APIError(404, f"The model '{model}' does not exist; served: {', '.join(state.model_names)}",
                       param="model", code="model_not_found")
    return model


def check_capacity(state: ServerState) -> None:
    waiting = state.engine.stats().num_waiting
    if waiting >= state.settings.max_waiting:
        raise APIError(503, f"Server overloaded: {waiting} requests waiting (limit {state.settings.max_waiting})",
                       code="overloaded", headers={"Retry-After": str(state.settings.retry_after_s)})


def acquire_conversation(state: ServerState, owner: Owner, name: str) -> Conversation:
    """Holds a named conversation for one request (409 if busy); forgets expired ones first."""
    expired = state.conversations.expire()
    if expired:  # delete_conversation waits for the engine thread: keep it off the event loop
        loop = asyncio.get_running_loop()
        for engine_id in expired:
            loop.run_in_executor(None, state.engine.delete_conversation, engine_id)
    return state.conversations.acquire(owner, name)


class EngineCall:
    """`async with EngineCall(...) as call: async for out in call: ...` over one engine request."""

    def __init__(self, state: ServerState, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 conversation_id: str | None) -> None:
        self._state = state
        self.request_id = request_id
        self._gen = state.engine.generate(request_id, prompt_ids, params, conversation_id=conversation_id)
        self.finished = False
        self.first_token_s: float | None = None   # seconds from start to the first token
        self._start = time.perf_counter()

    async def __aenter__(self) -> EngineCall:
        self._state.in_flight.add(self.request_id)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._state.in_flight.discard(self.request_id)
        # Shielded: this runs inside a cancelled scope when the client went away.
        with anyio.CancelScope(shield=True):
            await self._gen.aclose()
            if not self.finished:
                await self._state.engine.abort(self.request_id)

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        metrics = self._state.metrics
        last_time, num_tokens = self._start, 0
        async for out in self._gen:
            count = len(out.outputs[0].token_ids)
            if count > num_tokens:
                now = time.perf_counter()
                if num_tokens == 0:
                    self.first_token_s = now - self._start
                    metrics.ttft.observe(self.first_token_s)
                    count_gaps = count - 1
                else:
                    count_gaps = count - num_tokens
                for _ in range(count_gaps):  # tokens that arrived together share the gap
                    metrics.itl.observe((now - last_time) / max(count - num_tokens, 1))
                last_time, num_tokens = now, count
            self.finished = out.finished
            if out.finished and self._state.kv_events is not None:  # the tokens of the blocks it cached
                self._state.kv_events.learn(list(out.prompt_token_ids) + list(out.outputs[0].token_ids))
            yield out


async def run_to_end(call: EngineCall, request: Request) -> RequestOutput:
    """Non-streaming: the final output; aborts (via EngineCall's exit) when the client disconnects."""
    final: RequestOutput | None = None
    try:
        async for out in call:
            final = out
            if not out.finished and await request.is_disconnected():
                raise APIError(499, "Client disconnected")
    except ValueError as exc:  # the engine refuses a prompt before running it
        raise APIError(400, str(exc), code="invalid_prompt") from exc
    if final is None:
        raise APIError(500, "The engine returned no output")
    return final


class EventStream(StreamingResponse):
    """SSE response that always closes its body generator and runs `cleanup`, even when never started."""

    def __init__(self, body: AsyncIterator[str], cleanup: Callable[[], Awaitable[None]] | None = None) -> None:
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._body = body
        self._cleanup = cleanup

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._body.aclose()  # type: ignore[attr-defined]
                if self._cleanup is not None:
                    await self._cleanup()
