"""The only part of the engine that touches tensors: batch -> forward -> sampled tokens.

Owns the model, both KV tiers, the transfer stream and the decode CUDA graphs.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from pensieve.cache.kv_pool import allocate_tier, block_bytes, default_cpu_cache_bytes
from pensieve.cache.transfer import KVTransfer
from pensieve.config import EngineConfig
from pensieve.engine.sampler import Sampler, SamplerOutput, SamplingBatch
from pensieve.engine.scheduler import StepPlan
from pensieve.model.metadata import AttentionMetadata

log = logging.getLogger(__name__)

CPU_DEVICE_KV_BYTES = 1 << 30   # on a CPU-only machine the "GPU" tier is host memory too


@dataclass(frozen=True)
class LaunchedStep:
    """A step queued on the GPU whose sampled tokens have not been read back (ModelRunner.finish)."""
    sampled: SamplerOutput | None                          # device tensors; None: nothing sampled
    host: SamplerOutput | None                             # the same, copied to pinned host memory
    path: str                                              # graph | rows | eager | swapin | idle
    copied_in: bool                                        # copied a swap-in for the next step behind its forward
    span: tuple[torch.cuda.Event, torch.cuda.Event] | None  # GPU-queue span, start to sampled tokens (CUDA)


@dataclass(frozen=True)
class StepResult:
    token_ids: list[int]                                   # one per sampling chunk, in plan order
    logprobs: list[tuple[float, dict[int, float]]] | None  # per sampling chunk, when any asked


class ModelRunner:
    def __init__(self, config: EngineConfig, model: torch.nn.Module, kv_spec, dtype: torch.dtype,
                 device: torch.device, max_model_len: int, vocab_size: int, eos_token_ids: list[int],
                 num_heads: int) -> None:
        self.config = config
        self.model = model
        self.kv_spec = kv_spec
        self.dtype = dtype
        self.device = device
        self.block_size = config.cache.block_size
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.sampler = Sampler()
        self.on_cuda = device.type == "cuda"
        self.num_gpu_blocks = self._size_gpu_tier()
        self.gpu_tier = allocate_tier(kv_spec, self.num_gpu_blocks, self.block_size, dtype, device)
        self.kv_caches = list(self.gpu_tier.unbind(0))
        self.num_cpu_blocks = self._size_cpu_tier()
        self.cpu_tier = allocate_tier(kv_spec, self.num_cpu_blocks, self.block_size, dtype,
                                      torch.device("cpu"), pin=self.on_cuda)
        self.transfer = KVTransfer(self.gpu_tier, self.cpu_tier, config.cache.pipelined_swap_in,
                                   config.cache.swap_dma_max_runs, dma_deferred=config.cache.swap_dma_deferred)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.force_token_rows = False  # tests: take the one-token-rows layout without graphs
        self.last_path = "idle"        # how the last finished step ran: graph | rows | eager | swapin | idle
        self.last_copied_in = False    # the last step copied a swap-in for the next step behind its forward
        self.last_gpu_seconds = 0.0    # the last finished step's span on the GPU's queue: launch to its sampled tokens
        self.kv_bytes_per_token = block_bytes(kv_spec, 1, dtype)
        if self.on_cuda:
            from pensieve.kernels.attention import warm_up_attention

            try:  # a failed warm-up costs latency later, never the engine
                log.info("compiled %d attention kernel variants", warm_up_attention(self.kv_caches[0], num_heads, dtype))
                self._warm_up_copies()
            except Exception:
                log.exception("kernel warm-up failed; variants compile on first use")
        if self.on_cuda and not config.enforce_eager:
            self._capture_decode_graphs()
        if self.on_cuda:
            self._warm_up_logits()

    def _warm_up_copies(self) -> None:
        """Compile the block-copy variants (counts of 1, 16 and others specialise) before serving."""
        from pensieve.kernels import copy_blocks

        n = min(16, self.num_gpu_blocks, self.num_cpu_blocks)
        for count in sorted({1, 3, n}):
            if count > n:
                continue
            ids = torch.arange(count, device=self.device)
            copy_blocks(self.gpu_tier[0], self.cpu_tier[0], ids, ids)  # pools are empty: nothing to lose
            copy_blocks(self.cpu_tier[0], self.gpu_tier[0], ids, ids)
        torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def _warm_up_logits(self) -> None:
        """Compile the logits projection's small-batch variants (16 / 32 rows) before serving: it runs
        outside the decode graphs, whose warm-up compiled the layers' linears."""
        hidden = self.model.config.hidden_size
        for rows in (1, 17):
            self.model.compute_logits(torch.zeros(rows, hidden, dtype=self.dtype, device=self.device))
        torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def time_block_recompute(self, context_len: int, repeats: int = 3, chunk_blocks: int = 64) -> float:
        """Seconds to recompute one block whose first token has `context_len` tokens before it: the
        paper's offline profile of Cost(l). Timed as a chunk of `chunk_blocks` blocks at that context,
        divided by the blocks, so it is the marginal cost inside a busy batch rather than the weight
        reads of a tiny forward. Run before serving: it writes into pool blocks."""
        bs = self.block_size
        limit = min(self.num_gpu_blocks * bs, self.max_model_len)  # positions past max_model_len have no rotary entry
        chunk = max(bs, min(chunk_blocks * bs, (limit - bs) // bs * bs))
        context_len = max(0, min(context_len, limit - chunk))
        meta = self._one_prefill(context_len, context_len + chunk)
        ids = torch.zeros(chunk, dtype=torch.long, device=self.device)
        times = []
        for _ in range(repeats + 1):
            if self.on_cuda:
                torch.cuda.synchronize(self.device)
            t = time.perf_counter()
            self.model(ids, meta.positions, self.kv_caches, meta)
            if self.on_cuda:
                torch.cuda.synchronize(self.device)
            times.append(time.perf_counter() - t)
        return float(np.median(times[1:])) / (chunk // bs)

    # ------------------------------------------------------------ sizing
    def _size_gpu_tier(self) -> int:
        cache = self.config.cache
        if cache.num_gpu_blocks is not None:
            return cache.num_gpu_blocks
        per_block = block_bytes(self.kv_spec, self.block_size, self.dtype)
        if not self.on_cuda:
            return max(CPU_DEVICE_KV_BYTES // per_block, 2 * self.max_blocks_per_seq)
        peak = self._profile_peak_memory()
        total = torch.cuda.get_device_properties(self.device).total_memory
        free = total * cache.gpu_memory_utilization - peak
        n = int(free // per_block)
        if n < self.max_blocks_per_seq:
            raise RuntimeError(f"only {n} KV blocks fit in GPU memory; one sequence of max_model_len "
                               f"{self.max_model_len} needs {self.max_blocks_per_seq}")
        return n

    def _size_cpu_tier(self) -> int:
        cache = self.config.cache
        if cache.cache_mode != "tiered":
            return 0
        if cache.num_cpu_blocks is not None:
            return cache.num_cpu_blocks
        per_block = block_bytes(self.kv_spec, self.block_size, self.dtype)
        if cache.cpu_cache_gb is not None:
            return int(cache.cpu_cache_gb * (1 << 30) // per_block)  # GiB, as vLLM's --kv-offloading-size
        # default: twice the GPU tier, within a share of host memory (pinning is paid at start-up)
        budget = min(default_cpu_cache_bytes(), 2 * self.num_gpu_blocks * per_block)
        if not self.on_cuda:
            budget = min(budget, CPU_DEVICE_KV_BYTES)
        return int(budget // per_block)

    @torch.inference_mode()
    def _profile_peak_memory(self) -> int:
        """Peak memory of the largest step, run once on dummy tokens with a throwaway cache."""
        n = min(self.config.scheduler.max_num_batched_tokens, self.max_model_len)
        blocks = -(-n // self.block_size)
        tier = allocate_tier(self.kv_spec, blocks, self.block_size, self.dtype, self.device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        meta = self._one_prefill(0, n)
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        hidden = self.model(ids, meta.positions, list(tier.unbind(0)), meta)
        self.model.compute_logits(hidden[-min(n, self.config.scheduler.max_num_seqs):])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - tier.numel() * tier.element_size()
        del tier, hidden
        torch.cuda.empty_cache()
        return int(peak)

    # ------------------------------------------------------------ batch building
    def _one_prefill(self, start: int, end: int) -> AttentionMetadata:
        """One sequence computing positions [start, end) over blocks 0, 1, 2, ... (profiling only)."""
        positions = np.arange(start, end)
        return self._metadata(positions=positions, qsl=np.array([0, end - start]), seq_lens=np.array([end]),
                              tables=[list(range(-(-end // self.block_size)))], slots=positions.copy(),
                              max_q=end - start, decode_only=False, suffix=True)

    def _metadata(self, positions, qsl, seq_lens, tables, slots, max_q, decode_only, wait=None,
                  suffix=False) -> AttentionMetadata:
        width = max(len(t) for t in tables)
        table = np.zeros((len(tables), width), np.int32)
        for i, t in enumerate(tables):
            table[i, :len(t)] = t

        def put(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
            return self._upload(torch.from_numpy(np.ascontiguousarray(a)).to(dtype))

        return AttentionMetadata(
            positions=put(positions, torch.int64), query_start_loc=put(qsl, torch.int32),
            seq_lens=put(seq_lens, torch.int32), block_tables=put(table, torch.int32),
            slot_mapping=put(slots, torch.int64), block_size=self.block_size,
            max_query_len=int(max_q), max_seq_len=int(seq_lens.max()), decode_only=decode_only,
            new_tokens_are_suffix=suffix, has_context=bool((seq_lens > np.diff(qsl)).any()), wait_for_layer=wait)

    def _prepare(self, plan: StepPlan, wait, as_rows: bool,
                 with_ids: bool = True) -> tuple[torch.Tensor | None, AttentionMetadata, torch.Tensor]:
        """The flattened batch. as_rows: every token is its own one-token query row (same block
        table, seq_len = its position + 1), so a mixed step can replay a decode CUDA graph.
        with_ids=False: the caller has the token ids on the device already."""
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        qsl, seq_lens, tables, logits_rows = [0], [], [], []
        for chunk in plan.chunks:
            seq = chunk.seq
            table, tokens = seq.block_table, seq.token_ids
            for lo, hi in chunk.ranges:  # plain lists: a decode step is one token per sequence
                ids.extend(tokens[lo:hi])
                r = range(lo, hi)
                pos.extend(r)
                slots.extend(table[p // bs] * bs + p % bs for p in r)
                if as_rows:
                    seq_lens.extend(p + 1 for p in r)
                    tables.extend([table] * (hi - lo))
                    qsl.extend(range(qsl[-1] + 1, qsl[-1] + 1 + hi - lo))
            if not as_rows:
                qsl.append(len(pos))
                seq_lens.append(chunk.ranges[-1][1])
                tables.append(table)
            if chunk.sample:
                logits_rows.append(len(pos) - 1)
        max_q = max(b - a for a, b in zip(qsl, qsl[1:]))
        # one range per chunk ending at its seq_len: each sequence's new tokens are its suffix
        suffix = not as_rows and all(len(chunk.ranges) == 1 for chunk in plan.chunks)
        meta = self._metadata(np.array(pos), np.array(qsl), np.array(seq_lens), tables, np.array(slots),
                              max_q, decode_only=max_q == 1, wait=wait, suffix=suffix)
        input_ids = self._upload(torch.tensor(ids, dtype=torch.int64)) if with_ids else None
        # uploaded before the forward: a blocking copy after it would stall the host until the forward ends
        rows = self._upload(torch.tensor(logits_rows, dtype=torch.int64))
        return input_ids, meta, rows

    def _rows_pay_off(self, plan: StepPlan) -> bool:
        """Run a mixed step as one-token rows through a decode graph when it is small: an eager
        forward is bound by kernel launches, while rows re-read each new token's context
        (sum of their positions) from the cache. Small prefill chunks over cached history, the
        common case of a returning conversation, cost little that way."""
        if not (self.graphs or self.force_token_rows):
            return False
        budget = self.config.token_rows_reread_bytes / self.kv_bytes_per_token
        if budget <= 0 or plan.num_tokens > max(self.graphs, default=self.max_model_len):
            return False
        reread = 0
        for chunk in plan.chunks:
            if chunk.num_tokens > 1:
                reread += sum((hi * (hi + 1) - lo * (lo + 1)) // 2 for lo, hi in chunk.ranges)
        return reread <= budget

    def _upload(self, t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory().to(self.device, non_blocking=True) if self.on_cuda else t

    # ------------------------------------------------------------ execution
    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        return self.finish(self.launch(plan))

    @torch.inference_mode()
    def launch(self, plan: StepPlan, input_ids: torch.Tensor | None = None) -> LaunchedStep:
        """Queue the step's copies, forward and sampling on the GPU; nothing waits for them here.
        input_ids: the step's tokens already on the device (an overlapped decode step takes them
        from the previous step's sampled tokens, which the host has not read yet)."""
        span = ((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                if self.on_cuda else None)
        if span is not None:
            span[0].record()
        wait = self.transfer.start(plan.transfers, used_now=plan.swap_in_now)
        sampling = [c for c in plan.chunks if c.sample]
        sampled, host, path = None, None, "idle"
        if plan.chunks:
            as_rows = wait is None and any(c.num_tokens > 1 for c in plan.chunks) and self._rows_pay_off(plan)
            ids, meta, rows = self._prepare(plan, wait, as_rows, with_ids=input_ids is None)
            ids = ids if input_ids is None else input_ids
            num_rows = meta.num_seqs
            graph_bs = self._graph_size(num_rows) if (meta.decode_only and wait is None) else None
            if graph_bs is not None:
                hidden = self._replay(graph_bs, ids, meta)[:num_rows]
            else:
                hidden = self.model(ids, meta.positions, self.kv_caches, meta)
            self.transfer.issue_rest()  # swap-ins for the next step go behind this forward, before sampling
            sampled = self._sample(hidden, rows, sampling)
            host = self._copy_to_host(sampled)
            path = "swapin" if wait is not None else "rows" if as_rows else "graph" if graph_bs is not None else "eager"
        if span is not None:
            span[1].record()
        self.transfer.settle(ran_forward=bool(plan.chunks))
        copied_in = bool(plan.chunks) and bool(plan.transfers.swap_in) and not plan.swap_in_now
        return LaunchedStep(sampled, host, path, copied_in, span if sampling else None)

    def _copy_to_host(self, out: SamplerOutput | None) -> SamplerOutput | None:
        """Queue the sampled tokens' copy to pinned host memory right behind the sampling. Read
        later with .tolist() on the device tensors, the copy would queue behind whatever was
        launched meanwhile: with async scheduling, the whole next step (measured on the H100: the
        host then waited a full step for each step's tokens and the GPU idled ~1 ms per step)."""
        if out is None or not self.on_cuda:
            return out

        def host(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            # into pinned memory, or the copy would not be asynchronous
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)

        return SamplerOutput(*(host(t) for t in (out.token_ids, out.logprobs, out.top_ids, out.top_logprobs)))

    def finish(self, step: LaunchedStep) -> StepResult:
        """Wait for a launched step and read its sampled tokens back: the step's only sync."""
        self.last_path, self.last_copied_in = step.path, step.copied_in
        self.last_gpu_seconds = 0.0
        out = step.host
        if out is None:
            return StepResult([], None)
        if step.span is not None:
            # Wait here, not in .tolist(): an event wait releases the GIL, so the server's event
            # loop runs during the GPU's step instead of contending with this thread after it.
            step.span[1].synchronize()
            self.last_gpu_seconds = step.span[0].elapsed_time(step.span[1]) / 1e3
        tokens = out.token_ids.tolist()
        logprobs = None
        if out.logprobs is not None:
            lp = out.logprobs.tolist()
            top_ids = out.top_ids.tolist() if out.top_ids is not None else [[] for _ in tokens]
            top_lp = out.top_logprobs.tolist() if out.top_logprobs is not None else [[] for _ in tokens]
            logprobs = [(lp[i], dict(zip(top_ids[i], top_lp[i]))) for i in range(len(tokens))]
        return StepResult(tokens, logprobs)

    def sampled_ids(self, step: LaunchedStep, rows: list[int]) -> torch.Tensor:
        """Rows `rows` of a launched step's sampled tokens, left on the device."""
        ids = step.sampled.token_ids
        if rows == list(range(ids.shape[0])):
            return ids
        return ids.index_select(0, self._upload(torch.tensor(rows, dtype=torch.int64)))

    def _sample(self, hidden: torch.Tensor, rows: torch.Tensor, chunks) -> SamplerOutput | None:
        if not chunks:
            return None
        logits = self.model.compute_logits(hidden.index_select(0, rows))
        seqs = [c.seq for c in chunks]
        params = [s.params for s in seqs]
        # prompt ids matter only to the repetition penalty: skip copying long prompts otherwise
        prompts = [s.token_ids[:s.num_prompt_tokens] if p.repetition_penalty != 1.0 else [] for s, p in zip(seqs, params)]
        batch = SamplingBatch.build(params, prompts, [s.output_token_ids for s in seqs], self.eos_token_ids,
                                    logits.shape[-1], logits.device)
        return self.sampler(logits, batch)

    # ------------------------------------------------------------ CUDA graphs (decode-only steps)
    def _graph_size(self, batch: int) -> int | None:
        for size in sorted(self.graphs):
            if size >= batch:
                return size
        return None

    def _capture_decode_graphs(self) -> None:
        cap = self.config.scheduler.max_num_seqs
        if self.config.token_rows_reread_bytes > 0:  # mixed steps as rows may hold more tokens than sequences
            cap = max(cap, self.config.token_rows_max_tokens)
        sizes = sorted(s for s in self.config.cuda_graph_batch_sizes if s <= max(cap, 1))
        if not sizes:
            return
        n = sizes[-1]
        dev = self.device
        self._g_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self._g_pos = torch.zeros(n, dtype=torch.long, device=dev)
        self._g_slots = torch.full((n,), -1, dtype=torch.long, device=dev)
        self._g_qsl = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self._g_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self._g_tables = torch.zeros(n, self.max_blocks_per_seq, dtype=torch.int32, device=dev)
        self._g_out: dict[int, torch.Tensor] = {}
        pool = None
        for size in reversed(sizes):
            meta = AttentionMetadata(
                positions=self._g_pos[:size], query_start_loc=self._g_qsl[:size + 1], seq_lens=self._g_lens[:size],
                block_tables=self._g_tables[:size], slot_mapping=self._g_slots[:size], block_size=self.block_size,
                max_query_len=1, max_seq_len=self.max_model_len, decode_only=True)
            args = (self._g_ids[:size], self._g_pos[:size], self.kv_caches, meta)
            with torch.inference_mode():
                for _ in range(2):  # warm up: Triton compiles outside the capture
                    self.model(*args)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._g_out[size] = self.model(*args)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()
        log.info("captured decode CUDA graphs for batch sizes %s", sizes)

    def _replay(self, size: int, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        b = input_ids.shape[0]
        self._g_ids[:b].copy_(input_ids)
        self._g_pos[:b].copy_(meta.positions)
        self._g_slots[:b].copy_(meta.slot_mapping)
        self._g_slots[b:size].fill_(-1)
        self._g_lens[:b].copy_(meta.seq_lens)
        self._g_lens[b:size].fill_(1)
        width = meta.block_tables.shape[1]
        self._g_tables[:b, :width].copy_(meta.block_tables)
        self.graphs[size].replay()
        return self._g_out[size]
