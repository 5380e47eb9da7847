"""What a cache-aware router asks a replica, in vLLM's shapes: the token ids a request will be served with.

vllm-router (cache_aware and kv_aware policies) renders each chat request on the replicas before it picks
one, then matches the ids against what each replica holds; without these endpoints it can only balance by
load. The ids are exactly the ones the generation endpoints compute (same chat template, same prompt
encoding), so block boundaries and hashes agree with the engine's.

Like vLLM's /tokenize, these endpoints take no API key (a router calls them without the client's key); they
run the tokenizer only and return the ids of the text sent. A `previous_response_id` request is stateful:
only the replica holding that response knows its tokens, so it is not rendered (routers route it by their
session key instead; docs/REPLICAS.md).
"""
from __future__ import annotations

import secrets
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pensieve.server.errors import APIError
from pensieve.server.prompts import chat_prompt_ids, encode, render
from pensieve.server.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, ResponsesRequest, _Lenient
from pensieve.server.responses_api import _new_messages
from pensieve.server.runtime import get_state

router = APIRouter()


def _rendered(request_id: str, model: str, token_ids: list[int]) -> JSONResponse:
    # vLLM's render result as routers read it: the prompt's token ids (vllm-router reads `token_ids`)
    return JSONResponse({"request_id": request_id, "model": model, "token_ids": token_ids})


def _chat_ids(request: Request, messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
    tokenizer = get_state(request).engine.tokenizer
    plain = [{"role": m.role, "content": m.text()} for m in messages]
    if add_generation_prompt:
        return chat_prompt_ids(tokenizer, plain)
    return encode(tokenizer, render(tokenizer, plain, add_generation_prompt=False), add_special_tokens=False)


@router.post("/v1/chat/completions/render")
async def render_chat(body: ChatCompletionRequest, request: Request) -> JSONResponse:
    return _rendered(f"chatcmpl-{secrets.token_urlsafe(8)}", body.model, _chat_ids(request, body.messages))


@router.post("/v1/completions/render")
async def render_completion(body: CompletionRequest, request: Request) -> JSONResponse:
    prompt: Any = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, "Render one prompt per request", param="prompt", code="unsupported_value")
        prompt = prompt[0]
    ids = encode(get_state(request).engine.tokenizer, prompt, True) if isinstance(prompt, str) else list(prompt)
    return _rendered(f"cmpl-{secrets.token_urlsafe(8)}", body.model, ids)


@router.post("/v1/responses/render")
async def render_response(body: ResponsesRequest, request: Request) -> JSONResponse:
    if body.previous_response_id is not None:
        raise APIError(400, "A previous_response_id turn is stateful: its tokens are known only where it is stored",
                       param="previous_response_id", code="unsupported_value")
    tokenizer = get_state(request).engine.tokenizer
    ids = chat_prompt_ids(tokenizer, _new_messages(body))   # a first turn: its messages are the whole prompt
    return _rendered(f"resp_{secrets.token_urlsafe(8)}", body.model, ids)


class TokenizeRequest(_Lenient):
    """vLLM's /tokenize body: a completion prompt or chat messages."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool | None = None


class DetokenizeRequest(_Lenient):
    model: str | None = None
    tokens: list[int] = Field(default_factory=list)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> JSONResponse:
    state = get_state(request)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "Send either `prompt` or `messages`", param="prompt", code="invalid_value")
    if body.messages is not None:
        ids = _chat_ids(request, body.messages, body.add_generation_prompt)
    else:
        add_special = True if body.add_special_tokens is None else body.add_special_tokens
        ids = encode(state.engine.tokenizer, body.prompt or "", add_special)
    return JSONResponse({"count": len(ids), "max_model_len": state.engine.max_model_len, "tokens": ids,
                         "token_strs": None})


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> JSONResponse:
    tokenizer = get_state(request).engine.tokenizer
    if any(t < 0 or t >= len(tokenizer) for t in body.tokens):
        raise APIError(400, f"Token ids must be in [0, {len(tokenizer)})", param="tokens", code="invalid_value")
    return JSONResponse({"prompt": tokenizer.decode(body.tokens)})


@router.get("/get_load")
async def get_load(request: Request) -> JSONResponse:
    """Requests in the engine (running and waiting): the load the routers' power-of-two policy compares."""
    stats = get_state(request).engine.stats()
    return JSONResponse({"load": int(stats.num_running + stats.num_waiting)})


class ReplicaHeader:
    """Names the replica that answered in every response (`x-pensieve-replica`): which one served a turn is
    visible behind a router, to clients, tests and logs."""

    def __init__(self, app: ASGIApp, name: str) -> None:
        self.app = app
        self.header = (b"x-pensieve-replica", name.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_named)
