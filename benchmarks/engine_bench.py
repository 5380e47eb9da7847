"""GPU benchmark of the engine: prefill and decode against the hardware floors, HF transformers
side by side, and the CPU tier's swap-in bandwidth and overlap with the forward.

Run on the GPU machine (random-weight checkpoints of real shapes, built here, loaded through the
real loader):
    python benchmarks/engine_bench.py --models llama-3.1-8b,llama-2-13b-gqa10 --out benchmarks/results/engine
Writes engine.json and engine.md to --out and prints the table last.
"""
from __future__ import annotations

import argparse
import json
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
from pensieve.kernels import SMALL_BATCH_MAX_ROWS, small_batch_linear_enabled  # noqa: E402
from pensieve.model.random_checkpoint import make_random_checkpoint  # noqa: E402
from pensieve.sampling_params import SamplingParams  # noqa: E402

# The H100's measured floors (docs/BENCHMARKS.md quotes them): a decode step cannot beat weight bytes / HBM_TBPS,
# a prefill 2 x params x tokens / PEAK_TFLOPS, a swap-in bytes / PCIE_GBPS.
PEAK_TFLOPS = 793.0     # bf16 GEMM peak
HBM_TBPS = 3.0          # device copy bandwidth
PCIE_GBPS = 54.0        # pinned host->device


def sync() -> None:
    torch.cuda.synchronize()


def build(size: str, root: Path) -> Path:
    arch = "opt" if size.startswith("opt") else "llama"
    path = root / size
    if not (path / "config.json").exists():
        t = time.time()
        make_random_checkpoint(path, arch, size=size, dtype=torch.bfloat16, seed=0, device="cuda")
        print(f"built {size} in {time.time() - t:.0f}s", flush=True)
    return path


def engine_for(path: Path, mode: str = "tiered", **kw) -> LLMEngine:
    cache_kw = dict(num_gpu_blocks=kw.pop("num_gpu_blocks", None), num_cpu_blocks=kw.pop("num_cpu_blocks", 4096),
                    gpu_memory_utilization=kw.pop("gpu_memory_utilization", 0.85))
    return LLMEngine(EngineConfig(
        model=ModelConfig(model=str(path), dtype="bfloat16", max_model_len=kw.pop("max_model_len", 8192)),
        cache=CacheConfig(cache_mode=mode, **cache_kw),
        scheduler=SchedulerConfig(max_num_seqs=kw.pop("max_num_seqs", 128),
                                  max_num_batched_tokens=kw.pop("max_num_batched_tokens", 8192)),
        device="cuda", enforce_eager=kw.pop("enforce_eager", False)))


def drain(engine: LLMEngine) -> None:
    while engine.has_unfinished():
        engine.step()


def bench_prefill(engine: LLMEngine, tokens: int, per_seq: int, num_params: int, cfg) -> dict:
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
                tflops=flops / dt / 1e12, frac_peak=flops / dt / 1e12 / PEAK_TFLOPS)


KERNEL_KINDS = (  # kernel name fragment -> kind, first match wins
    ("small_batch_linear", "linear (Triton)"), ("gemm", "linear (cuBLAS)"), ("gemv", "linear (cuBLAS)"),
    ("nvjet", "linear (cuBLAS)"), ("cutlass", "linear (cuBLAS)"), ("paged_attention", "attention"),
    ("merge_splits", "attention"), ("store_kv", "kv store"), ("rms_norm", "norm"), ("rotary", "rotary"),
    ("silu", "silu_and_mul"), ("embedding", "embedding"), ("index", "embedding"),
)


def profile_graph(graph, path: Path, title: str, replays: int = 5) -> None:
    """Per-kernel GPU time of one replay of a decode graph (torch.profiler / CUPTI), by kernel and by kind."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        sync()
    rows = profiling.kernel_times(prof, replays)
    total = sum(r[2] for r in rows)
    kinds: dict[str, float] = {}
    for name, _, us in rows:
        kind = next((k for frag, k in KERNEL_KINDS if frag in name.lower()), "other")
        kinds[kind] = kinds.get(kind, 0.0) + us
    lines = [f"# Decode graph profile, {title}", "", f"kernel time per replay: {total:.0f} us", "",
             "| kind | us | share |", "|---|---|---|"]
    lines += [f"| {k} | {us:.0f} | {us / total:.0%} |" for k, us in sorted(kinds.items(), key=lambda kv: -kv[1])]
    lines += ["", "| kernel | launches | us | share |", "|---|---|---|---|"]
    lines += [f"| {name[:90]} | {n:.0f} | {us:.0f} | {us / total:.1%} |" for name, n, us in rows[:30]]
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:14]), flush=True)


def bench_decode(engine: LLMEngine, batch: int, ctx: int, weight_bytes: int, kv_bytes_per_token: int, cfg,
                 profile_dir: Path | None = None) -> dict:
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"d{batch}-{i}", torch.randint(10, cfg.vocab_size - 10, (ctx,)).tolist(), params,
                           stream=True)   # an output per step, as when serving streams
    while any(s.pending and s.num_pending > 1 for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # prefill everything first
    steps = 20
    # Sequences decoding together: fewer than `batch` when their KV does not fit the GPU pool (Llama-2-13B's
    # 40 KV heads at 64 x 1k need 54 GB), and then the row is no measure of a batch-`batch` step.
    running = len(engine.scheduler.running)

    def timed() -> float:
        for _ in range(3):
            engine.step()
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            engine.step()
        sync()
        return (time.perf_counter() - t) / steps

    # the same decode steps with and without async scheduling (host work beside the GPU's step)
    overlap = engine.async_scheduling
    engine.async_scheduling = False
    dt_sync = timed()
    engine.async_scheduling = overlap
    dt = timed()
    running = min(running, len(engine.scheduler.running))
    graph_ms = None
    size = engine.runner.graph_size(batch)
    if size is not None:  # the forward alone: replays the last step's inputs (rewrites the same KV)
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
    drain(engine)
    floor = weight_bytes / (HBM_TBPS * 1e12)
    kv_floor = (weight_bytes + batch * (ctx + 32) * kv_bytes_per_token) / (HBM_TBPS * 1e12)
    return dict(kind="decode", batch=batch, ctx=ctx, running=running, ms=dt * 1e3, weight_floor_ms=floor * 1e3,
                x_weight_floor=dt / floor, async_scheduling=overlap, ms_sync=dt_sync * 1e3,
                x_weight_floor_sync=dt_sync / floor, x_bytes_floor=dt / kv_floor, tokens_per_s=batch / dt,
                graph_ms=graph_ms, graph_x_weight_floor=graph_ms / (floor * 1e3) if graph_ms else None)


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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="llama-3.1-8b")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results/engine"))
    ap.add_argument("--ckpt-dir", default="/tmp/pensieve-ckpt")
    ap.add_argument("--decode-batches", default="1,8,32,64")
    ap.add_argument("--decode-ctx", default="1024", help="comma-separated context lengths")
    ap.add_argument("--profile", action="store_true", help="per-kernel profile of each decode graph")
    ap.add_argument("--swap-variants", default=",".join(SWAP_VARIANTS))
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--hf", action="store_true", help="also run HF transformers generate_batch")
    ap.add_argument("--hf-requests", type=int, default=64)
    ap.add_argument("--keep-ckpt", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    device = torch.cuda.get_device_name()
    for size in args.models.split(","):
        path = build(size, Path(args.ckpt_dir))
        # the CPU tier sized in bytes: 16 GB is 8192 blocks of Llama-3.1-8B; 8192 of Llama-2-13B's 6x larger
        # blocks (40 KV heads) would not pin
        engine = engine_for(path, num_cpu_blocks=blocks_for_budget(16, kv_bytes_per_token(path, "bfloat16"), 16))
        cfg = engine.hf_config
        num_params = sum(p.numel() for p in engine.runner.model.parameters())
        weight_bytes = num_params * 2
        kv_per_token = engine.runner.kv_bytes_per_token
        base = dict(model=size, device=device, params_b=num_params / 1e9)
        for per_seq in () if args.skip_prefill else (4096, 1024):
            r = bench_prefill(engine, 4096 if per_seq == 4096 else 8192, per_seq, num_params, cfg)
            rows.append({**base, **r})
            print(rows[-1], flush=True)
        for ctx in map(int, args.decode_ctx.split(",")):
            for b in map(int, filter(None, args.decode_batches.split(","))):  # "" skips decode
                rows.append({**base, **bench_decode(engine, b, ctx, weight_bytes, kv_per_token, cfg,
                                                    out if args.profile else None)})
                print(rows[-1], flush=True)
        ceiling = pinned_h2d_ceiling() if args.swap_variants else 0.0
        for n in (1024, 2048, 4096):
            for variant in filter(None, args.swap_variants.split(",")):
                r = bench_swap(engine, n, variant)
                rows.append({**base, **r, "host_ceiling_gbps": ceiling, "frac_host_ceiling": r["gbps"] / ceiling})
                print(rows[-1], flush=True)
        if args.hf:
            g = torch.Generator().manual_seed(0)
            prompts = [torch.randint(10, cfg.vocab_size - 10, (int(torch.randint(128, 1024, (1,), generator=g)),),
                                     generator=g).tolist() for _ in range(args.hf_requests)]
            ours = bench_pensieve_batch(engine, prompts, 128)
            rows.append({**base, **ours})
            del engine
            torch.cuda.empty_cache()
            try:
                hf = bench_transformers(path, prompts, 128)
                hf["pensieve_speedup"] = hf["seconds"] / ours["seconds"]
            except Exception as exc:  # report, never sink the whole run
                hf = dict(kind="hf_generate_batch", error=repr(exc)[:300])
            rows.append({**base, **hf})
            print(rows[-1], flush=True)
        else:
            del engine
        torch.cuda.empty_cache()
        if not args.keep_ckpt:
            shutil.rmtree(path, ignore_errors=True)
    small = small_batch_linear_enabled()
    (out / "engine.json").write_text(json.dumps(dict(
        device=device, command=" ".join(sys.argv), rows=rows, small_batch_linear=small), indent=1))
    lines = [f"# Engine benchmark on {device}", "", f"`{' '.join(sys.argv)}`", "",
             f"Linears of <= {SMALL_BATCH_MAX_ROWS} rows: "
             f"{'the small-batch Triton kernel' if small else 'cuBLAS (PENSIEVE_SMALL_BATCH_LINEAR=0)'}.", ""]
    lines += ["| model | kind | shape | ms | result |", "|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "prefill":
            shape, res = f"{r['tokens']} tok ({r['seq_len']}/seq)", f"{r['tflops']:.0f} TFLOP/s = {r['frac_peak']:.0%} of peak"
        elif r["kind"] == "decode":
            shape, res = f"batch {r['batch']}, ctx {r['ctx']}", f"{r['x_weight_floor']:.2f}x weight floor ({r['weight_floor_ms']:.2f} ms)"
            if r.get("running", r["batch"]) < r["batch"]:
                res = f"NOT A BATCH-{r['batch']} STEP: {r['running']} sequences fit the GPU KV pool; " + res
            if r.get("ms_sync"):
                res += f"; without async scheduling {r['ms_sync']:.2f} ms = {r['x_weight_floor_sync']:.2f}x"
            if r.get("graph_ms"):
                res += f"; forward graph alone {r['graph_ms']:.2f} ms = {r['graph_x_weight_floor']:.2f}x"
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
    (out / "engine.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
