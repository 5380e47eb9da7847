"""Incremental detokenization and stop checking, one instance of each per running request.

`IncrementalDetokenizer` turns each step's new token ids into the new text only, decoding a small
window of ids per step rather than the whole output:
  * a byte-level BPE token can end in the middle of a UTF-8 character; such text decodes with a
    trailing U+FFFD and is held back until a later token completes the character;
  * SentencePiece-style decoders drop the leading space of the *first* token of whatever they
    decode, so each window starts a few tokens earlier (`prefix_offset`) and only the text past the
    already-emitted part (`read_offset`) is new.

`StopChecker` decides after each step whether the request is finished and, for streaming, how much
of the text is safe to send while a stop string might still be forming.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from pensieve.sampling_params import SamplingParams

# Prompt tokens to decode before the first output token, so its leading space comes out right.
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    """What the detokenizer needs: `tokenizers.Tokenizer` and HF tokenizers both provide it."""

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


def _backend(tokenizer: object) -> Decoder:
    # A transformers fast tokenizer wraps a `tokenizers.Tokenizer`; calling it directly skips the
    # Python-side overhead and `clean_up_tokenization_spaces`, which would rewrite earlier text
    # (" ." -> ".") depending on the window and so break the delta invariant.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend if backend is not None else tokenizer  # type: ignore[return-value]


class IncrementalDetokenizer:
    """Emits the text delta of each step's tokens; `.text` is the cumulative output text."""

    def __init__(self, tokenizer: object, prompt_token_ids: list[int], skip_special_tokens: bool = True) -> None:
        self._decoder = _backend(tokenizer)
        self._skip_special = skip_special_tokens
        # Keep only the prompt tail that the first windows need, not the whole prompt.
        self._ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0                 # window start: context for leading spaces
        self._read_offset = len(self._ids)      # ids before this have been emitted (or are prompt)
        self._prefix_text: str | None = None    # decode(ids[prefix_offset:read_offset]), cached
        self._text = ""
        self._num_output_ids = 0

    @property
    def text(self) -> str:
        return self._text

    @property
    def num_output_tokens(self) -> int:
        return self._num_output_ids

    def append(self, new_ids: list[int]) -> str:
        """Adds this step's ids; returns the newly completed text ('' while a character is partial)."""
        self._ids.extend(new_ids)
        self._num_output_ids += len(new_ids)
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        window_text = self._decode(self._ids[self._prefix_offset :])
        if len(window_text) <= len(self._prefix_text) or window_text.endswith(_REPLACEMENT):
            return ""  # nothing new yet, or it ends in an incomplete character
        delta = window_text[len(self._prefix_text) :]
        self._advance()
        self._text += delta
        return delta

    def flush(self) -> str:
        """At the end of a request: emits held-back text (an incomplete character as U+FFFD)."""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        window_text = self._decode(self._ids[self._prefix_offset :])
        delta = window_text[len(self._prefix_text) :]
        self._advance()
        self._text += delta
        return delta

    def _advance(self) -> None:
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = None
        # Drop ids no window will look at again, so memory stays bounded by the window.
        if self._prefix_offset > 0:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self._decoder.decode(ids, skip_special_tokens=self._skip_special) if ids else ""


@dataclass(frozen=True)
class StopResult:
    finish_reason: str                 # "stop" | "length"
    stop_reason: int | str | None      # stop string or stop token id; None for EOS and "length"
    truncate_to: int | None = None     # cut the text to text[:truncate_to] (stop string matched)


class StopChecker:
    """Per-request stop conditions, checked once per step after detokenization.

    Precedence: EOS, stop token ids and stop strings (only once `min_tokens` are out) come before
    the length limits, so a stop token on the last allowed step reports "stop". Stop strings are
    searched only in text not searched before (plus an overlap), so each step costs O(new text).
    """

    def __init__(self, params: SamplingParams, eos_token_ids: set[int], max_model_len: int) -> None:
        self._params = params
        self._eos = frozenset() if params.ignore_eos else frozenset(eos_token_ids)
        self._stop_ids = frozenset(params.stop_token_ids)
        self._stops = [s for s in params.stop if s]
        self._max_stop_len = max((len(s) for s in self._stops), default=0)
        self._max_model_len = max_model_len
        self._searched_len = 0  # text[:this] has been searched for stop strings

    def check(self, num_output_tokens: int, last_token: int, text: str, num_prompt_tokens: int) -> StopResult | None:
        """After a step that sampled `last_token`, the request's `num_output_tokens`-th output token."""
        p = self._params
        n = num_output_tokens
        if n and n >= p.min_tokens:
            last = last_token
            if last in self._eos:
                return StopResult("stop", None)
            if last in self._stop_ids:
                return StopResult("stop", last)
            hit = self._find_stop_string(text)
            if hit is not None:
                return hit
        else:
            # Stop strings that complete before min_tokens do not count (as in vLLM).
            self._searched_len = len(text)
        if self.length_reached(n, num_prompt_tokens):
            return StopResult("length", None)
        return None

    def length_reached(self, num_output_tokens: int, num_prompt_tokens: int) -> bool:
        """max_tokens or the model's context is used up: the request stops whatever the token is."""
        p = self._params
        return ((p.max_tokens is not None and num_output_tokens >= p.max_tokens)
                or num_prompt_tokens + num_output_tokens >= self._max_model_len)

    def safe_text_len(self, text: str) -> int:
        """Length of the prefix of `text` that can be streamed now.

        Holds back the longest suffix that is a proper prefix of some stop string, since the next
        tokens may complete it and it must then vanish from the output. With
        `include_stop_str_in_output` the stop string is emitted either way, so nothing is held.
        """
        if not self._stops or self._params.include_stop_str_in_output:
            return len(text)
        hold = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(text)), hold, -1):
                if text.endswith(stop[:k]):
                    hold = k
                    break
        return len(text) - hold

    def _find_stop_string(self, text: str) -> StopResult | None:
        if not self._stops:
            return None
        # A match may straddle the old/new boundary: back up by (longest stop - 1) characters.
        start = max(0, self._searched_len - self._max_stop_len + 1)
        self._searched_len = len(text)
        best: tuple[int, str] | None = None
        for stop in self._stops:
            at = text.find(stop, start)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return None
        at, stop = best
        cut = at + len(stop) if self._params.include_stop_str_in_output else at
        return StopResult("stop", stop, cut)
