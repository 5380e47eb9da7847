"""The Responses API (stateful turns) and conversation deletion.

A follow-up turn (`previous_response_id`) appends the new turn's tokens to the previous response's
stored token ids, so the engine finds the whole history in its cache: no re-tokenized history, and
no template that rewrites earlier turns can break the match.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from pensieve.engine.outputs import RequestOutput
from pensieve.sampling_params import SamplingParams
from pensieve.server import peers
from pensieve.server.conversations import Owner, StoredResponse, new_id
from pensieve.server.errors import APIError, error_body
from pensieve.server.formatting import responses_usage, sse
from pensieve.server.prompts import append_turn_ids, chat_prompt_ids, resolve_max_tokens
from pensieve.server.protocol import ResponsesRequest
from pensieve.server.runtime import (EngineCall, EventStream, acquire_conversation, authenticate, cache_salt_for,
                                     check_model, get_state, run_to_end)

router = APIRouter()


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    content = [part] if status == "completed" else []
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content}


def _item_id(response_id: str) -> str:
    return "msg_" + response_id.removeprefix("resp_")


def response_object(r: StoredResponse, *, status: str = "completed") -> dict[str, Any]:
    incomplete = status == "completed" and r.finish_reason == "length"
    done = status == "completed"
    return {
        "id": r.id, "object": "response", "created_at": r.created_at, "model": r.model,
        "status": ("incomplete" if incomplete else "completed") if done else status,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "error": None,
        "output": [_message_item(_item_id(r.id), r.output_text, "completed")] if done else [],
        "usage": r.usage if done else None,
        "conversation": {"id": r.conversation_id},
        "parallel_tool_calls": False, "tool_choice": "auto", "tools": [], "metadata": {},
        "text": {"format": {"type": "text"}},
        **r.request,
    }


def _new_messages(body: ResponsesRequest) -> list[dict[str, str]]:
    if isinstance(body.input, str):
        messages = [{"role": "user", "content": body.input}]
    else:
        messages = [{"role": m.role, "content": m.text()} for m in body.input]
    if not messages:
        raise APIError(400, "input must not be empty", param="input", code="invalid_value")
    if body.instructions:
        messages.insert(0, {"role": "system", "content": body.instructions})
    return messages


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request, owner: Owner = Depends(authenticate)) -> Response:
    state = get_state(request)
    check_model(state, body.model)
    tokenizer, context = state.engine.tokenizer, state.engine.max_model_len
    new_messages = _new_messages(body)
    if body.previous_response_id is not None:
        prev = state.responses.get(body.previous_response_id, owner)
        if prev is None:  # stored by another replica of a deployment? it continues the chain
            return await peers.from_owner(request, state.settings, body.previous_response_id, APIError(
                404, f"Response '{body.previous_response_id}' not found", param="previous_response_id",
                code="response_not_found"))
        history, conv_name = prev.messages, prev.conversation_id
        prompt_ids = await state.off_loop(append_turn_ids, tokenizer, history, prev.token_ids,
                                          prev.token_ids[prev.reply_start:], new_messages, context)
    else:
        history, conv_name = [], new_id("conv")
        prompt_ids = await state.off_loop(chat_prompt_ids, tokenizer, new_messages, context)
    max_tokens = resolve_max_tokens(len(prompt_ids), body.max_output_tokens, state.engine.max_model_len,
                                    "max_output_tokens")
    given = {k: v for k, v in (("temperature", body.temperature), ("top_p", body.top_p)) if v is not None}
    try:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=body.ignore_eos, **given)
    except ValueError as exc:
        raise APIError(400, str(exc), code="invalid_value") from exc

    response_id = peers.new_response_id(state.settings)
    item_id = _item_id(response_id)
    echoed = {"instructions": body.instructions, "previous_response_id": body.previous_response_id,
              "store": body.store, "temperature": body.temperature, "top_p": body.top_p,
              "max_output_tokens": body.max_output_tokens}

    def finish(out: RequestOutput, text: str, ids: list[int]) -> StoredResponse:
        """`out` is the final output; `text` and `ids` are the whole reply."""
        comp = out.outputs[0]
        stored = StoredResponse(
            id=response_id, owner=owner, conversation_id=conv_name, created_at=int(time.time()), model=body.model,
            messages=history + new_messages + [{"role": "assistant", "content": text}],
            token_ids=list(out.prompt_token_ids) + ids, reply_start=len(out.prompt_token_ids),
            output_text=text, finish_reason=comp.finish_reason or "stop", usage=responses_usage(out, len(ids)),
            request=echoed)
        if body.store and comp.finish_reason != "abort":
            state.responses.put(stored)
        return stored

    # A chain's turns share one engine conversation; an unstored first turn needs none.
    conv = acquire_conversation(state, owner, conv_name) if body.store or history else None
    engine_conv = conv.engine_id if conv else None
    salt = cache_salt_for(owner, body.cache_salt)

    async def release() -> None:
        if conv is not None:
            state.conversations.release(conv)

    if not body.stream:
        try:
            async with EngineCall(state, response_id, prompt_ids, params, engine_conv, stream=False,
                                  cache_salt=salt) as call:
                out = await run_to_end(call, request)
        finally:
            await release()
        comp = out.outputs[0]
        return JSONResponse(response_object(finish(out, comp.text, list(comp.token_ids))))

    async def events() -> AsyncIterator[str]:
        seq = iter(range(1 << 62))
        pending = StoredResponse(response_id, owner, conv_name, int(time.time()), body.model, [], [], 0, "", "", {},
                                 echoed)
        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        yield sse({"type": "response.created", "sequence_number": next(seq),
                   "response": response_object(pending, status="in_progress")}, "response.created")
        yield sse({"type": "response.output_item.added", "sequence_number": next(seq), "output_index": 0,
                   "item": _message_item(item_id, "", "in_progress")}, "response.output_item.added")
        part = {"type": "output_text", "text": "", "annotations": []}
        yield sse({"type": "response.content_part.added", "sequence_number": next(seq), **where, "part": part},
                  "response.content_part.added")
        texts: list[str] = []
        ids: list[int] = []
        final = None
        try:
            async with EngineCall(state, response_id, prompt_ids, params, engine_conv, stream=True,
                                  cache_salt=salt) as call:
                async for out in call:   # each output carries only what is new
                    final, comp = out, out.outputs[0]
                    ids += comp.token_ids
                    if comp.text:
                        texts.append(comp.text)
                        yield sse({"type": "response.output_text.delta", "sequence_number": next(seq), **where,
                                   "delta": comp.text, "logprobs": []}, "response.output_text.delta")
        except Exception as exc:  # headers are sent: report in-band rather than cut the connection
            if isinstance(exc, APIError):   # the shutdown grace ran out (503), ...
                err = error_body(exc.status, exc.message, exc.param, exc.code)
            else:
                err = error_body(400 if isinstance(exc, ValueError) else 500, str(exc))
            yield sse({"type": "error", "sequence_number": next(seq), **err["error"]}, "error")
            return
        if final is None:
            return
        sent = "".join(texts)
        stored = finish(final, sent, ids)
        yield sse({"type": "response.output_text.done", "sequence_number": next(seq), **where, "text": sent,
                   "logprobs": []}, "response.output_text.done")
        yield sse({"type": "response.content_part.done", "sequence_number": next(seq), **where,
                   "part": {**part, "text": sent}}, "response.content_part.done")
        yield sse({"type": "response.output_item.done", "sequence_number": next(seq), "output_index": 0,
                   "item": _message_item(item_id, sent, "completed")}, "response.output_item.done")
        yield sse({"type": "response.completed", "sequence_number": next(seq),
                   "response": response_object(stored)}, "response.completed")

    return EventStream(events(), cleanup=release)


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request, owner: Owner = Depends(authenticate)) -> Response:
    state = get_state(request)
    stored = state.responses.get(response_id, owner)
    if stored is None:
        return await peers.from_owner(request, state.settings, response_id, APIError(
            404, f"Response '{response_id}' not found", param="response_id", code="response_not_found"))
    return JSONResponse(response_object(stored))


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request, owner: Owner = Depends(authenticate)) -> Response:
    state = get_state(request)
    if not state.responses.delete(response_id, owner):
        return await peers.from_owner(request, state.settings, response_id, APIError(
            404, f"Response '{response_id}' not found", param="response_id", code="response_not_found"))
    return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})


@router.delete("/v1/conversations/{conversation_id}")
async def delete_conversation(conversation_id: str, request: Request,
                              owner: Owner = Depends(authenticate)) -> Response:
    """Frees the conversation's cached KV in both tiers; its stored responses stay readable."""
    state = get_state(request)
    conv = state.conversations.remove(owner, conversation_id)
    if conv is not None:
        await asyncio.to_thread(state.engine.delete_conversation, conv.engine_id)  # waits for the engine thread
    # its KV may be cached on other replicas too (turns that resend the history may land anywhere)
    deleted_elsewhere = 200 in await peers.broadcast(request, state.settings)
    if conv is None and not deleted_elsewhere:
        raise APIError(404, f"Conversation '{conversation_id}' not found", param="conversation_id",
                       code="conversation_not_found")
    return JSONResponse({"id": conversation_id, "object": "conversation.deleted", "deleted": True})
