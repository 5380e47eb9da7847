"""Multi-turn workloads driven straight through an LLMEngine (shared by the cache and parallelism tests)."""
from __future__ import annotations

import random

from pensieve.engine.llm_engine import LLMEngine
from pensieve.sampling_params import SamplingParams


def run_all(engine: LLMEngine) -> dict:
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def converse(engine: LLMEngine, num_convs: int = 6, num_turns: int = 4, seed: int = 0,
             logprobs: dict | None = None) -> dict:
    """Interleaved multi-turn chats; each turn appends the reply and new user tokens to the history.
    Returns {(conversation, turn): (output ids, cache usage)}; `logprobs`, when given, receives each
    turn's sampled-token logprobs."""
    rng = random.Random(seed)
    vocab = engine.hf_config.vocab_size
    histories = {f"conv{i}": [rng.randrange(10, vocab) for _ in range(rng.randrange(3, 12))] for i in range(num_convs)}
    results = {}
    for turn in range(num_turns):
        for cid, hist in histories.items():
            params = SamplingParams(temperature=0.0, max_tokens=rng.randrange(3, 8), ignore_eos=True,
                                    logprobs=0 if logprobs is not None else None)
            engine.add_request(f"{cid}-t{turn}", hist, params, conversation_id=cid)
        done = run_all(engine)
        for cid in histories:
            out = done[f"{cid}-t{turn}"]
            results[(cid, turn)] = (out.outputs[0].token_ids, out.cache)
            if logprobs is not None:
                logprobs[(cid, turn)] = [lp for lp, _ in out.outputs[0].logprobs]
            histories[cid] = hist_next = out.prompt_token_ids + out.outputs[0].token_ids
            histories[cid] = hist_next + [rng.randrange(10, vocab) for _ in range(rng.randrange(1, 10))]
    return results
