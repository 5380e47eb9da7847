"""Small builders for OpenAI-shaped pieces: usage, logprobs, server-sent events."""
from __future__ import annotations

import json
import math
from typing import Any

from pensieve.engine.outputs import RequestOutput

DONE = "data: [DONE]\n\n"
# -inf (a token the sampler ruled out) and NaN (extreme sampling values) are not JSON: such a
# logprob goes out as this floor, the value vLLM sends for -inf.
FLOOR_LOGPROB = -9999.0


def sse(payload: dict[str, Any], event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    # allow_nan=False: a non-finite number would be invalid JSON in the client's parser; raise instead
    return f"{head}data: {json.dumps(payload, ensure_ascii=False, allow_nan=False)}\n\n"


def finite_logprob(logprob: float) -> float:
    if math.isnan(logprob) or logprob < FLOOR_LOGPROB:
        return FLOOR_LOGPROB
    return min(logprob, 0.0)


def cache_extension(out: RequestOutput) -> dict[str, int]:
    """The Pensieve usage extension: where the prompt's KV came from, split by tier."""
    return {"gpu_hit_tokens": out.cache.gpu_hit_tokens, "cpu_hit_tokens": out.cache.cpu_hit_tokens,
            "recomputed_tokens": out.cache.recomputed_tokens}


def chat_usage(out: RequestOutput, completion: int) -> dict[str, Any]:
    """`completion`: the number of generated tokens (a stream's last output carries only its own)."""
    prompt = len(out.prompt_token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": out.cache.cached_tokens},
            "pensieve": cache_extension(out)}


def responses_usage(out: RequestOutput, completion: int) -> dict[str, Any]:
    prompt = len(out.prompt_token_ids)
    return {"input_tokens": prompt, "output_tokens": completion, "total_tokens": prompt + completion,
            "input_tokens_details": {"cached_tokens": out.cache.cached_tokens},
            "output_tokens_details": {"reasoning_tokens": 0},
            "pensieve": cache_extension(out)}


def _token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def chat_logprobs(tokenizer: Any, token_ids: list[int], entries: list[tuple[float, dict[int, float]]],
                  top: int) -> dict[str, Any]:
    content = []
    for token_id, (logprob, top_map) in zip(token_ids, entries):
        text = _token_text(tokenizer, token_id)
        best = sorted(top_map.items(), key=lambda kv: -finite_logprob(kv[1]))[:top]
        content.append({
            "token": text, "logprob": finite_logprob(logprob), "bytes": list(text.encode()),
            "top_logprobs": [{"token": (t := _token_text(tokenizer, tid)), "logprob": finite_logprob(lp),
                              "bytes": list(t.encode())} for tid, lp in best],
        })
    return {"content": content}


def completion_logprobs(tokenizer: Any, token_ids: list[int], entries: list[tuple[float, dict[int, float]]],
                        text_start: int) -> dict[str, Any]:
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = text_start
    for token_id, (logprob, top_map) in zip(token_ids, entries):
        text = _token_text(tokenizer, token_id)
        tokens.append(text)
        token_lps.append(finite_logprob(logprob))
        tops.append({_token_text(tokenizer, tid): finite_logprob(lp) for tid, lp in top_map.items()})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}
