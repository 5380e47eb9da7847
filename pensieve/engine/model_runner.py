"""The only part of the engine that touches tensors: a step's batch -> forward -> sampled tokens.

Owns one rank's model (or model shard), both KV tiers, the transfer streams and the decode CUDA graphs.
Under tensor parallelism every rank runs a ModelRunner over the same `StepInput`; only rank 0 samples.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import numpy as np
import torch

from pensieve.cache import persist
from pensieve.cache.kv_pool import allocate_tier, block_bytes, default_cpu_cache_bytes
from pensieve.cache.manager import TransferPlan
from pensieve.cache.transfer import KVTransfer
from pensieve.config import EngineConfig
from pensieve.distributed.group import SINGLE, ParallelGroup
from pensieve.engine.batch import StepBatch, prefill_batch, to_metadata
from pensieve.engine.sampler import Sampler, SamplerOutput, SamplingBatch
from pensieve.engine.sequence import Sequence
from pensieve.kernels.metadata import AttentionMetadata

log = logging.getLogger(__name__)

CPU_DEVICE_KV_BYTES = 1 << 30   # on a CPU-only machine the "GPU" tier is host memory too


@dataclass(frozen=True)
class StepInput:
    """What every rank needs to run one step (rank 0 adds the sequences it samples for)."""
    batch: StepBatch | None        # None: a step with copies only
    transfers: TransferPlan
    swap_in_now: bool              # a chunk reads blocks swapped in by this step: its forward waits layer by layer
    ids_on_device: bool = False    # the token ids were sampled by the step before and stay on rank 0's device


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
    token_ids: list[int]                                   # one per sampled chunk, in plan order
    logprobs: list[tuple[float, dict[int, float]]] | None  # per sampled chunk, when any asked
    path: str                                              # how the forward ran (LaunchedStep.path)
    copied_in: bool
    gpu_seconds: float                                     # the step's span on the GPU's queue (CUDA; else 0)


class ModelRunner:
    def __init__(self, config: EngineConfig, model: torch.nn.Module, kv_spec, dtype: torch.dtype,
                 device: torch.device, max_model_len: int, eos_token_ids: list[int], num_heads: int,
                 tp: ParallelGroup = SINGLE) -> None:
        """num_heads: this rank's query heads. Under tensor parallelism every rank runs this same
        sequence of warm-ups and captures: each includes the model's collectives."""
        self.config = config
        self.model = model
        self.kv_spec = kv_spec
        self.dtype = dtype
        self.device = device
        self.tp = tp
        self.block_size = config.cache.block_size
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        self.eos_token_ids = eos_token_ids
        self.sampler = Sampler()
        self.on_cuda = device.type == "cuda"
        self.num_gpu_blocks = tp.min_int(self._size_gpu_tier())   # the same block ids on every rank
        self.gpu_tier = allocate_tier(kv_spec, self.num_gpu_blocks, self.block_size, dtype, device)
        self.kv_caches = list(self.gpu_tier.unbind(0))
        self.num_cpu_blocks = self._size_cpu_tier()
        self.cpu_tier = allocate_tier(kv_spec, self.num_cpu_blocks, self.block_size, dtype,
                                      torch.device("cpu"), pin=self.on_cuda)
        self.transfer = KVTransfer(self.gpu_tier, self.cpu_tier, config.cache.pipelined_swap_in,
                                   config.cache.swap_dma_max_runs, dma_deferred=config.cache.swap_dma_deferred)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
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

    @property
    def runner(self) -> ModelRunner:
        """With one GPU the runner is the executor (engine/executor.py)."""
        return self

    def shutdown(self) -> None:
        """Nothing to stop with one GPU (the executor protocol's last call)."""

    @property
    def failure(self) -> str | None:
        """Why the executor can run no more steps: never, with one GPU."""
        return None

    def message_stats(self) -> tuple[int, float]:
        """Messages sent to other ranks and the seconds they took: none with one GPU."""
        return 0, 0.0

    @property
    def max_graph_rows(self) -> int:
        """The largest batch a decode CUDA graph takes (0: no graphs)."""
        return max(self.graphs, default=0)

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
        batch = prefill_batch(context_len, context_len + chunk, bs)
        meta = to_metadata(batch, bs, self._upload)
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
        # sizes are per rank: each rank's pool holds its own KV heads
        per_block = block_bytes(self.kv_spec, self.block_size, self.dtype)
        if cache.cpu_cache_gb is not None:
            return int(cache.cpu_cache_gb * (1 << 30) / self.tp.size // per_block)  # GiB, as vLLM's --kv-offloading-size
        # default: twice the GPU tier, within a share of host memory (pinning is paid at start-up)
        budget = min(default_cpu_cache_bytes() / self.tp.size, 2 * self.num_gpu_blocks * per_block)
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
        meta = to_metadata(prefill_batch(0, n, self.block_size), self.block_size, self._upload)
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        hidden = self.model(ids, meta.positions, list(tier.unbind(0)), meta)
        self.model.compute_logits(hidden[-min(n, self.config.scheduler.max_num_seqs):])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - tier.numel() * tier.element_size()
        del tier, hidden
        torch.cuda.empty_cache()
        return int(peak)

    def _upload(self, a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a)).to(dtype)
        return t.pin_memory().to(self.device, non_blocking=True) if self.on_cuda else t

    # ------------------------------------------------------------ execution
    @torch.inference_mode()
    def launch(self, step: StepInput, sample: Seq[Sequence] | None = None,
               input_ids: torch.Tensor | None = None) -> LaunchedStep:
        """Queue the step's copies, forward and sampling on the GPU; nothing waits for them here.
        sample: the sequences of the batch's logits rows, in order (rank 0 only: other ranks compute
        their logits shard and send it to rank 0). input_ids: the step's tokens already on the device
        (an overlapped decode step takes them from the previous step's sampled tokens, which the host
        has not read yet)."""
        span = ((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                if self.on_cuda else None)
        if span is not None:
            span[0].record()
        wait = self.transfer.start(step.transfers, used_now=step.swap_in_now)
        sampled, host, path = None, None, "idle"
        batch = step.batch
        if batch is not None:
            # everything is uploaded before the forward: a blocking copy after it would stall the host
            meta = to_metadata(batch, self.block_size, self._upload, wait)
            ids = self._input_ids(batch, step.ids_on_device, input_ids)
            rows = self._upload(batch.logits_rows, torch.int64)
            graph_bs = self.graph_size(batch.num_seqs) if (batch.decode_only and wait is None) else None
            if graph_bs is not None:
                hidden = self._replay(graph_bs, ids, meta)[:batch.num_seqs]
            else:
                hidden = self.model(ids, meta.positions, self.kv_caches, meta)
            self.transfer.issue_rest()  # swap-ins for the next step go behind this forward, before sampling
            if len(batch.logits_rows):
                logits = self.model.compute_logits(hidden.index_select(0, rows))
                if sample:
                    sampled = self._sample(logits, sample)
                    host = self._copy_to_host(sampled)
            path = ("swapin" if wait is not None else "rows" if batch.as_rows
                    else "graph" if graph_bs is not None else "eager")
        if span is not None:
            span[1].record()
        self.transfer.settle(ran_forward=batch is not None)
        copied_in = batch is not None and bool(step.transfers.swap_in) and not step.swap_in_now
        return LaunchedStep(sampled, host, path, copied_in, span if sampled is not None else None)

    def _input_ids(self, batch: StepBatch, on_device: bool, given: torch.Tensor | None) -> torch.Tensor:
        if not on_device:
            return self._upload(batch.input_ids, torch.int64)
        if self.tp.size > 1:  # sampled on rank 0's device: every rank takes them from there
            ids = given if given is not None else torch.empty(batch.num_tokens, dtype=torch.int64, device=self.device)
            return self.tp.broadcast(ids)
        if given is None:
            raise ValueError("a step whose ids stay on the device needs them")
        return given

    def _copy_to_host(self, out: SamplerOutput | None) -> SamplerOutput | None:
        """Queue the sampled tokens' copy to pinned host memory right behind the sampling. Read
        later with .tolist() on the device tensors, the copy would queue behind whatever was
        launched meanwhile: with async scheduling, the whole next step (the host then waited a full
        step for each step's tokens: benchmarks/results/engine-tuning/fused-async-76c3b02/engine.md)."""
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
        out = step.host
        if out is None:
            return StepResult([], None, step.path, step.copied_in, 0.0)
        gpu_seconds = 0.0
        if step.span is not None:
            # Wait here, not in .tolist(): an event wait releases the GIL, so the server's event
            # loop runs during the GPU's step instead of contending with this thread after it.
            step.span[1].synchronize()
            gpu_seconds = step.span[0].elapsed_time(step.span[1]) / 1e3
        tokens = out.token_ids.tolist()
        logprobs = None
        if out.logprobs is not None:
            lp = out.logprobs.tolist()
            top_ids = out.top_ids.tolist() if out.top_ids is not None else [[] for _ in tokens]
            top_lp = out.top_logprobs.tolist() if out.top_logprobs is not None else [[] for _ in tokens]
            logprobs = [(lp[i], dict(zip(top_ids[i], top_lp[i]))) for i in range(len(tokens))]
        return StepResult(tokens, logprobs, step.path, step.copied_in, gpu_seconds)

    def sampled_ids(self, step: LaunchedStep, rows: list[int]) -> torch.Tensor:
        """Rows `rows` of a launched step's sampled tokens, left on the device."""
        ids = step.sampled.token_ids
        if rows == list(range(ids.shape[0])):
            return ids
        return ids.index_select(0, self._upload(np.array(rows, np.int64), torch.int64))

    def _sample(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> SamplerOutput:
        params = [s.params for s in seqs]
        # prompt ids matter only to the repetition penalty: skip copying long prompts otherwise
        prompts = [s.token_ids[:s.num_prompt_tokens] if p.repetition_penalty != 1.0 else [] for s, p in zip(seqs, params)]
        batch = SamplingBatch.build(params, prompts, [s.output_token_ids for s in seqs], self.eos_token_ids,
                                    logits.shape[-1], logits.device)
        return self.sampler(logits, batch)

    # ------------------------------------------------------------ copies the engine waits for
    def completed_swap_outs(self) -> int:
        return self.transfer.completed_swap_outs()

    def wait_swap_outs(self) -> int:
        return self.transfer.wait_swap_outs()

    def sync_transfers(self) -> None:
        """A step failed midway: land every planned copy (the cache manager counted on them)."""
        self.transfer.synchronize()

    # ------------------------------------------------------------ this rank's shard of a saved cache
    # Each runs on every rank (the executor mirrors it); rank 0 gets every rank's result, or the
    # CacheError of the first rank that failed: a failed save or load never takes a rank down.
    @property
    def tp_size(self) -> int:
        return self.tp.size

    def kv_block_layout(self) -> tuple[list[int], torch.dtype]:
        return [self.gpu_tier.shape[0], *self.gpu_tier.shape[2:]], self.dtype

    def write_kv_shards(self, directory, blocks) -> list[list[int]]:
        def write():
            tiers = {"gpu": self.gpu_tier, "cpu": self.cpu_tier}
            return persist.write_shard(Path(directory) / persist.shard_name(self.tp.rank),
                                       ((key, tiers[tier][:, b]) for key, tier, b in blocks))
        return self._on_every_rank(write)

    def verify_kv_shards(self, directory, keys, checksums) -> set[int]:
        def verify():
            return persist.verify_shard(Path(directory) / persist.shard_name(self.tp.rank), keys,
                                        checksums[self.tp.rank], persist.block_record_bytes(self.gpu_tier))
        results = self._on_every_rank(verify)
        return set().union(*results) if results is not None else set()

    def read_kv_shards(self, directory, keys, checksums, tier, placements) -> None:
        def read():
            persist.read_shard(Path(directory) / persist.shard_name(self.tp.rank), keys, checksums[self.tp.rank],
                               persist.block_record_bytes(self.gpu_tier),
                               self.cpu_tier if tier == "cpu" else self.gpu_tier, placements)
        self._on_every_rank(read)

    def _on_every_rank(self, fn):
        """Run this rank's part (its copies landed first); rank 0 returns every rank's result by rank."""
        if self.on_cuda:
            self.transfer.synchronize()
            torch.cuda.synchronize(self.device)
        try:
            result = ("ok", fn())
        except (OSError, ValueError, persist.CacheError) as exc:
            result = ("error", f"rank {self.tp.rank}: {exc}")
        results = self.tp.gather_objects(result)
        if results is None:
            return None
        for status, value in results:
            if status == "error":
                raise persist.CacheError(value)
        return [value for _, value in results]

    # ------------------------------------------------------------ CUDA graphs (decode-only steps)
    def graph_size(self, batch: int) -> int | None:
        """The smallest captured decode graph that holds `batch` rows (None: none does)."""
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
