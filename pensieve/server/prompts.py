"""Prompt building (chat template, token-append turns) and SamplingParams mapping with length checks."""
from __future__ import annotations

from typing import Any

from pensieve.sampling_params import SamplingParams
from pensieve.server.errors import APIError
from pensieve.server.protocol import SamplingFields

Message = dict[str, str]


def render(tokenizer: Any, messages: list[Message], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja raises for e.g. roles that do not alternate as the template wants
        raise APIError(400, f"Could not apply the chat template: {exc}", param="messages") from exc


# A text this many characters per token of the context long is refused once its head of that many
# characters alone has more tokens than the context holds (+ a margin for the word cut at its end):
# a 10 MB body never costs a whole tokenization (20 s on the demo model's tokenizer) to reject.
HEAD_CHARS_PER_TOKEN = 16
_HEAD_MARGIN_TOKENS = 64


def _too_long(num_tokens: str, max_tokens: int) -> APIError:
    return APIError(400, f"This model's maximum context length is {max_tokens} tokens, but the prompt has "
                         f"{num_tokens} tokens (no room left to generate)", param="messages",
                    code="context_length_exceeded")


def encode(tokenizer: Any, text: str, add_special_tokens: bool, max_tokens: int | None = None) -> list[int]:
    """Token ids of `text`; with `max_tokens`, a text far longer than that is refused after its head."""
    if max_tokens is not None and len(text) > HEAD_CHARS_PER_TOKEN * max_tokens:
        head = tokenizer.encode(text[:HEAD_CHARS_PER_TOKEN * max_tokens], add_special_tokens=False)
        if len(head) > max_tokens + _HEAD_MARGIN_TOKENS:
            raise _too_long(f"more than {len(head) - _HEAD_MARGIN_TOKENS}", max_tokens)
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def chat_prompt_ids(tokenizer: Any, messages: list[Message], max_tokens: int | None = None) -> list[int]:
    # The template already writes any BOS it wants, so no special tokens are added on top.
    return encode(tokenizer, render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False,
                  max_tokens=max_tokens)


def _closing_text(tokenizer: Any, history: list[Message], reply_ids: list[int]) -> str:
    """Template text that closes the last assistant turn but is missing from its generated ids.

    E.g. ChatML renders a reply as "...<|im_start|>assistant\\n{reply}<|im_end|>\\n"; the model generated
    "{reply}<|im_end|>", so "\\n" is missing (or all of "<|im_end|>\\n" when it stopped on length).
    """
    reply = history[-1]["content"]
    rendered = render(tokenizer, history, add_generation_prompt=False)
    head = render(tokenizer, history[:-1], add_generation_prompt=True) if len(history) > 1 else ""
    if head and rendered.startswith(head + reply):
        closing = rendered[len(head) + len(reply):]
    elif reply and reply in rendered:
        closing = rendered[rendered.rfind(reply) + len(reply):]
    else:
        return ""
    generated = tokenizer.decode(reply_ids, skip_special_tokens=False)
    for k in range(len(closing), 0, -1):  # the longest part of `closing` the model already wrote
        if generated.endswith(closing[:k]):
            return closing[k:]
    return closing


def append_turn_ids(tokenizer: Any, history: list[Message], history_ids: list[int], reply_ids: list[int],
                    new_messages: list[Message], max_tokens: int | None = None) -> list[int]:
    """The next turn's prompt: `history_ids` kept verbatim plus the tokens of the new turn.

    The new turn is a text delta, render(history + new) minus render(history), so earlier tokens never
    change (even where a template would rewrite earlier turns) and the engine reuses the whole prefix.
    `history` ends with the assistant reply whose generated ids (`reply_ids`) end `history_ids`.
    """
    before = render(tokenizer, history, add_generation_prompt=False)
    after = render(tokenizer, history + new_messages, add_generation_prompt=True)
    if not after.startswith(before):
        # The template rewrites history when a turn is added: render only the new turn on its own,
        # which for turn-by-turn templates (ChatML, Llama) is the same text.
        after = before + render(tokenizer, new_messages, add_generation_prompt=True)
    delta = _closing_text(tokenizer, history, reply_ids) + after[len(before):]
    return history_ids + encode(tokenizer, delta, add_special_tokens=False, max_tokens=max_tokens)


def resolve_max_tokens(prompt_len: int, max_tokens: int | None, max_model_len: int, param: str) -> int | None:
    """Checks the lengths; None means 'up to the end of the context' (SamplingParams' convention)."""
    if prompt_len == 0:
        raise APIError(400, "The prompt is empty", param="prompt", code="invalid_prompt")
    if prompt_len >= max_model_len:
        raise _too_long(str(prompt_len), max_model_len)
    if max_tokens is None:
        return None
    if max_tokens < 1:
        raise APIError(400, f"{param} must be at least 1, got {max_tokens}", param=param, code="invalid_value")
    if prompt_len + max_tokens > max_model_len:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens, but you requested "
                            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
                            f"completion); reduce the prompt or {param}", param=param, code="context_length_exceeded")
    return max_tokens


def sampling_params(req: SamplingFields, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    """Maps the request's sampling fields; SamplingParams' own range checks become 400s."""
    if req.n != 1:
        raise APIError(400, f"Only n=1 is supported, got n={req.n}", param="n", code="unsupported_value")
    fields: dict[str, Any] = {
        "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k, "min_p": req.min_p,
        "seed": req.seed, "presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty,
        "repetition_penalty": req.repetition_penalty,
    }
    given = {k: v for k, v in fields.items() if v is not None}
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(not s for s in stop):
        raise APIError(400, "stop strings must be non-empty", param="stop", code="invalid_value")
    try:
        return SamplingParams(max_tokens=max_tokens, stop=stop, ignore_eos=req.ignore_eos,
                              min_tokens=req.min_tokens, logprobs=logprobs, **given)
    except (ValueError, TypeError) as exc:
        raise APIError(400, str(exc), code="invalid_value") from exc
