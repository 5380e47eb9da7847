"""GPU benchmark of the engine: prefill and decode against the hardware floors, HF transformers
side by side, and the CPU tier's swap-in bandwidth and overlap with the forward.

Run on the GPU machine (random-weight checkpoints of real shapes, built here, loaded through the
real loader):
    python benchmarks/engine_bench.py --models llama-3.1-8b,llama-2-13b-gqa10 --out benchmarks/results/engine
Writes engine.json and engine.md to --out and prints the table last.

Tensor parallelism (--tensor-parallel-size N, one GPU per rank): the floors are per GPU (a decode step reads
rank 0's weight shard, about weight bytes / N, at 3.0 TB/s; a prefill has N x the bf16 peak), decode rows add
the step message to the other ranks (EngineStats.rank_message_seconds) and, with --profile, the all-reduce's
share of a step from a profile of rank 0, and swap-ins are timed as copy-only steps every rank runs at once
(rank 0's link; the aggregate is N times it). What needs one process to hold the whole model (a decode graph
replayed alone, the swap overlap rounds, HF transformers) is skipped under TP with the reason in engine.md and
in engine.json's "skipped". The harness on a CPU, ranks over gloo (the tiny random Llama):
    python benchmarks/engine_bench.py --models tiny --device cpu --dtype float32 -tp 2 --decode-batches 1,4 \
        --decode-ctx 32 --prefill 64x4 --swap-tokens 64,128 --gpu-kv-gb 0.02 --cpu-kv-gb 0.02 --profile --out /tmp/eb
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pensieve.bench.backends import blocks_for_budget, kv_bytes_per_token  # noqa: E402
from pensieve.cache.manager import TransferPlan  # noqa: E402
from pensieve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig  # noqa: E402
from pensieve.engine import profiling  # noqa: E402
from pensieve.engine.batch import StepBatch, to_metadata  # noqa: E402
from pensieve.engine.llm_engine import LLMEngine  # noqa: E402
from pensieve.engine.model_runner import StepInput  # noqa: E402
from pensieve.kernels import SMALL_BATCH_MAX_ROWS, small_batch_linear_enabled  # noqa: E402
from pensieve.model.loader import iter_weights  # noqa: E402
from pensieve.model.random_checkpoint import make_random_checkpoint  # noqa: E402
from pensieve.model.tiny_llama import tiny_llama_path  # noqa: E402
from pensieve.sampling_params import SamplingParams  # noqa: E402

# The H100's measured floors (docs/BENCHMARKS.md quotes them): a decode step cannot beat weight bytes / HBM_TBPS,
# a prefill 2 x params x tokens / PEAK_TFLOPS, a swap-in bytes / PCIE_GBPS. Each is one GPU's: under tensor
# parallelism every GPU reads its own weight shard and copies over its own link, and N GPUs have N x the peak.
PEAK_TFLOPS = 793.0     # bf16 GEMM peak
HBM_TBPS = 3.0          # device copy bandwidth
PCIE_GBPS = 54.0        # pinned host->device

# Why a section does not run under tensor parallelism (engine.json "skipped", engine.md notes).
GRAPH_ALONE_UNDER_TP = ("a decode graph holds the step's all-reduces: replayed alone from this process (rank 0) "
                        "it would wait forever for the other ranks' graphs; the step rows include the forward")
SWAP_OVERLAP_UNDER_TP = ("the overlap rounds and copy variants drive rank 0's runner directly (its copy streams, "
                         "the copy kernel's programs, a forward whose all-reduces need every rank); the swap_ranks "
                         "rows time copy-only steps that every rank runs")
HF_UNDER_TP = "HF transformers' generate_batch runs the model on one GPU"


class Skips:
    """The sections this run cannot measure, each with its reason: printed once, written to engine.json/md."""

    def __init__(self) -> None:
        self.reasons: dict[str, str] = {}

    def add(self, section: str, reason: str) -> None:
        if section not in self.reasons:
            self.reasons[section] = reason
            print(f"skipped {section}: {reason}", flush=True)


def sync() -> None:
    """Wait for this process's GPU work (rank 0's under TP: the other ranks meet it in every step's collectives)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def build(size: str, root: Path, device: str) -> Path:
    if size == "tiny":  # the tiny random Llama: the harness on a CPU
        return tiny_llama_path()
    arch = "opt" if size.startswith("opt") else "llama"
    path = root / size
    if not (path / "config.json").exists():
        t = time.time()
        make_random_checkpoint(path, arch, size=size, dtype=torch.bfloat16, seed=0, device=device)
        print(f"built {size} in {time.time() - t:.0f}s", flush=True)
    return path


def checkpoint_params(path: Path) -> int:
    """Parameters of the whole model, read from the checkpoint's tensor headers (no weights loaded)."""
    return sum(math.prod(w.get_shape() if hasattr(w, "get_shape") else w.shape) for _, w in iter_weights(path))


def engine_for(path: Path, mode: str = "tiered", *, device: str = "cuda", dtype: str = "bfloat16",
               tensor_parallel_size: int = 1, **kw) -> LLMEngine:
    cache_kw = dict(num_gpu_blocks=kw.pop("num_gpu_blocks", None), num_cpu_blocks=kw.pop("num_cpu_blocks", 4096),
                    gpu_memory_utilization=kw.pop("gpu_memory_utilization", 0.85))
    return LLMEngine(EngineConfig(
        model=ModelConfig(model=str(path), dtype=dtype, max_model_len=kw.pop("max_model_len", 8192)),
        cache=CacheConfig(cache_mode=mode, **cache_kw),
        scheduler=SchedulerConfig(max_num_seqs=kw.pop("max_num_seqs", 128),
                                  max_num_batched_tokens=kw.pop("max_num_batched_tokens", 8192)),
        device=device, enforce_eager=kw.pop("enforce_eager", False), tensor_parallel_size=tensor_parallel_size))


def drain(engine: LLMEngine) -> None:
    while engine.has_unfinished():
        engine.step()


def bench_prefill(engine: LLMEngine, tokens: int, per_seq: int, num_params: int, cfg) -> dict:
    """One step prefilling `tokens` tokens in sequences of `per_seq`, against the bf16 peak of every GPU."""
    tp = engine.config.tensor_parallel_size
    greedy = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    per_seq = min(per_seq, engine.max_model_len - 1)   # Llama-2's 4096-token context: 4095 + the one to generate
    times = []
    for rep in range(4):
        for i in range(tokens // per_seq):
            ids = torch.randint(10, cfg.vocab_size - 10, (per_seq,)).tolist()
            engine.add_request(f"p{rep}-{i}", ids, greedy)
        sync()
        t = time.perf_counter()
        engine.step()
        sync()
        times.append(time.perf_counter() - t)
        drain(engine)
    dt = sorted(times[1:])[len(times[1:]) // 2]
    n = (tokens // per_seq) * per_seq
    hd = cfg.hidden_size // cfg.num_attention_heads
    attn = 2 * 2 * cfg.num_hidden_layers * cfg.num_attention_heads * hd * (per_seq * per_seq / 2) * (tokens // per_seq)
    flops = 2 * num_params * n + attn
    return dict(kind="prefill", tokens=n, seq_len=per_seq, ms=dt * 1e3, tokens_per_s=n / dt,
                tflops=flops / dt / 1e12, peak_tflops=PEAK_TFLOPS * tp, frac_peak=flops / dt / 1e12 / (PEAK_TFLOPS * tp))


KERNEL_KINDS = (  # kernel (or host op) name fragment -> kind, first match wins
    ("small_batch_linear", "linear (Triton)"), ("gemm", "linear (cuBLAS)"), ("gemv", "linear (cuBLAS)"),
    ("nvjet", "linear (cuBLAS)"), ("cutlass", "linear (cuBLAS)"), ("paged_attention", "attention"),
    ("merge_splits", "attention"), ("store_kv", "kv store"), ("rms_norm", "norm"), ("rotary", "rotary"),
    ("silu", "silu_and_mul"), ("embedding", "embedding"), ("index", "embedding"),
    # tensor parallelism: NCCL kernels on GPUs, gloo's work on the CPU
    ("allreduce", "all-reduce"), ("all_reduce", "all-reduce"), ("nccl", "other collectives"),
    ("gloo:", "other collectives"),
)
COLLECTIVES = ("all-reduce", "other collectives")


def host_op_times(prof: torch.profiler.profile, calls: int) -> list[tuple[str, float, float]]:
    """kernel_times for a CPU run: (op, calls per step, host microseconds per step), longest first. Ops
    count their self time; gloo's collectives run on its own thread and count their whole span (a wait
    for a slower rank included)."""
    rows = []
    for e in prof.key_averages():
        us = e.cpu_time_total if e.key.startswith("gloo:") else e.self_cpu_time_total
        if us > 0:
            rows.append((e.key, e.count / calls, us / calls))
    return sorted(rows, key=lambda r: -r[2])


def write_profile(rows: list[tuple[str, float, float]], path: Path, title: str, unit: str) -> dict[str, float]:
    """The profile's table by kind and by kernel into `path` (the head printed); returns us per kind."""
    total = sum(r[2] for r in rows) or 1.0
    kinds: dict[str, float] = {}
    for name, _, us in rows:
        kind = next((k for frag, k in KERNEL_KINDS if frag in name.lower()), "other")
        kinds[kind] = kinds.get(kind, 0.0) + us
    lines = [f"# Decode profile, {title}", "", f"{unit}: {total:.0f} us", "",
             "| kind | us | share |", "|---|---|---|"]
    lines += [f"| {k} | {us:.0f} | {us / total:.0%} |" for k, us in sorted(kinds.items(), key=lambda kv: -kv[1])]
    lines += ["", "| kernel | launches | us | share |", "|---|---|---|---|"]
    lines += [f"| {name[:90]} | {n:.0f} | {us:.0f} | {us / total:.1%} |" for name, n, us in rows[:30]]
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:14]), flush=True)
    return kinds


def profile_graph(graph, path: Path, title: str, replays: int = 5) -> None:
    """Per-kernel GPU time of one replay of a decode graph (torch.profiler / CUPTI), by kernel and by kind."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        sync()
    write_profile(profiling.kernel_times(prof, replays), path, f"graph replay, {title}", "kernel time per replay")


def profile_steps(engine: LLMEngine, path: Path, title: str, steps: int = 10) -> dict:
    """What `steps` decode steps of the engine ran on rank 0 (GPU kernels; on a CPU, host ops), by kind, and the
    collectives' share of a step. An NCCL kernel's time includes waiting for the slowest rank to arrive, so
    the all-reduce's share is an upper bound on what the links cost."""
    cuda = engine.device.type == "cuda"
    # GPU kernels alone on CUDA: host ops would count their kernels' time again
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            engine.step()
        sync()
        step_ms = (time.perf_counter() - t) / steps * 1e3
    rows = profiling.kernel_times(prof, steps) if cuda else host_op_times(prof, steps)
    kinds = write_profile(rows, path, f"{steps} engine steps on rank 0, {title}",
                          "kernel time per step" if cuda else "host op time per step")
    allreduce_ms = kinds.get("all-reduce", 0.0) / 1e3
    collectives_ms = sum(kinds.get(k, 0.0) for k in COLLECTIVES) / 1e3
    out = dict(profiled_step_ms=step_ms, allreduce_ms=allreduce_ms, allreduce_share_step=allreduce_ms / step_ms,
               collectives_ms=collectives_ms, collectives_share_step=collectives_ms / step_ms)
    if cuda:
        out["allreduce_share_kernels"] = allreduce_ms * 1e3 / (sum(kinds.values()) or 1.0)
    return out


def bench_decode(engine: LLMEngine, batch: int, ctx: int, weight_bytes: int, kv_bytes_per_token: int, cfg,
                 skips: Skips, profile_dir: Path | None = None) -> dict:
    """Decode steps at `batch` x `ctx` against the weight-read floor; `weight_bytes` and `kv_bytes_per_token`
    are one GPU's (rank 0's shard under TP)."""
    params = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"d{batch}-{i}", torch.randint(10, cfg.vocab_size - 10, (ctx,)).tolist(), params,
                           stream=True)   # an output per step, as when serving streams
    while any(s.pending and s.num_pending > 1 for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # prefill everything first
    steps = 20
    # Sequences decoding together: fewer than `batch` when their KV does not fit the GPU pool (Llama-2-13B's
    # 40 KV heads at 64 x 1k need 54 GB), and then the row is no measure of a batch-`batch` step.
    running = len(engine.scheduler.running)

    def timed() -> tuple[float, float]:
        """Seconds per step, and of them the seconds rank 0 spent sending the step to the other ranks."""
        for _ in range(3):
            engine.step()
        sync()
        before = engine.stats()
        t = time.perf_counter()
        for _ in range(steps):
            engine.step()
        sync()
        dt = (time.perf_counter() - t) / steps
        return dt, (engine.stats().rank_message_seconds - before.rank_message_seconds) / steps

    # the same decode steps with and without async scheduling (host work beside the GPU's step)
    overlap = engine.async_scheduling
    engine.async_scheduling = False
    dt_sync, _ = timed()
    engine.async_scheduling = overlap
    dt, message_s = timed()
    running = min(running, len(engine.scheduler.running))
    graph_ms, profiled = None, {}
    tp = engine.config.tensor_parallel_size
    size = engine.runner.graph_size(batch) if engine.device.type == "cuda" else None
    if size is not None and tp > 1:
        skips.add("decode graph replayed alone", GRAPH_ALONE_UNDER_TP)
    elif size is not None:  # the forward alone: replays the last step's inputs (rewrites the same KV)
        graph = engine.runner.graphs[size]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        graph.replay()
        start.record()
        for _ in range(steps):
            graph.replay()
        end.record()
        sync()
        graph_ms = start.elapsed_time(end) / steps
        if profile_dir is not None:
            profile_graph(graph, profile_dir / f"decode_profile_b{batch}_ctx{ctx}.md", f"batch {batch}, ctx {ctx}")
    if profile_dir is not None and graph_ms is None:   # under TP (or without graphs): real engine steps
        profiled = profile_steps(engine, profile_dir / f"decode_profile_b{batch}_ctx{ctx}.md",
                                 f"batch {batch}, ctx {ctx}, tensor parallel {tp}")
    drain(engine)
    floor = weight_bytes / (HBM_TBPS * 1e12)
    kv_floor = (weight_bytes + batch * (ctx + 32) * kv_bytes_per_token) / (HBM_TBPS * 1e12)
    row = dict(kind="decode", batch=batch, ctx=ctx, running=running, ms=dt * 1e3, weight_floor_ms=floor * 1e3,
               x_weight_floor=dt / floor, async_scheduling=overlap, ms_sync=dt_sync * 1e3,
               x_weight_floor_sync=dt_sync / floor, x_bytes_floor=dt / kv_floor, tokens_per_s=batch / dt,
               graph_ms=graph_ms, graph_x_weight_floor=graph_ms / (floor * 1e3) if graph_ms else None, **profiled)
    if tp > 1:   # the cost of reaching the other ranks: one step message each step
        row.update(rank_message_ms=message_s * 1e3, rank_message_share=message_s / dt)
    return row


SWAP_VARIANTS = {  # name: (max DMA runs, copy-kernel programs)
    "dma": (8, 8),
    "kernel32": (0, 32),
    "kernel16": (0, 16),
    "kernel8": (0, 8),
    "kernel4": (0, 4),
}
# "kernel8-all" issues every layer's copy at the forward's first layer wait instead of two layers
# ahead, as the engine issues DMA copies (they hide 88-94% so, 63-89% interleaved:
# benchmarks/results/engine-tuning/fused-async-76c3b02/engine.md)
SWAP_VARIANTS["kernel8-all"] = SWAP_VARIANTS["kernel8"]


def pinned_h2d_ceiling(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """This host's pinned host-to-device bandwidth in GB/s: one 1 GiB copy, median of `repeats`. Hosts
    differ: one 4k-token swap-in read 96% of 54 GB/s on one H100 machine and 65% on another
    (benchmarks/results/engine-tuning/swap-e000f1c/engine.md, final-decode.md)."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(repeats + 1):
        sync()
        t = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        sync()
        times.append(time.perf_counter() - t)
    del src, dst
    return nbytes / float(np.median(times[1:])) / 1e9


def bench_swap(engine: LLMEngine, num_tokens: int, variant: str = "dma") -> dict:
    """Swap-in bandwidth, and how much of it hides behind a forward of the same step."""
    from pensieve.kernels import block_copy

    runner = engine.runner
    defaults = runner.transfer.dma_max_runs, block_copy._MAX_PROGRAMS
    runner.transfer.dma_max_runs, block_copy._MAX_PROGRAMS = SWAP_VARIANTS[variant]
    lookahead = runner.transfer.lookahead
    if variant.endswith("-all"):
        runner.transfer.lookahead = runner.transfer.num_layers
    bs = runner.block_size
    n_blocks = num_tokens // bs
    gpu_ids = list(range(n_blocks))
    cpu_ids = list(range(n_blocks))
    plan = TransferPlan(swap_in=list(zip(cpu_ids, gpu_ids)))
    bytes_moved = runner.cpu_tier[:, :n_blocks].numel() * runner.cpu_tier.element_size()

    def copy_only() -> float:
        sync()
        t = time.perf_counter()
        runner.transfer.start(plan)
        runner.transfer.settle(ran_forward=False)  # issues every layer, then waits
        return time.perf_counter() - t

    for _ in range(3):
        copy_only()
    # median of 20: means of 10 scattered over 65-96% of PCIe for the same 4k copy
    # (benchmarks/results/HISTORY.md, Measurement pitfalls)
    copies = [copy_only() for _ in range(20)]
    copy_s = float(np.median(copies))

    # a prefill step of 2k new tokens that also reads the swapped-in blocks as its context
    cfg = engine.hf_config
    new = 2048
    ctx_blocks = list(range(n_blocks))
    fresh = list(range(n_blocks, n_blocks + new // bs))
    positions = np.arange(num_tokens, num_tokens + new)
    slots = np.array([fresh[(p - num_tokens) // bs] * bs + p % bs for p in positions], np.int64)
    batch = StepBatch(np.zeros(new, np.int64), positions.astype(np.int64), np.array([0, new], np.int32),
                      np.array([num_tokens + new], np.int32), np.array([ctx_blocks + fresh], np.int32), slots,
                      np.array([new - 1], np.int64), as_rows=False)
    ids = torch.randint(10, cfg.vocab_size - 10, (new,), device="cuda")

    def upload(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(dtype).pin_memory().to("cuda", non_blocking=True)

    def forward(wait) -> None:
        meta = to_metadata(batch, bs, upload, wait)
        with torch.inference_mode():
            runner.model(ids, meta.positions, runner.kv_caches, meta)

    def step(kind: str) -> float:
        """One synced step (as the engine runs them: it reads each step's sampled tokens): the forward
        alone, or with the swap-in pipelined layer by layer, or with it landed before the forward.
        Timed by events on the compute stream: the forward's span, waits for copies included."""
        runner.transfer.pipelined = kind != "serial"
        sync()
        span = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        span[0].record()
        wait = runner.transfer.start(plan) if kind != "forward" else None
        forward(wait)
        if kind != "forward":
            runner.transfer.settle(ran_forward=True)
        span[1].record()
        sync()
        return span[0].elapsed_time(span[1]) / 1e3

    for kind in ("forward", "pipelined", "serial"):
        step(kind)
    # Interleaved rounds, each pipelined step paired with the forward-only step next to it: a 1k-token
    # copy (~3 ms) is smaller than the drift of a ~55 ms forward between batches (timed batch after
    # batch the hidden share read 0-94% at 1k, unpaired medians 36-89%: benchmarks/results/HISTORY.md,
    # Measurement pitfalls). A round's forward varies by ~1-2 ms, so a short copy needs many rounds for
    # its median to settle.
    rounds = 150 if copy_s < 6e-3 else 30
    times: dict[str, list[float]] = {"forward": [], "pipelined": [], "serial": []}
    for _ in range(rounds):
        for kind in times:
            times[kind].append(step(kind))
    fwd_s, pipe_s, serial_s = (float(np.median(times[k])) for k in ("forward", "pipelined", "serial"))
    runner.transfer.pipelined = True
    hidden = profiling.hidden_share(times["forward"], times["pipelined"], copy_s)
    # The same pipelined steps under torch.profiler: did the copies run beside the forward's kernels
    # on the GPU, and did the host block inside cudaMemcpyAsync (a copy from unpinned memory would)?
    with torch.profiler.profile(activities=profiling.activities(True)) as prof:
        for _ in range(3):
            wait = runner.transfer.start(plan)
            forward(wait)
            runner.transfer.settle(ran_forward=True)
        sync()
    trace = profiling.trace_copy_overlap(prof)
    runner.transfer.dma_max_runs, block_copy._MAX_PROGRAMS = defaults
    runner.transfer.lookahead = lookahead
    return dict(kind="swap", variant=variant, tokens=num_tokens, blocks=n_blocks, gb=bytes_moved / 1e9, copy_ms=copy_s * 1e3,
                gbps=bytes_moved / copy_s / 1e9, frac_pcie=bytes_moved / copy_s / 1e9 / PCIE_GBPS,
                gbps_best=bytes_moved / min(copies) / 1e9, gbps_worst=bytes_moved / max(copies) / 1e9,
                forward_ms=fwd_s * 1e3, pipelined_ms=pipe_s * 1e3, serial_ms=serial_s * 1e3, hidden_share=hidden["share"],
                hidden_share_iqr=(hidden["iqr_low"], hidden["iqr_high"]),
                hidden_share_ci95=(hidden["ci95_low"], hidden["ci95_high"]), rounds=rounds,
                trace_overlap_share=trace["share"], trace_copies=trace["copies"],
                trace_host_memcpy_ms=trace["host_memcpy_us"] / 3e3, trace_host_memcpy_calls=trace["host_memcpy_calls"] / 3)


def bench_transformers(path: Path, prompts: list[list[int]], max_new: int) -> dict:
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16, device_map="cuda")
    gen = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generate_batch(inputs=prompts[:4], generation_config=gen)  # warm-up
    sync()
    t = time.perf_counter()
    out = model.generate_batch(inputs=prompts, generation_config=gen)
    sync()
    dt = time.perf_counter() - t
    n_out = sum(len(getattr(r, "generated_tokens", []) or []) for r in out.values()) if isinstance(out, dict) else 0
    del model
    torch.cuda.empty_cache()
    return dict(kind="hf_generate_batch", requests=len(prompts), seconds=dt, output_tokens=n_out or len(prompts) * max_new)


def bench_pensieve_batch(engine: LLMEngine, prompts: list[list[int]], max_new: int) -> dict:
    params = SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True)
    for i, p in enumerate(prompts[:4]):
        engine.add_request(f"w{i}", p, params)
    drain(engine)
    sync()
    t = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"b{i}", p, params)
    drain(engine)
    sync()
    return dict(kind="pensieve_batch", requests=len(prompts), seconds=time.perf_counter() - t,
                output_tokens=len(prompts) * max_new)


def bench_swap_ranks(engine: LLMEngine, num_tokens: int, copies: int = 20) -> dict | None:
    """Swap-in GB/s per GPU and in all: copy-only steps (no forward) sent through the executor, so every rank
    copies its own KV heads over its own link at once; timed on rank 0 (its copies landed), median of
    `copies`. A forward step between copies lines the ranks up again (its collectives wait for all of them).
    The blocks written are scratch: the bench runs with no request in flight."""
    executor = engine.executor
    bs = engine.config.cache.block_size
    n_blocks = num_tokens // bs
    if n_blocks > min(executor.num_gpu_blocks, executor.num_cpu_blocks):
        print(f"swap_ranks {num_tokens} tokens: {n_blocks} blocks do not fit the pools "
              f"({executor.num_gpu_blocks} GPU, {executor.num_cpu_blocks} CPU)", flush=True)
        return None
    pairs = [(i, i) for i in range(n_blocks)]
    copy_in = StepInput(None, TransferPlan(swap_in=pairs), swap_in_now=True)
    line_up = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)

    def one(i: int) -> float:
        engine.add_request(f"line-up-{num_tokens}-{i}", [11, 12, 13, 14], line_up)
        drain(engine)
        sync()
        t = time.perf_counter()
        executor.finish(executor.launch(copy_in))   # returns once rank 0's copies landed
        return time.perf_counter() - t

    for i in range(3):
        one(i)
    times = [one(i) for i in range(3, 3 + copies)]
    copy_s = float(np.median(times))
    per_gpu = num_tokens * executor.kv_bytes_per_token
    tp = engine.config.tensor_parallel_size
    return dict(kind="swap_ranks", tokens=num_tokens, blocks=n_blocks, gb_per_gpu=per_gpu / 1e9, copy_ms=copy_s * 1e3,
                gbps_per_gpu=per_gpu / copy_s / 1e9, gbps_aggregate=tp * per_gpu / copy_s / 1e9,
                frac_pcie=per_gpu / copy_s / 1e9 / PCIE_GBPS, gbps_per_gpu_best=per_gpu / min(times) / 1e9,
                gbps_per_gpu_worst=per_gpu / max(times) / 1e9)


def parse_prefill(spec: str) -> list[tuple[int, int]]:
    """'4096x1,1024x8' -> [(tokens per sequence, sequences), ...]: one prefill step each."""
    shapes = []
    for part in filter(None, spec.split(",")):
        per_seq, _, count = part.partition("x")
        shapes.append((int(per_seq), int(count or 1)))
    return shapes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llama-3.1-8b", help="random-checkpoint sizes (PRESETS), or tiny")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results/engine"))
    ap.add_argument("--ckpt-dir", default="/tmp/pensieve-ckpt")
    ap.add_argument("-tp", "--tensor-parallel-size", type=int, default=1, help="GPUs (ranks) per engine")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a dry run of the harness")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prefill", default="4096x1,1024x8", help="prefill steps: TOKENS_PER_SEQxSEQS, comma-separated")
    ap.add_argument("--decode-batches", default="1,8,32,64")
    ap.add_argument("--decode-ctx", default="1024", help="comma-separated context lengths")
    ap.add_argument("--profile", action="store_true",
                    help="per-kernel profile of each decode graph (under TP: of engine steps on rank 0, with the "
                         "all-reduce's share)")
    ap.add_argument("--swap-variants", default=",".join(SWAP_VARIANTS))
    ap.add_argument("--swap-tokens", default="1024,2048,4096")
    ap.add_argument("--gpu-kv-gb", type=float, default=None,
                    help="GPU KV pool per GPU (default: what fits under 85%% of GPU memory)")
    ap.add_argument("--cpu-kv-gb", type=float, default=16.0, help="CPU KV tier per GPU")
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--hf", action="store_true", help="also run HF transformers generate_batch")
    ap.add_argument("--hf-requests", type=int, default=64)
    ap.add_argument("--keep-ckpt", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tp = args.tensor_parallel_size
    rows: list[dict] = []
    skips = Skips()
    cuda = args.device == "cuda"
    device = (f"{tp} x " if tp > 1 else "") + (torch.cuda.get_device_name() if cuda else "cpu")
    for size in args.models.split(","):
        path = build(size, Path(args.ckpt_dir), args.device)
        # the KV tiers sized in bytes per GPU: 16 GB is 8192 blocks of Llama-3.1-8B; 8192 of Llama-2-13B's 6x
        # larger blocks (40 KV heads) would not pin
        per_token = kv_bytes_per_token(path, args.dtype, args.device, tp)
        gpu_blocks = None if args.gpu_kv_gb is None else blocks_for_budget(args.gpu_kv_gb, per_token, 16)
        engine = engine_for(path, device=args.device, dtype=args.dtype, tensor_parallel_size=tp,
                            num_gpu_blocks=gpu_blocks, num_cpu_blocks=blocks_for_budget(args.cpu_kv_gb, per_token, 16))
        base = dict(model=size, device=device, tensor_parallel_size=tp, params_b=checkpoint_params(path) / 1e9)
        try:
            model_rows, hf_prompts = bench_model(engine, base, args, skips, out)
        finally:
            engine.shutdown()   # the other ranks' processes
        del engine
        if cuda:
            torch.cuda.empty_cache()
        rows += model_rows
        if hf_prompts is not None:   # with the engine's weights and pools freed
            try:
                hf = bench_transformers(path, hf_prompts, 128)
                hf["pensieve_speedup"] = hf["seconds"] / model_rows[-1]["seconds"]
            except Exception as exc:  # report, never sink the whole run
                hf = dict(kind="hf_generate_batch", error=repr(exc)[:300])
            rows.append({**base, **hf})
            print(rows[-1], flush=True)
            if cuda:
                torch.cuda.empty_cache()
        if not args.keep_ckpt and size != "tiny":
            shutil.rmtree(path, ignore_errors=True)
    small = small_batch_linear_enabled()
    (out / "engine.json").write_text(json.dumps(dict(
        device=device, tensor_parallel_size=tp, command=" ".join(sys.argv), rows=rows, small_batch_linear=small,
        skipped=skips.reasons), indent=1))
    lines = report(rows, device, tp, small, skips)
    (out / "engine.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def bench_model(engine: LLMEngine, base: dict, args, skips: Skips, out: Path) -> tuple[list[dict], list | None]:
    """Every section of one model on one engine: its rows, and the prompts HF transformers should run once the
    engine is freed (None: no HF run)."""
    cfg = engine.hf_config
    tp = engine.config.tensor_parallel_size
    cuda = engine.device.type == "cuda"
    num_params = int(base["params_b"] * 1e9)
    # what each GPU reads per decode step: rank 0's shard (weights / TP, plus what every rank keeps whole)
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
    kv_per_token = engine.executor.kv_bytes_per_token
    base = {**base, "weight_gb_per_gpu": weight_bytes / 1e9}
    rows: list[dict] = []

    def add(row: dict | None) -> None:
        if row is not None:
            rows.append({**base, **row})
            print(rows[-1], flush=True)

    for per_seq, count in () if args.skip_prefill else parse_prefill(args.prefill):
        add(bench_prefill(engine, per_seq * count, per_seq, num_params, cfg))
    for ctx in map(int, args.decode_ctx.split(",")):
        for b in map(int, filter(None, args.decode_batches.split(","))):  # "" skips decode
            add(bench_decode(engine, b, ctx, weight_bytes, kv_per_token, cfg, skips, out if args.profile else None))
    variants = list(filter(None, args.swap_variants.split(",")))
    swap_tokens = [int(n) for n in args.swap_tokens.split(",") if n]
    if variants:
        for n in swap_tokens:
            add(bench_swap_ranks(engine, n))
    if variants and tp > 1:
        skips.add("swap overlap and copy variants", SWAP_OVERLAP_UNDER_TP)
    elif variants and not cuda:
        skips.add("swap overlap and copy variants", "needs CUDA (copy streams, events, pinned memory)")
    elif variants:
        ceiling = pinned_h2d_ceiling()
        for n in swap_tokens:
            for variant in variants:
                r = bench_swap(engine, n, variant)
                add({**r, "host_ceiling_gbps": ceiling, "frac_host_ceiling": r["gbps"] / ceiling})
    if not args.hf:
        return rows, None
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, cfg.vocab_size - 10, (int(torch.randint(128, 1024, (1,), generator=g)),),
                             generator=g).tolist() for _ in range(args.hf_requests)]
    add(bench_pensieve_batch(engine, prompts, 128))
    if tp > 1 or not cuda:
        skips.add("HF transformers generate_batch", HF_UNDER_TP if tp > 1 else "needs CUDA")
        return rows, None
    return rows, prompts


def report(rows: list[dict], device: str, tp: int, small: bool, skips: Skips) -> list[str]:
    """engine.md: one line per row, then what was skipped and why."""
    lines = [f"# Engine benchmark on {device}", "", f"`{' '.join(sys.argv)}`", "",
             f"Linears of <= {SMALL_BATCH_MAX_ROWS} rows: "
             f"{'the small-batch Triton kernel' if small else 'cuBLAS (PENSIEVE_SMALL_BATCH_LINEAR=0)'}.", ""]
    if tp > 1:
        lines += [f"Tensor parallel over {tp} ranks: floors are per GPU (rank 0's weight shard at {HBM_TBPS} TB/s; "
                  f"{tp} x {PEAK_TFLOPS:.0f} TFLOP/s for prefill); swap-ins per GPU on rank 0's link, the aggregate "
                  f"{tp} times it. The all-reduce's time comes from a profile of rank 0 (GPU kernels; gloo's work on a "
                  "CPU) and includes waiting for the slowest rank.", ""]
    lines += ["| model | kind | shape | ms | result |", "|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "prefill":
            shape = f"{r['tokens']} tok ({r['seq_len']}/seq)"
            res = f"{r['tflops']:.0f} TFLOP/s = {r['frac_peak']:.0%} of peak ({r['peak_tflops']:.0f})"
        elif r["kind"] == "decode":
            shape, res = f"batch {r['batch']}, ctx {r['ctx']}", f"{r['x_weight_floor']:.2f}x weight floor ({r['weight_floor_ms']:.2f} ms)"
            if r.get("running", r["batch"]) < r["batch"]:
                res = f"NOT A BATCH-{r['batch']} STEP: {r['running']} sequences fit the GPU KV pool; " + res
            if r.get("ms_sync"):
                res += f"; without async scheduling {r['ms_sync']:.2f} ms = {r['x_weight_floor_sync']:.2f}x"
            if r.get("graph_ms"):
                res += f"; forward graph alone {r['graph_ms']:.2f} ms = {r['graph_x_weight_floor']:.2f}x"
            if r.get("rank_message_ms") is not None:
                res += f"; step message to the ranks {r['rank_message_ms']:.3f} ms ({r['rank_message_share']:.1%})"
            if tp > 1 and r.get("profiled_step_ms") is not None:
                res += (f"; all-reduce {r['allreduce_ms']:.2f} ms = {r['allreduce_share_step']:.0%} of a profiled step "
                        f"({r['profiled_step_ms']:.2f} ms), all collectives {r['collectives_share_step']:.0%}")
        elif r["kind"] == "swap_ranks":
            shape = f"{r['tokens']} tok, {r['gb_per_gpu']:.3f} GB per GPU, copy-only step"
            res = (f"{r['gbps_per_gpu']:.1f} GB/s per GPU = {r['frac_pcie']:.0%} of {PCIE_GBPS:.0f} "
                   f"({r['gbps_per_gpu_worst']:.1f}-{r['gbps_per_gpu_best']:.1f}); aggregate {r['gbps_aggregate']:.1f} GB/s "
                   f"over {r['tensor_parallel_size']} GPU(s)")
            r = {**r, "ms": r["copy_ms"]}
        elif r["kind"] == "swap":
            shape = f"{r['tokens']} tok, {r['gb']:.2f} GB, {r['variant']}"
            res = (f"{r['gbps']:.1f} GB/s = {r['frac_pcie']:.0%} of 54 ({r['frac_host_ceiling']:.0%} of this host's "
                   f"{r['host_ceiling_gbps']:.1f}), 20 copies {r['gbps_worst']:.0f}-{r['gbps_best']:.0f} GB/s; "
                   f"hidden {r['hidden_share']:.0%} (95% CI {r['hidden_share_ci95'][0]:.0%}-{r['hidden_share_ci95'][1]:.0%}; "
                   f"single rounds' IQR {r['hidden_share_iqr'][0]:.0%}-{r['hidden_share_iqr'][1]:.0%}; {r['rounds']} paired "
                   f"rounds) (fwd {r['forward_ms']:.1f}, "
                   f"pipe {r['pipelined_ms']:.1f}, serial {r['serial_ms']:.1f} ms); trace: {r['trace_overlap_share']:.0%} of copy time "
                   f"beside compute, host {r['trace_host_memcpy_ms']:.2f} ms in {r['trace_host_memcpy_calls']:.0f} cudaMemcpyAsync per step")
            r = {**r, "ms": r["copy_ms"]}
        elif r["kind"] == "hf_generate_batch":
            shape, res = f"{r.get('requests', '')} req", (f"HF {r['seconds']:.1f}s; Pensieve {r['pensieve_speedup']:.2f}x faster" if "seconds" in r else r.get("error", ""))
            r = {**r, "ms": r.get("seconds", 0) * 1e3}
        else:
            shape, res = f"{r['requests']} req", f"{r['output_tokens'] / r['seconds']:.0f} out tok/s"
            r = {**r, "ms": r["seconds"] * 1e3}
        lines.append(f"| {r['model']} | {r['kind']} | {shape} | {r['ms']:.2f} | {res} |")
    if skips.reasons:
        lines += ["", "Skipped:"] + [f"- {section}: {reason}" for section, reason in skips.reasons.items()]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
