"""CPU decode throughput of the engine beside HF transformers' `generate`, on the demo model (or --model).

Both decode the same B prompts greedily for N tokens (EOS ignored) in float32; the rate counted is decode
only: generated tokens after the first, over the time from the first token to the last.
    OMP_NUM_THREADS=2 python benchmarks/cpu_decode.py --batch 1,8 --tokens 64
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pensieve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig  # noqa: E402
from pensieve.engine.llm_engine import LLMEngine  # noqa: E402
from pensieve.model.gguf import pretrained_args  # noqa: E402
from pensieve.sampling_params import SamplingParams  # noqa: E402

PROMPT = "Tell me a long story about a lighthouse keeper and the sea."


def prompts(tokenizer, batch: int) -> list[list[int]]:
    # distinct prompts of equal length: no prefix reuse between them, one shape for HF's batch
    base = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)
    return [[tokenizer.encode(str(i), add_special_tokens=False)[0]] + list(base) for i in range(batch)]


def ours(engine: LLMEngine, ids: list[list[int]], tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    for i, p in enumerate(ids):
        engine.add_request(f"r{time.monotonic_ns()}-{i}", p, params, stream=True)
    first = None
    while engine.has_unfinished():
        outs = engine.step()
        if first is None and outs and all(len(o.outputs[0].token_ids) >= 1 for o in outs):
            first = time.perf_counter()
    return len(ids) * (tokens - 1) / (time.perf_counter() - first)


def transformers_rate(model, ids: list[list[int]], tokens: int, pad: int) -> float:
    x = torch.tensor(ids)
    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(x, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=pad)
        t1 = time.perf_counter()
        model.generate(x, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=pad)
        t2 = time.perf_counter()
    return len(ids) * (tokens - 1) / ((t2 - t1) - (t1 - t0))  # the whole run less its prefill + first token


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory or .gguf (default: the demo model)")
    ap.add_argument("--batch", default="1,8", help="comma list of batch sizes")
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated per sequence")
    ap.add_argument("--repeats", type=int, default=3, help="runs per batch size, each system in turn (best kept)")
    ap.add_argument("--no-transformers", action="store_true", help="skip the HF transformers column")
    args = ap.parse_args()
    if args.model is None:
        from pensieve.demo import demo_gguf_path

        args.model = str(demo_gguf_path())
    engine = LLMEngine(EngineConfig(
        model=ModelConfig(model=args.model, dtype="float32", max_model_len=1024),
        cache=CacheConfig(num_gpu_blocks=512, num_cpu_blocks=0, cache_mode="stateless"),
        scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=4096), device="cpu"))
    hf = None
    if not args.no_transformers:
        from transformers import AutoModelForCausalLM

        name, kwargs = pretrained_args(args.model)
        hf = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, **kwargs).eval()
    pad = engine.tokenizer.eos_token_id or 0
    print(f"threads={torch.get_num_threads()} model={args.model} tokens={args.tokens}")
    print("| batch | pensieve tok/s | transformers tok/s |")
    print("|---:|---:|---:|")
    for batch in (int(b) for b in args.batch.split(",")):
        ids = prompts(engine.tokenizer, batch)
        ours(engine, ids, 4)  # warm-up
        mine, theirs = 0.0, None
        for _ in range(args.repeats):  # interleaved, best of each: a shared machine's load hits both alike
            mine = max(mine, ours(engine, ids, args.tokens))
            if hf is not None:
                theirs = max(theirs or 0.0, transformers_rate(hf, ids, args.tokens, pad))
        print(f"| {batch} | {mine:.1f} | {'-' if theirs is None else f'{theirs:.1f}'} |", flush=True)


if __name__ == "__main__":
    main()
