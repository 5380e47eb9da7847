"""POST /v1/chat/completions and POST /v1/completions."""
from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from pensieve.engine.outputs import RequestOutput
from pensieve.sampling_params import SamplingParams
from pensieve.server.conversations import Owner
from pensieve.server.errors import APIError, error_body
from pensieve.server.formatting import DONE, chat_logprobs, chat_usage, completion_logprobs, sse
from pensieve.server.prompts import chat_prompt_ids, encode, resolve_max_tokens, sampling_params
from pensieve.server.protocol import ChatCompletionRequest, CompletionRequest
from pensieve.server.runtime import (EngineCall, EventStream, ServerState, acquire_conversation, authenticate,
                                     cache_salt_for, check_model, get_state, run_to_end)

router = APIRouter()

# (output, its new text, its new token ids, their logprob entries, characters of the completion before
# the new text) -> one choice. Not streamed: the whole completion, from character 0.
ChoiceBuilder = Callable[[RequestOutput, str, list[int], list[Any], int], dict[str, Any]]


async def _respond(state: ServerState, request: Request, *, request_id: str, prompt_ids: list[int],
                   params: SamplingParams, stream: bool, include_usage: bool, conversation: str | None,
                   owner: Owner, cache_salt: str | None, envelope: dict[str, Any], choice: ChoiceBuilder,
                   first_chunk: dict[str, Any] | None, return_token_ids: bool = False) -> Response:
    """Runs one generation and answers in full or as an SSE stream (chat and completions alike)."""
    conv = acquire_conversation(state, owner, conversation) if conversation else None
    engine_conv = conv.engine_id if conv else None
    salt = cache_salt_for(owner, cache_salt)

    async def release() -> None:
        if conv is not None:
            state.conversations.release(conv)

    if not stream:
        try:
            async with EngineCall(state, request_id, prompt_ids, params, engine_conv, stream=False,
                                  cache_salt=salt) as call:
                out = await run_to_end(call, request)
        finally:
            await release()
        comp = out.outputs[0]
        full = choice(out, comp.text, comp.token_ids, comp.logprobs or [], 0)
        if return_token_ids:
            full.update(token_ids=list(comp.token_ids), prompt_token_ids=list(out.prompt_token_ids))
        return JSONResponse({**envelope, "choices": [full], "usage": chat_usage(out, len(comp.token_ids))})

    async def events() -> AsyncIterator[str]:
        if first_chunk is not None:
            yield sse({**envelope, "choices": [first_chunk]})
        final, num_tokens, num_chars = None, 0, 0
        try:
            async with EngineCall(state, request_id, prompt_ids, params, engine_conv, stream=True,
                                  cache_salt=salt) as call:
                async for out in call:   # each output carries only what is new
                    comp, final = out.outputs[0], out
                    num_tokens += len(comp.token_ids)
                    if comp.text or comp.logprobs or (return_token_ids and comp.token_ids) or out.finished:
                        part = choice(out, comp.text, comp.token_ids, comp.logprobs or [], num_chars)
                        if return_token_ids:  # ids travel even while their text is held back
                            part["token_ids"] = list(comp.token_ids)
                        yield sse({**envelope, "choices": [part]})
                    num_chars += len(comp.text)
        except APIError as exc:  # the shutdown grace ran out (503), ...: headers are sent, report in-band
            final = None
            yield sse(error_body(exc.status, exc.message, exc.param, exc.code))
        except ValueError as exc:  # the engine refused the prompt after the stream began
            final = None
            yield sse(error_body(400, str(exc), code="invalid_prompt"))
        except Exception as exc:  # headers are sent: report in-band rather than cut the connection
            final = None
            yield sse(error_body(500, f"Generation failed: {exc}"))
        if include_usage and final is not None:
            yield sse({**envelope, "choices": [], "usage": chat_usage(final, num_tokens)})
        yield DONE

    return EventStream(events(), cleanup=release)


def _max_tokens_field(body: ChatCompletionRequest) -> tuple[int | None, str]:
    if body.max_completion_tokens is not None:
        return body.max_completion_tokens, "max_completion_tokens"
    return body.max_tokens, "max_tokens"


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           owner: Owner = Depends(authenticate)) -> Response:
    state = get_state(request)
    check_model(state, body.model)
    tokenizer = state.engine.tokenizer
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    prompt_ids = await state.off_loop(chat_prompt_ids, tokenizer, messages, state.engine.max_model_len)
    max_tokens, param = _max_tokens_field(body)
    max_tokens = resolve_max_tokens(len(prompt_ids), max_tokens, state.engine.max_model_len, param)
    top = body.top_logprobs or 0
    params = sampling_params(body, max_tokens, top if body.logprobs else None)
    request_id = f"chatcmpl-{secrets.token_urlsafe(16)}"
    envelope = {"id": request_id, "object": "chat.completion.chunk" if body.stream else "chat.completion",
                "created": int(time.time()), "model": body.model}

    def choice(out: RequestOutput, text: str, ids: list[int], lps: list[Any], text_start: int) -> dict[str, Any]:
        comp = out.outputs[0]
        logprobs = chat_logprobs(tokenizer, ids, lps, top) if body.logprobs else None
        finish = comp.finish_reason if out.finished else None
        if body.stream:
            return {"index": 0, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                    "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish}

    first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await _respond(state, request, request_id=request_id, prompt_ids=prompt_ids, params=params,
                          stream=body.stream, include_usage=include_usage, conversation=body.conversation_id,
                          owner=owner, cache_salt=body.cache_salt, envelope=envelope, choice=choice,
                          first_chunk=first, return_token_ids=body.return_token_ids)


def _completion_prompt(state: ServerState, prompt: Any) -> list[int]:
    """One prompt (string or token ids); a batch of several is refused. Runs off the event loop."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, f"Batched prompts are not supported: send one prompt per request (got {len(prompt)})",
                           param="prompt", code="unsupported_value")
        prompt = prompt[0]
    tokenizer = state.engine.tokenizer
    if isinstance(prompt, str):
        return encode(tokenizer, prompt, add_special_tokens=True, max_tokens=state.engine.max_model_len)
    vocab = len(tokenizer)
    if any(t >= vocab for t in prompt):
        raise APIError(400, f"Token ids must be below the vocabulary size {vocab}", param="prompt",
                       code="invalid_value")
    return list(prompt)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, owner: Owner = Depends(authenticate)) -> Response:
    state = get_state(request)
    check_model(state, body.model)
    tokenizer = state.engine.tokenizer
    prompt_ids = await state.off_loop(_completion_prompt, state, body.prompt)
    max_tokens = resolve_max_tokens(len(prompt_ids), body.max_tokens, state.engine.max_model_len, "max_tokens")
    params = sampling_params(body, max_tokens, body.logprobs)
    request_id = f"cmpl-{secrets.token_urlsafe(16)}"
    envelope = {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": body.model}
    echo = await state.off_loop(lambda: tokenizer.decode(prompt_ids, skip_special_tokens=True)) if body.echo else ""

    def choice(out: RequestOutput, text: str, ids: list[int], lps: list[Any], text_start: int) -> dict[str, Any]:
        comp = out.outputs[0]
        prefix = "" if body.stream else echo  # a stream sends the echo in its first chunk
        offset = len(echo) + text_start
        logprobs = completion_logprobs(tokenizer, ids, lps, offset) if body.logprobs is not None else None
        return {"index": 0, "text": prefix + text, "logprobs": logprobs,
                "finish_reason": comp.finish_reason if out.finished else None}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await _respond(state, request, request_id=request_id, prompt_ids=prompt_ids, params=params,
                          stream=body.stream, include_usage=include_usage, conversation=None, owner=owner,
                          cache_salt=body.cache_salt, envelope=envelope, choice=choice,
                          first_chunk={"index": 0, "text": echo, "logprobs": None, "finish_reason": None}
                          if echo else None, return_token_ids=body.return_token_ids)

