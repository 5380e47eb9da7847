"""Small builders for OpenAI-shaped pieces: usage, logprobs, server-sent events."""
from __future__ import annotations

import json
from typing import Any

from pensieve.engine.outputs import RequestOutput

DONE = "data: [DONE]\n\n"


def sse(payload: dict[str, Any], event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def cache_extension(out: RequestOutput) -> dict[str, int]:
    """The Pensieve usage extension: where the prompt's KV came from, split by tier."""
    return {"gpu_hit_tokens": out.cache.gpu_hit_tokens, "cpu_hit_tokens": out.cache.cpu_hit_tokens,
            "recomputed_tokens": out.cache.recomputed_tokens}


def chat_usage(out: RequestOutput) -> dict[str, Any]:
    prompt, completion = len(out.prompt_token_ids), len(out.outputs[0].token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": out.cache.cached_tokens},
            "pensieve": cache_extension(out)}


def responses_usage(out: RequestOutput) -> dict[str, Any]:
    prompt, completion = len(out.prompt_token_ids), len(out.outputs[0].token_ids)
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
        best = sorted(top_map.items(), key=lambda kv: -kv[1])[:top]
        content.append({
            "token": text, "logprob": logprob, "bytes": list(text.encode()),
            "top_logprobs": [{"token": (t := _token_text(tokenizer, tid)), "logprob": lp, "bytes": list(t.encode())}
                             for tid, lp in best],
        })
    return {"content": content}


def completion_logprobs(tokenizer: Any, token_ids: list[int], entries: list[tuple[float, dict[int, float]]],
                        text_start: int) -> dict[str, Any]:
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = text_start
    for token_id, (logprob, top_map) in zip(token_ids, entries):
        text = _token_text(tokenizer, token_id)
        tokens.append(text)
        token_lps.append(logprob)
        tops.append({_token_text(tokenizer, tid): lp for tid, lp in top_map.items()})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}
