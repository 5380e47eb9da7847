"""Shared server state, request guards (auth, model, overload) and the engine-call wrapper.

EngineCall is the one place that iterates `engine.generate`: it records TTFT/ITL, tracks in-flight
requests for shutdown, and aborts the engine request whenever iteration stops early (client
disconnect, cancellation, error, the end of the shutdown grace) so its KV blocks are freed at once.
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Send

from pensieve.engine.client import EngineClient
from pensieve.engine.outputs import RequestOutput
from pensieve.sampling_params import SamplingParams
from pensieve.server.conversations import Conversation, ConversationRegistry, Owner, ResponseStore
from pensieve.server.errors import APIError
from pensieve.server.metrics import ServerMetrics
from pensieve.server.settings import ServerSettings

T = TypeVar("T")
TOKENIZER_THREADS = 4   # prompts tokenized at once, off the event loop


class ServerShuttingDown(APIError):
    """The shutdown grace ran out while this request was in flight (or it came after)."""

    def __init__(self) -> None:
        super().__init__(503, "The server is shutting down; retry the request", code="server_shutting_down")


class ClientDisconnected(APIError):
    def __init__(self) -> None:
        super().__init__(499, "Client disconnected")


class Drain:
    """Graceful shutdown: from begin() on, new requests get 503; requests in flight finish until the
    grace ends, then each is cut (its engine request aborted) and ends with an error."""

    def __init__(self) -> None:
        self.draining = False
        self.expired = False

    def begin(self, grace_s: float, in_flight: dict[str, EngineCall]) -> None:
        if self.draining:
            return
        self.draining = True
        asyncio.get_running_loop().call_later(grace_s, self.expire, in_flight)

    def expire(self, in_flight: dict[str, EngineCall]) -> None:
        self.expired = True
        for call in list(in_flight.values()):
            call.cut(ServerShuttingDown())


@dataclass
class ServerState:
    engine: EngineClient
    settings: ServerSettings
    metrics: ServerMetrics
    responses: ResponseStore
    conversations: ConversationRegistry
    model_names: tuple[str, ...]
    in_flight: dict[str, EngineCall] = field(default_factory=dict)
    drain: Drain = field(default_factory=Drain)
    tokenizer_slots: anyio.CapacityLimiter = field(default_factory=lambda: anyio.CapacityLimiter(TOKENIZER_THREADS))
    kv_events: Any = None                        # KVEventPublisher when the replica publishes KV events

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs fn (tokenization, template rendering) on a worker thread: the event loop, and with it
        /health and every stream, goes on while a large prompt is tokenized."""
        return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=self.tokenizer_slots)


def get_state(request: Request) -> ServerState:
    return request.app.state.pensieve


def owner_of(key: str) -> str:
    # A digest, so stored objects never hold a raw key.
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def cache_salt_for(owner: Owner, cache_salt: str | None) -> str | None:
    """The engine's cache salt: KV is shared only within one API key's owner and one `cache_salt`.
    Unsalted (None) without keys and without a salt. Owners are hex digests, so "owner:salt" is
    unambiguous."""
    if owner is None and cache_salt is None:
        return None
    return f"{owner or ''}:{cache_salt or ''}"


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


def acquire_conversation(state: ServerState, owner: Owner, name: str) -> Conversation:
    """Holds a named conversation for one request (409 if busy); forgets expired ones first."""
    expired = state.conversations.expire()
    if expired:  # delete_conversation waits for the engine thread: keep it off the event loop
        loop = asyncio.get_running_loop()
        for engine_id in expired:
            loop.run_in_executor(None, state.engine.delete_conversation, engine_id)
    return state.conversations.acquire(owner, name)


class EngineCall:
    """`async with EngineCall(...) as call: async for out in call: ...` over one engine request.

    stream=True: outputs carry what is new since the previous one; False: the first token's output,
    then the final one with the whole completion (engine/outputs.py)."""

    def __init__(self, state: ServerState, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 conversation_id: str | None, *, stream: bool, cache_salt: str | None) -> None:
        self._state = state
        self.request_id = request_id
        self._stream = stream
        self._cache_salt = cache_salt
        self._generated: list[int] = []           # every generated id, for the KV event publisher
        self._gen = state.engine.generate(request_id, prompt_ids, params, conversation_id=conversation_id,
                                          stream=stream, cache_salt=cache_salt)
        self.finished = False
        self.first_token_s: float | None = None   # seconds from start to the first token
        self._start = time.perf_counter()
        self._cut: Exception | None = None
        self._abort_task: asyncio.Task | None = None

    async def __aenter__(self) -> EngineCall:
        if self._state.drain.expired:
            raise ServerShuttingDown()
        self._state.in_flight[self.request_id] = self
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._state.in_flight.pop(self.request_id, None)
        # Shielded: this runs inside a cancelled scope when the client went away.
        with anyio.CancelScope(shield=True):
            await self._gen.aclose()
            if not self.finished:
                await self._state.engine.abort(self.request_id)

    def cut(self, error: Exception) -> None:
        """Ends the request early (shutdown grace over, client gone): the engine aborts it, and the
        iteration raises `error` instead of the outputs still to come."""
        if self._cut is None and not self.finished:
            self._cut = error
            self._abort_task = asyncio.ensure_future(self._state.engine.abort(self.request_id))

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        metrics = self._state.metrics
        last_time, num_tokens = self._start, 0
        async for out in self._gen:
            if self._cut is not None and (not out.finished or out.outputs[0].finish_reason == "abort"):
                raise self._cut
            new = len(out.outputs[0].token_ids)
            count = num_tokens + new if self._stream else new   # tokens so far
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
            if self._state.kv_events is not None:  # the tokens of the blocks it cached, once it is done
                if self._stream:
                    self._generated += out.outputs[0].token_ids
                else:
                    self._generated = list(out.outputs[0].token_ids)
                if out.finished:
                    self._state.kv_events.learn(list(out.prompt_token_ids) + self._generated, self._cache_salt)
            yield out


async def _cut_on_disconnect(request: Request, call: EngineCall) -> None:
    # The body is read already: the next ASGI message is the client hanging up.
    while (await request.receive())["type"] != "http.disconnect":
        pass
    call.cut(ClientDisconnected())


async def run_to_end(call: EngineCall, request: Request) -> RequestOutput:
    """Non-streaming (call made with stream=False): the final output, whole. Aborts the engine request
    when the client hangs up (499), or when the shutdown grace ends first (503)."""
    final: RequestOutput | None = None
    watcher = asyncio.ensure_future(_cut_on_disconnect(request, call))
    try:
        async for out in call:
            final = out
    except ValueError as exc:  # the engine refuses a prompt before running it
        raise APIError(400, str(exc), code="invalid_prompt") from exc
    finally:
        watcher.cancel()
    if final is None or not final.finished:
        raise APIError(500, "The engine returned no final output")
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
