"""Interleaved multi-turn conversations of the three kinds a Pensieve conversation continues by.

- history: chat completions resending the whole history (any OpenAI client; routed by its prefix)
- response: the Responses API, each turn naming `previous_response_id` (state on the replica)
- conversation: chat completions naming a `conversation_id` (Pensieve's extension) with the history

The response and conversation kinds name their session in an `X-Session-ID` header from the first turn, as
docs/REPLICAS.md asks clients to. Replies are greedy, so two deployments serving the same conversations
must give the same answers; the cached share of the later turns tells how often a turn found its history.
"""
from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

KINDS = ("history", "response", "conversation")
SESSION_HEADER = "X-Session-ID"

_WORDS = ("the river memory quiet engine winter garden signal copper lantern orbit harbor meadow cipher "
          "paper thunder valley mirror circuit ember violet canyon glacier pocket rhythm saddle timber "
          "velvet wander anchor beacon cobalt drift falcon gravel hollow island jasmine kettle linen marble "
          "nectar oyster pepper quartz raven silver tunnel umber walnut yonder zephyr amber bridge cedar "
          "delta fable grove harvest ivory juniper").split()


@dataclass(frozen=True)
class WorkloadConfig:
    conversations: int = 30          # per kind
    turns: int = 3
    max_tokens: int = 6
    concurrency: int = 8             # turns in flight at once, across all conversations
    first_words: int = 60            # words of a conversation's first user message
    next_words: int = 12             # words of each later user message
    think_s: tuple[float, float] = (0.2, 0.6)   # a user reads the reply before the next turn (uniform)
    seed: int = 0
    session_header: bool = True      # send X-Session-ID on the response and conversation kinds


@dataclass(frozen=True)
class TurnRecord:
    kind: str
    conversation: int
    turn: int
    status: int                      # HTTP status; 0 when no response came (connection failed)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    replica: str | None = None       # x-pensieve-replica of the answer
    text: str = ""
    error: str | None = None
    started: float = 0.0             # time.monotonic() when the request was sent and when its answer came
    finished: float = 0.0


def _message(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n)) + "."


async def _one_conversation(client: Any, model: str, kind: str, index: int, cfg: WorkloadConfig,
                            slots: asyncio.Semaphore, out: list[TurnRecord],
                            on_turn: Callable[[TurnRecord], None] | None) -> None:
    import openai

    rng = random.Random(f"{cfg.seed}-{kind}-{index}")
    session = f"{kind}-{cfg.seed}-{index}"
    headers = {SESSION_HEADER: session} if cfg.session_header and kind != "history" else {}
    history: list[dict[str, str]] = []
    previous: str | None = None
    for turn in range(cfg.turns):
        user = _message(rng, cfg.first_words if turn == 0 else cfg.next_words)
        await asyncio.sleep(rng.uniform(*cfg.think_s) if turn else rng.random() * 0.05)
        for attempt in range(2):                   # a client retries a failed turn once
            async with slots:
                started = time.monotonic()
                try:
                    if kind == "response":
                        kw = {"previous_response_id": previous} if previous else {}
                        raw = await client.responses.with_raw_response.create(
                            model=model, input=user, max_output_tokens=cfg.max_tokens, temperature=0,
                            extra_headers=headers, **kw)
                        resp = raw.parse()
                        text, usage = resp.output_text, resp.usage
                        prompt, cached = usage.input_tokens, usage.input_tokens_details.cached_tokens
                        previous = resp.id
                    else:
                        extra = {"ignore_eos": True}
                        if kind == "conversation":
                            extra["conversation_id"] = session
                        raw = await client.chat.completions.with_raw_response.create(
                            model=model, messages=[*history, {"role": "user", "content": user}],
                            max_tokens=cfg.max_tokens, temperature=0, extra_body=extra, extra_headers=headers)
                        resp = raw.parse()
                        text, usage = resp.choices[0].message.content or "", resp.usage
                        prompt, cached = usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens
                    rec = TurnRecord(kind, index, turn, raw.status_code, prompt, cached,
                                     raw.headers.get("x-pensieve-replica"), text,
                                     started=started, finished=time.monotonic())
                except openai.APIStatusError as exc:
                    rec = TurnRecord(kind, index, turn, exc.status_code, error=str(exc)[:300], started=started,
                                     finished=time.monotonic())
                except openai.APIConnectionError as exc:
                    rec = TurnRecord(kind, index, turn, 0, error=str(exc)[:300], started=started,
                                     finished=time.monotonic())
            out.append(rec)
            if on_turn is not None:
                on_turn(rec)
            if rec.error is None or rec.status == 404:
                break
        if rec.error is not None:
            return                                  # gave up (or its stored chain is gone): the conversation ends
        history += [{"role": "user", "content": user}, {"role": "assistant", "content": rec.text}]


async def run_workload(base_url: str, cfg: WorkloadConfig, kinds: Sequence[str] = KINDS, model: str | None = None,
                       api_key: str = "none", on_turn: Callable[[TurnRecord], None] | None = None,
                       timeout_s: float = 120.0) -> list[TurnRecord]:
    """Runs cfg.conversations conversations of each kind against `base_url` (a server or a router)."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url.rstrip("/") + "/v1", api_key=api_key, max_retries=0,
                                timeout=timeout_s)
    try:
        if model is None:
            model = (await client.models.list()).data[0].id
        slots = asyncio.Semaphore(cfg.concurrency)
        out: list[TurnRecord] = []
        await asyncio.gather(*[_one_conversation(client, model, kind, i, cfg, slots, out, on_turn)
                               for i in range(cfg.conversations) for kind in kinds])
        return sorted(out, key=lambda r: (r.kind, r.conversation, r.turn))
    finally:
        await client.close()


def cached_share(records: Sequence[TurnRecord], kind: str) -> float:
    """Cached prompt tokens over all prompt tokens of the later turns (the first turn has nothing to find)."""
    later = [r for r in records if r.kind == kind and r.turn > 0 and r.error is None]
    prompt = sum(r.prompt_tokens for r in later)
    return sum(r.cached_tokens for r in later) / prompt if prompt else 0.0


def answers(records: Sequence[TurnRecord]) -> dict[tuple[str, int, int], str]:
    return {(r.kind, r.conversation, r.turn): r.text for r in records if r.error is None}


def served_by(rec: TurnRecord) -> str | None:
    """The replica that answered (a forwarded turn names it first, then the replica that forwarded it)."""
    return rec.replica.split(",")[0].strip() if rec.replica else None


def summary(records: Sequence[TurnRecord], kinds: Sequence[str] = KINDS) -> dict[str, dict[str, Any]]:
    """Per kind: the later turns' cached share, the turns answered, the failed ones by status, the replicas
    that answered and the share of the turns the busiest one answered (1/N is even, 1.0 one replica)."""
    out: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        rows = [r for r in records if r.kind == kind]
        failed: dict[str, int] = {}
        served: dict[str, int] = {}
        for r in rows:
            if r.error is not None:
                failed[str(r.status)] = failed.get(str(r.status), 0) + 1
            elif (name := served_by(r)) is not None:
                served[name] = served.get(name, 0) + 1
        answered = len(rows) - sum(failed.values())
        out[kind] = {"cached_share": round(cached_share(records, kind), 4), "turns": answered, "failed": failed,
                     "replicas": sorted(served),
                     "busiest_replica_share": round(max(served.values()) / answered, 3) if served else None}
    return out
