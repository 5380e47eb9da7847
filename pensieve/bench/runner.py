"""The async driver: plays a schedule of conversations against one backend and records every turn."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from pensieve.bench.backends import Backend
from pensieve.bench.datasets import Encode
from pensieve.bench.records import TurnRequest, TurnResult
from pensieve.bench.workload import ScheduledConversation, append_turn_prompt


@dataclass
class RunResult:
    records: list[TurnResult]
    planned_turns: int
    truncated_turns: int                 # not sent: the time limit passed, a turn failed, or the context was full
    wall_s: float
    stats_before: dict[str, float] | None = None
    stats_after: dict[str, float] | None = None
    notes: list[str] = field(default_factory=list)
    # (seconds since the run started, the backend's gauges then): running batch and pool occupancy
    samples: list[tuple[float, dict[str, float]]] = field(default_factory=list)


async def run_schedule(backend: Backend, schedule: Sequence[ScheduledConversation], *, encode: Encode | None = None,
                       time_limit: float | None = None, end_conversations: bool = False,
                       progress: bool = True, desc: str = "", sample_interval: float | None = None) -> RunResult:
    """Send each conversation's turns: turn 0 at its arrival time, turn i+1 after reply i plus its think time.
    Turn prompts append token ids (history + exact reply ids + the new user ids); the chat messages of the
    same turn ride along for the chat API. After `time_limit` seconds no new turn starts (a conversation whose
    next turn would start after it stops at once rather than sleeping out its think time). Every
    `sample_interval` seconds the backend's gauges (running batch, pool occupancy) are sampled."""
    planned = sum(len(sc.conversation.turns) for sc in schedule)
    records: list[TurnResult] = []
    truncated = 0
    notes: list[str] = []
    max_len = backend.max_model_len
    tok = backend.tokenizer
    stats_before = await backend.stats()
    t0 = time.perf_counter()
    deadline = None if time_limit is None else t0 + time_limit
    bar = tqdm(total=planned, desc=desc or backend.name, unit="turn", disable=not progress, leave=False)

    async def drive(sc: ScheduledConversation) -> None:
        nonlocal truncated
        conv = sc.conversation
        await asyncio.sleep(max(0.0, t0 + sc.start_time - time.perf_counter()))
        history: list[int] = []
        messages: list[dict[str, str]] = []
        if conv.system is not None:
            messages.append({"role": "system", "content": conv.system})
            if encode is not None:
                history = list(encode(conv.system))
        n = len(conv.turns)
        for i, turn in enumerate(conv.turns):
            if deadline is not None and time.perf_counter() >= deadline:
                truncated += n - i
                bar.update(n - i)
                break
            user_ids = turn.user_ids(encode)
            prompt = append_turn_prompt(history, user_ids)
            if max_len is not None and len(prompt) + turn.reply_len > max_len:
                notes.append(f"{conv.conv_id}: turn {i} would exceed max_model_len {max_len}; later turns dropped")
                truncated += n - i
                bar.update(n - i)
                break
            user_text = turn.user_text if turn.user_text is not None else (
                tok.decode(user_ids) if tok is not None else "")
            messages.append({"role": "user", "content": user_text})
            req = TurnRequest(request_id=f"{conv.conv_id}-t{i}", conversation_id=conv.conv_id, turn_index=i,
                              prompt_token_ids=tuple(prompt), max_tokens=turn.reply_len, messages=tuple(messages))
            res = await backend.submit(req)
            res.send_time -= t0
            if res.first_token_time is not None:
                res.first_token_time -= t0
            if res.finish_time is not None:
                res.finish_time -= t0
            records.append(res)
            bar.update(1)
            if not res.ok:
                notes.append(f"{conv.conv_id}: turn {i} failed ({res.error}); later turns dropped")
                truncated += n - i - 1
                bar.update(n - i - 1)
                break
            history = prompt + res.output_token_ids
            messages.append({"role": "assistant", "content": res.output_text})
            if i + 1 < n:
                think = sc.think_times[i]
                if deadline is not None and time.perf_counter() + think >= deadline:
                    truncated += n - i - 1      # its next turn would start past the limit: not sent
                    bar.update(n - i - 1)
                    break
                await asyncio.sleep(think)
        if end_conversations:
            await backend.end_conversation(conv.conv_id)

    samples: list[tuple[float, dict[str, float]]] = []
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            gauges = await backend.sample()
            if gauges is None:
                return                   # the backend has no gauges (transformers)
            if gauges:                   # {}: a sample missed (the next may answer)
                samples.append((time.perf_counter() - t0, gauges))
            try:
                await asyncio.wait_for(done.wait(), sample_interval)
            except asyncio.TimeoutError:
                pass

    sampler = asyncio.create_task(sample()) if sample_interval else None
    try:
        await asyncio.gather(*(drive(sc) for sc in schedule))
    finally:
        bar.close()
        done.set()
        if sampler is not None:
            await sampler
    wall = time.perf_counter() - t0
    stats_after = await backend.stats()
    records.sort(key=lambda r: (r.send_time, r.request_id))
    return RunResult(records=records, planned_turns=planned, truncated_turns=truncated, wall_s=wall,
                     stats_before=stats_before, stats_after=stats_after, notes=notes, samples=samples)


async def warm_up(backend: Backend, vocab_ids: Sequence[int], prompt_len: int = 32, max_tokens: int = 8) -> None:
    """One short request so that compilation, CUDA graph capture and allocator growth happen before timing."""
    ids = tuple(int(vocab_ids[(7 * i + 3) % len(vocab_ids)]) for i in range(prompt_len))
    req = TurnRequest(request_id="bench-warmup", conversation_id="bench-warmup", turn_index=0, prompt_token_ids=ids,
                      max_tokens=max_tokens, messages=({"role": "user", "content": "Hello"},))
    res = await backend.submit(req)
    if res.error is not None:
        raise RuntimeError(f"{backend.name}: warm-up request failed: {res.error}")
    await backend.end_conversation("bench-warmup")


def describe_run(run: RunResult) -> dict[str, Any]:
    return {"planned_turns": run.planned_turns, "sent_turns": len(run.records),
            "truncated_turns": run.truncated_turns, "wall_s": run.wall_s, "notes": run.notes[:50]}
