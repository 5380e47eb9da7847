"""The synchronous engine: add requests, then step() = schedule, run, postprocess."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from collections.abc import Iterable
from typing import Callable

import torch

from pensieve.cache.block_tier import CacheIntegrityError
from pensieve.cache.manager import KVCacheManager
from pensieve.cache.policy import LRUPolicy, ProfiledCost, RecomputeCost, RetentionValuePolicy
from pensieve.config import EngineConfig
from pensieve.engine import profiling
from pensieve.engine.batch import build_batch, token_rows_pay_off
from pensieve.engine.detokenizer import IncrementalDetokenizer, StopChecker
from pensieve.engine.executor import build_executor
from pensieve.engine.model_runner import LaunchedStep, StepInput, StepResult
from pensieve.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from pensieve.engine.scheduler import Scheduler, StepPlan
from pensieve.engine.sequence import SeqStatus, Sequence
from pensieve.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    gpu_blocks_total: int
    gpu_blocks_used: int
    gpu_blocks_cached: int
    cpu_blocks_total: int
    cpu_blocks_used: int
    prompt_tokens: int
    generation_tokens: int
    gpu_hit_tokens: int
    cpu_hit_tokens: int
    recomputed_tokens: int
    swapped_out_blocks: int
    swapped_in_blocks: int
    dropped_blocks: int
    preemptions: int
    finished_requests: int
    num_conversations: int
    # steps by how their forward ran (decode graph, mixed step as graph rows, eager, eager waiting
    # layer by layer on a swap-in), their wall time and their GPU span (from the start of execute() on
    # the GPU's queue to the sampled tokens; CUDA only): wall minus span is the host's scheduling and
    # postprocessing, GIL waits included
    steps_graph: int = 0
    steps_rows: int = 0
    steps_eager: int = 0
    steps_swapin: int = 0
    step_seconds_graph: float = 0.0
    step_seconds_rows: float = 0.0
    step_seconds_eager: float = 0.0
    step_seconds_swapin: float = 0.0
    step_gpu_seconds_graph: float = 0.0
    step_gpu_seconds_rows: float = 0.0
    step_gpu_seconds_eager: float = 0.0
    step_gpu_seconds_swapin: float = 0.0
    # steps (any path) that copied a swap-in for the next step behind their forward (deferred swap-in)
    steps_copying: int = 0
    step_seconds_copying: float = 0.0
    slow_steps: int = 0
    # decode steps scheduled and launched while the step before them still ran (async scheduling)
    steps_overlapped: int = 0
    # the other busy steps under async scheduling, by why they waited for the step before (OVERLAP_REFUSALS)
    not_overlapped_after_read_back: int = 0   # the step before was read back at once (prompt tokens, copies) or none ran
    not_overlapped_waiting: int = 0           # a waiting request could be admitted
    not_overlapped_new_running: int = 0       # a running sequence was not in the step before (admitted, swapped in)
    not_overlapped_penalties: int = 0         # a sampler penalty needs the step before's tokens on the host
    not_overlapped_finishing: int = 0         # every sequence stopped with the step before's token
    not_overlapped_growth: int = 0            # growing would evict blocks whose copy the forward must wait for
    # tensor parallelism: messages rank 0 sent the other ranks (one per step) and the seconds they took
    rank_messages: int = 0
    rank_message_seconds: float = 0.0


SLOW_STEP_S = 0.25   # a step this long is logged with what it held
STEP_PATHS = ("graph", "rows", "eager", "swapin")   # how a step's forward ran (EngineStats.steps_*)
OVERLAP_REFUSALS = ("after_read_back", "waiting", "new_running", "penalties", "finishing", "growth")  # not_overlapped_*


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass(frozen=True)
class _Step:
    """A step launched on the GPU, with what its postprocessing needs once its tokens are read."""
    plan: StepPlan
    launched: LaunchedStep
    started: float   # perf_counter() when its scheduling began


@dataclass
class _Tracked:
    seq: Sequence
    detok: IncrementalDetokenizer
    stop: StopChecker
    metrics: RequestMetrics
    logprobs: list[tuple[float, dict[int, float]]] | None   # streamed: the entries not sent yet
    prompt_token_ids: list[int]   # one copy shared by every output of the request (never mutated)
    stream: bool = False          # outputs carry what is new (see outputs.py); else first token + whole
    sent_ids: int = 0             # streamed: seq.token_ids[:sent_ids] went out in earlier outputs
    sent_text: int = 0            # streamed: text[:sent_text] went out in earlier outputs


class LLMEngine:
    def __init__(self, config: EngineConfig, preloaded: tuple | None = None) -> None:
        """preloaded: (model, hf_config, dtype) from an earlier `load_model`, so that a benchmark
        comparing cache modes loads the weights once (the model holds no per-engine state)."""
        from pensieve.model.gguf import load_tokenizer
        from pensieve.model.loader import load_config, max_context_len, resolve_model_path

        self.config = config
        self.device = resolve_device(config.device)
        if config.cache.persist_path is not None:   # found now, not at shutdown with the cache lost
            from pensieve.cache.persist import check_path

            check_path(config.cache.persist_path)
        mc = config.model
        torch.manual_seed(mc.seed)
        hf_config = preloaded[1] if preloaded else load_config(resolve_model_path(mc.model))
        self.hf_config = hf_config
        self.tokenizer = load_tokenizer(mc.model, mc.tokenizer)
        self.max_model_len = min(mc.max_model_len or max_context_len(hf_config), max_context_len(hf_config))
        eos = getattr(hf_config, "eos_token_id", None)
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in eos_ids:
            eos_ids.append(self.tokenizer.eos_token_id)
        self.eos_token_ids = eos_ids
        # the runner of rank 0; with several GPUs the executor mirrors each call on the other ranks
        self.executor = build_executor(config, self.device, self.max_model_len, eos_ids, preloaded)
        self.runner = self.executor.runner
        self.loaded = (self.runner.model, hf_config, self.runner.dtype)
        spec = self.runner.kv_spec
        num_params = sum(p.numel() for p in self.runner.model.parameters()) * config.tensor_parallel_size
        cost = RecomputeCost.for_model(num_params, spec.num_layers, hf_config.num_attention_heads, spec.head_dim)
        if config.cache.profile_recompute_cost and self.device.type == "cuda" and config.cache.eviction_policy == "retention":
            try:  # the paper's way: measure Cost(l) on this GPU instead of estimating it from FLOPs
                cost = ProfiledCost.measure(self.executor.time_block_recompute, self.max_model_len)
                log.info("profiled recompute cost: %s", dict(zip(cost.context_tokens, cost.seconds)))
            except Exception:
                log.exception("profiling the recompute cost failed; using the FLOP estimate")
        policy = (RetentionValuePolicy(config.cache.block_size, cost) if config.cache.eviction_policy == "retention"
                  else LRUPolicy())
        self.kv = KVCacheManager(config.cache, self.executor.num_gpu_blocks, self.executor.num_cpu_blocks, policy)
        # a mixed step runs as one-token rows only while its context re-reads stay under this many tokens
        self._reread_budget_tokens = config.token_rows_reread_bytes / self.executor.kv_bytes_per_token
        capacity = self.executor.num_gpu_blocks * config.cache.block_size
        if capacity < self.max_model_len:
            # a sequence that outgrew the whole pool could never be admitted again: cap the context instead
            log.warning("the GPU KV pool holds %d tokens: max_model_len lowered from %d", capacity, self.max_model_len)
            self.max_model_len = capacity
        if config.cache.persist_path is not None:
            self._restore_cache(config.cache.persist_path)
        self.scheduler = Scheduler(config.scheduler, config.cache, self.kv)
        self._tracked: dict[str, _Tracked] = {}
        self._step_counts = dict.fromkeys((*STEP_PATHS, "copying"), 0)
        self._step_seconds = dict.fromkeys((*STEP_PATHS, "copying"), 0.0)
        self._step_gpu_seconds = dict.fromkeys(STEP_PATHS, 0.0)
        self._slow_steps = 0
        self._overlapped = 0
        self._not_overlapped = dict.fromkeys(OVERLAP_REFUSALS, 0)
        self._window: profiling.StepWindow | None = None   # a profile window being counted
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._finished = 0
        self._last_expiry = float("-inf")
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else self.device.type == "cuda")
        self._inflight: _Step | None = None   # a decode step launched, its tokens not read yet
        self._last_resolved = 0.0             # perf_counter() when the last step's outputs were made
        log.info("engine ready: %s on %s (tensor parallel %d), %d device blocks, %d CPU blocks, mode=%s", mc.model,
                 self.device, config.tensor_parallel_size, self.executor.num_gpu_blocks, self.executor.num_cpu_blocks,
                 config.cache.cache_mode)

    # ------------------------------------------------------------ requests
    def validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n >= self.max_model_len:
            raise ValueError(f"the prompt has {n} tokens; this model's context is {self.max_model_len} tokens "
                             f"(at least one must be left to generate)")
        if params.max_tokens is not None and n + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds the model's context "
                             f"of {self.max_model_len} tokens")
        vocab_size = self.hf_config.vocab_size  # read once: a config attribute costs microseconds a token
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {vocab_size})")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    conversation_id: str | None = None, arrival_time: float | None = None,
                    append_to_conversation: bool = False, stream: bool = False,
                    cache_salt: str | None = None) -> None:
        """append_to_conversation: `prompt_token_ids` is only the new turn; the engine puts the named
        conversation's tokens (its last prompt and reply) before it, so the client resends nothing.
        stream=True: step() returns an output for this request at every token, each carrying only
        what is new; False: one at its first token and a final one with the whole completion.
        cache_salt: this request reuses and offers KV only under this salt (block_keys.salt_root)."""
        if request_id in self._tracked:
            raise ValueError(f"request id {request_id!r} is already running")
        if append_to_conversation:
            conv = self.kv.conversations.get(conversation_id) if conversation_id else None
            if conv is None:
                raise ValueError(f"unknown conversation {conversation_id!r}: nothing to append to")
            if any(t.seq.conversation_id == conversation_id for t in self._tracked.values()):
                raise ValueError(f"conversation {conversation_id!r} already has a turn in flight")
            prompt_token_ids = conv.tokens + list(prompt_token_ids)
        self.validate_prompt(prompt_token_ids, params)
        now = arrival_time if arrival_time is not None else time.monotonic()
        seq = Sequence(request_id, list(prompt_token_ids), len(prompt_token_ids), params, now, conversation_id,
                       cache_salt)
        self._tracked[request_id] = _Tracked(
            seq, IncrementalDetokenizer(self.tokenizer, seq.token_ids[:], params.skip_special_tokens),
            StopChecker(params, set(self.eos_token_ids), self.max_model_len), RequestMetrics(now),
            [] if params.logprobs is not None else None, list(prompt_token_ids), stream, seq.num_tokens)
        if conversation_id is not None:
            self.kv.touch_conversation(conversation_id)
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        t = self._tracked.pop(request_id, None)
        if t is None:
            return None
        self.scheduler.remove(request_id)
        if not self._tracked and self._inflight is not None:
            # nothing left for the step still running: wait for it (its rows are dropped), so the
            # engine is idle now rather than after one more step() call
            self._resolve(self._inflight)
            self._inflight = None
        return self._output(t, "abort", None, finished=True)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None

    def delete_conversation(self, conversation_id: str) -> bool:
        return self.kv.delete_conversation(conversation_id)

    def reset_cache(self) -> bool:
        """Drop every cached block and conversation, as a fresh engine starts (between benchmark runs).
        False, and nothing dropped, while a request is unfinished."""
        if self.has_unfinished():
            return False
        self.flush_transfers()
        self.kv.clear()
        return True

    def cached_block_keys(self) -> tuple[list[bytes], list[bytes]]:
        """Content keys cached in the GPU and the CPU tier (a KV event publisher diffs them)."""
        return self.kv.tier_keys()

    # ------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """One engine iteration; returns the outputs of the steps whose tokens were read back.

        With async scheduling a pure decode step is left running on the GPU: the next call
        schedules the same sequences' next tokens first (placeholders; the ids stay on the
        device), launches that step behind it, and only then reads the earlier step's tokens and
        postprocesses them while the GPU computes. Any other case (new requests, prefill, swaps,
        penalties that need the tokens on the host) reads the running step back first."""
        ttl = self.config.cache.conversation_ttl
        now = time.monotonic()
        if ttl is not None and now - self._last_expiry >= min(1.0, ttl):  # a scan of every conversation: not every step
            self._last_expiry = now
            self.kv.expire_conversations(ttl)
        if self._window is not None:
            self._window.begin_step()
        t0 = time.perf_counter()
        prev, self._inflight = self._inflight, None
        outputs: list[RequestOutput] = []
        follow, refusal = None, None
        if self.async_scheduling:
            follow, refusal = self._next_decode(prev) if prev is not None else (None, "after_read_back")
        if follow is not None:
            seqs, rows = follow
            plan = self.scheduler.schedule_decode(seqs)
            launched = self._launch(plan, self.executor.sampled_ids(prev.launched, rows))
            self._overlapped += 1
            outputs = self._resolve(prev)
        else:
            if prev is not None:
                outputs = self._resolve(prev)
            plan = self.scheduler.schedule()
            launched = self._launch(plan)
            if refusal is not None and plan.chunks:
                self._not_overlapped[refusal] += 1
        step = _Step(plan, launched, t0)
        if self.async_scheduling and self._can_leave_running(plan):
            self._inflight = step
        else:
            outputs += self._resolve(step)
        return outputs

    def _launch(self, plan: StepPlan, input_ids: torch.Tensor | None = None) -> LaunchedStep:
        """input_ids: the step's tokens on the device (an overlapped decode step's, sampled by the
        step still running); else they come from the plan."""
        step = StepInput(self._batch(plan), plan.transfers, plan.swap_in_now, ids_on_device=input_ids is not None)
        try:
            return self.executor.launch(step, [c.seq for c in plan.chunks if c.sample], input_ids)
        except Exception:
            # leave the pools consistent for whoever handles this (the async engine aborts the batch)
            self.executor.sync_transfers()
            self.kv.end_step()
            self.flush_transfers()
            raise

    def _batch(self, plan: StepPlan):
        if not plan.chunks:
            return None
        # a forward waiting on a swap-in layer by layer runs eagerly: rows would not replay a graph
        waits = bool(plan.transfers.swap_in) and plan.swap_in_now and self.config.cache.pipelined_swap_in
        as_rows = not waits and token_rows_pay_off(plan.chunks, self.executor.max_graph_rows, self._reread_budget_tokens)
        return build_batch(plan.chunks, self.config.cache.block_size, as_rows)

    def _resolve(self, step: _Step) -> list[RequestOutput]:
        """Read a launched step's tokens back (waits for the GPU) and postprocess them."""
        result = self.executor.finish(step.launched)
        self.kv.end_step()
        self.kv.swap_outs_done(self.executor.completed_swap_outs())
        outputs = self._postprocess(step.plan, result)
        now = time.perf_counter()
        # overlapped steps: the time since the previous step's outputs, so seconds add up to wall time
        self._account_step(step.plan, result, now - max(step.started, self._last_resolved))
        self._last_resolved = now
        if self._window is not None and self._window.end_step(result.path):
            self._window = None
        return outputs

    @staticmethod
    def _can_leave_running(plan: StepPlan) -> bool:
        """A step may stay on the GPU past this call when it is pure decode and holds no copies
        whose pins end with the step (a swap-in, an eviction copy)."""
        t = plan.transfers
        return (bool(plan.chunks) and all(c.sample and c.num_tokens == 1 for c in plan.chunks)
                and not t.swap_in and not t.evict_out and not plan.preempted)

    def _next_decode(self, prev: _Step) -> tuple[tuple[list[Sequence], list[int]] | None, str | None]:
        """((the sequences, their rows of `prev`'s sampled tokens) whose next decode step can be
        scheduled before `prev`'s tokens are read, None), or (None, why not: OVERLAP_REFUSALS) when
        this step must read them first."""
        live = [(row, c.seq) for row, c in enumerate(prev.plan.chunks) if c.seq.status is SeqStatus.RUNNING]
        if len(live) != len(self.scheduler.running):
            return None, "new_running"   # a running sequence outside the last step: it is not a plain decode
        rows, seqs, new_blocks = [], [], 0
        for row, seq in live:
            if seq.params.penalizes_tokens:
                return None, "penalties"   # the sampler needs the output ids themselves, on the host
            stop = self._tracked[seq.request_id].stop
            if stop.length_reached(seq.num_output_tokens + 1, seq.num_prompt_tokens):
                continue      # the token being sampled is its last: it stops when read
            rows.append(row)
            seqs.append(seq)
            new_blocks += self.kv.blocks_needed(seq.num_tokens + 1) > len(seq.block_table)
        if not seqs:
            return None, "finishing"   # every sequence stops with the token the step before samples
        # Requests waiting that schedule() could not admit after this growth either (no room in the pool
        # or the batch) leave it a decode step too: launch it behind the one in flight. Freeing backed
        # blocks below cannot change that answer (an idle GPU hit counts as taken either way).
        if self.scheduler.can_admit_next(new_blocks):
            return None, "waiting"
        if not self.kv.free_without_copy(new_blocks):
            return None, "growth"   # growing would evict blocks that need a copy the forward must wait for
        return (seqs, rows), None

    def watch_steps(self, num_steps: int, done: Callable[[str], None]) -> None:
        """Call `done` with a summary ('K steps in W s: {path: n}') after the next `num_steps` busy steps."""
        self._window = profiling.StepWindow(num_steps, done, self.device.type == "cuda")

    def profile_steps(self, num_steps: int, done: Callable[[str], None]) -> None:
        """torch.profiler over the next `num_steps` busy steps, run from the thread that steps the
        engine; `done` receives the report: steps by path, then the ops that took the most time."""
        cuda = self.device.type == "cuda"
        prof = torch.profiler.profile(activities=profiling.activities(cuda))

        def finish(summary: str) -> None:
            prof.__exit__(None, None, None)
            done(profiling.report(summary, prof, cuda))

        self._window = profiling.StepWindow(num_steps, finish, cuda, on_begin=prof.__enter__)

    def _account_step(self, plan: StepPlan, result: StepResult, seconds: float) -> None:
        path = result.path
        if path == "idle":
            return
        self._step_counts[path] += 1
        self._step_seconds[path] += seconds
        self._step_gpu_seconds[path] += result.gpu_seconds
        if result.copied_in:
            self._step_counts["copying"] += 1
            self._step_seconds["copying"] += seconds
        if seconds > SLOW_STEP_S:
            self._slow_steps += 1
            t = plan.transfers
            # a GPU step this long is an anomaly worth a warning; on a CPU most steps take that long
            level = logging.WARNING if self.device.type == "cuda" else logging.DEBUG
            log.log(level, "slow step %.3f s (%s): %d tokens in %d chunks, %d swap-in / %d swap-out / %d evict blocks",
                    seconds, path, plan.num_tokens, len(plan.chunks), len(t.swap_in), len(t.swap_out),
                    len(t.evict_out))

    def flush_transfers(self) -> None:
        """Wait for the swap-outs still in flight and unpin their blocks (when idle)."""
        self.kv.swap_outs_done(self.executor.wait_swap_outs())

    def save_cache(self, path: str) -> int:
        """Write every cached block and the conversations to `path` (see cache/persist.py)."""
        from pensieve.cache.persist import save_cache

        self.flush_transfers()
        return save_cache(self.kv, self.executor, path, self._fingerprint(), self.kv.clock())

    def load_cache(self, path: str):
        """Bring back a cache saved by an engine of the same model, dtype and block size; returns a
        persist.LoadReport, raises persist.CacheError when the save cannot be used."""
        from pensieve.cache.persist import load_cache

        return load_cache(self.kv, self.executor, path, self._fingerprint(), self.kv.clock())

    def _restore_cache(self, path: str) -> None:
        """At start: load the save at `path`. One that cannot be used is logged in one line and the
        cache starts empty, or with `persist_strict` it is refused (CacheError)."""
        from pensieve.cache.persist import CacheError

        try:
            report = self.load_cache(path)
        except CacheError as exc:
            if self.config.cache.persist_strict:
                raise
            log.warning("ignoring the saved KV cache (%s); starting with an empty cache", exc)
            kv = self.kv   # it may hold blocks adopted before the failure: start from a clean one
            self.kv = KVCacheManager(kv.cfg, kv.num_gpu_blocks, kv.num_cpu_blocks, kv.policy, kv.clock)
            return
        if report.bad and self.config.cache.persist_strict:
            raise CacheError(f"{path}: {report.bad} saved KV blocks fail their checksum")
        if report.bad:
            log.warning("%d saved KV blocks failed their checksum and were dropped (recomputed when needed)",
                        report.bad)
        if report.loaded or report.bad:
            log.info("loaded %d cached KV blocks from %s", report.loaded, path)

    def _fingerprint(self) -> str:
        from pensieve.cache.persist import model_fingerprint
        from pensieve.model.loader import resolve_model_path

        return model_fingerprint(resolve_model_path(self.config.model.model), self.runner.dtype,
                                 self.config.cache.block_size)

    def check_integrity(self) -> None:
        self.flush_transfers()
        self.kv.check_integrity()

    # ------------------------------------------------------------ driving loops (engine thread or process)
    def idle_check(self) -> None:
        """Once per idle spell: both pools must add up (free + cached + used); a failure is logged."""
        try:
            self.check_integrity()  # flushes the swap-outs still in flight first
        except CacheIntegrityError:
            log.exception("KV cache integrity check failed")

    def step_or_abort(self, in_flight: Iterable[str]) -> tuple[list[RequestOutput], str | None]:
        """step(); if it raises, keep serving: abort `in_flight` (their blocks are freed) and return
        the error text for their callers instead of outputs."""
        try:
            return self.step(), None
        except Exception as exc:
            log.exception("engine step failed")
            if self.failure is not None:
                # a tensor-parallel rank is gone: nothing more runs on the devices (a sync could wait
                # forever on its collectives); free the requests' blocks and stop
                self._inflight = None
            elif self.device.type == "cuda":
                # a step launched before the failure may still write its requests' blocks: let it land
                # before they are freed (and reused by copies on the other streams)
                torch.cuda.synchronize(self.device)
            for rid in in_flight:
                self.abort_request(rid)
            return [], f"engine step failed: {exc}"

    @property
    def failure(self) -> str | None:
        """Why this engine can step no more (a tensor-parallel rank died), or None while it can."""
        return self.executor.failure

    def close(self, in_flight: Iterable[str]) -> tuple[list[RequestOutput], int | None]:
        """Shutdown: abort `in_flight` (their final outputs are returned for their callers) and, with a
        persist_path, save the cache there, since it outlives the process. Returns the outputs and the
        number of blocks saved (None: not saved)."""
        if self.failure is not None:   # nothing can be read back or saved from a group with a dead rank
            self._inflight = None
            outputs = [out for rid in in_flight if (out := self.abort_request(rid)) is not None]
            self.shutdown()
            return outputs, None
        outputs = self._resolve(self._inflight) if self._inflight is not None else []
        self._inflight = None
        outputs += [out for rid in in_flight if (out := self.abort_request(rid)) is not None]
        path = self.config.cache.persist_path
        if path is None:
            self.shutdown()
            return outputs, None
        from pensieve.cache.persist import CacheError

        try:
            return outputs, self.save_cache(path)
        except CacheError as exc:   # a full disk, ...: the previous save stays current
            log.error("%s", exc)
            return outputs, None
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks, if any (idempotent); the engine serves no more steps."""
        self.executor.shutdown()

    def _postprocess(self, plan: StepPlan, result) -> list[RequestOutput]:
        now = time.monotonic()
        outputs: list[RequestOutput] = []
        sampled = iter(range(len(result.token_ids)))
        for chunk in plan.chunks:
            seq = chunk.seq
            i = next(sampled) if chunk.sample else -1
            t = self._tracked.get(seq.request_id)
            if t is None or t.seq is not seq:
                continue  # stopped or aborted while this overlapped step ran: its row is dropped
            if t.metrics.first_scheduled_time is None:
                t.metrics.first_scheduled_time = now
                self._prompt_tokens += seq.num_prompt_tokens
            if chunk.sample:  # first: block keys hash the real token, never a placeholder
                seq.append_token(result.token_ids[i], self.config.cache.block_size)
            self.scheduler.commit_computed(chunk)
            if not chunk.sample:
                continue
            token = result.token_ids[i]
            self._generation_tokens += 1
            if t.metrics.first_token_time is None:
                t.metrics.first_token_time = now
            if t.logprobs is not None and result.logprobs is not None:
                t.logprobs.append(result.logprobs[i])
            t.detok.append([token])
            stop = t.stop.check(seq.num_output_tokens, token, t.detok.text, seq.num_prompt_tokens)
            if stop is None:
                if t.stream or seq.num_output_tokens == 1:
                    outputs.append(self._output(t, None, None, finished=False))
                continue
            if stop.truncate_to is None:
                t.detok.flush()  # emit a held-back partial character
            self.scheduler.finish(seq)
            if seq.conversation_id is not None:
                # the last sampled token's KV was never computed: its block is not cached
                computed_blocks = (seq.num_tokens - 1) // self.config.cache.block_size
                self.kv.record_conversation(seq.conversation_id, seq.block_keys[:computed_blocks], seq.token_ids)
            del self._tracked[seq.request_id]
            self._finished += 1
            t.metrics.finished_time = now
            outputs.append(self._output(t, stop.finish_reason, stop.stop_reason, finished=True,
                                        truncate_to=stop.truncate_to))
        return outputs

    def _output(self, t: _Tracked, finish_reason, stop_reason, finished: bool,
                truncate_to: int | None = None) -> RequestOutput:
        seq = t.seq
        text = t.detok.text
        end = truncate_to if truncate_to is not None else len(text) if finished else t.stop.safe_text_len(text)
        if t.stream:   # only what is new: a stream costs O(its length) in all, not O(length^2)
            end = max(end, t.sent_text)   # held-back text is never taken back once sent
            new_text, ids, logprobs = text[t.sent_text:end], seq.token_ids[t.sent_ids:], t.logprobs
            t.sent_text, t.sent_ids = end, seq.num_tokens
            if t.logprobs is not None:
                t.logprobs = []
        else:
            new_text, ids = text[:end], seq.token_ids[seq.num_prompt_tokens:]
            logprobs = list(t.logprobs) if t.logprobs is not None else None
        completion = CompletionOutput(0, new_text, ids, finish_reason, stop_reason, logprobs)
        return RequestOutput(seq.request_id, t.prompt_token_ids, [completion], finished,
                             seq.cache, t.metrics, seq.conversation_id)

    # ------------------------------------------------------------ visibility
    def stats(self) -> EngineStats:
        c = self.kv.counters
        messages, message_seconds = self.executor.message_stats()
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            gpu_blocks_total=self.kv.num_gpu_blocks, gpu_blocks_used=self.kv.num_used_gpu,
            gpu_blocks_cached=self.kv.num_cached_gpu, cpu_blocks_total=self.kv.num_cpu_blocks,
            cpu_blocks_used=self.kv.num_used_cpu, prompt_tokens=self._prompt_tokens,
            generation_tokens=self._generation_tokens, gpu_hit_tokens=c.gpu_hit_tokens,
            cpu_hit_tokens=c.cpu_hit_tokens, recomputed_tokens=c.recomputed_tokens,
            swapped_out_blocks=c.swapped_out_blocks, swapped_in_blocks=c.swapped_in_blocks,
            dropped_blocks=c.dropped_blocks, preemptions=self.scheduler.num_preemptions,
            finished_requests=self._finished, num_conversations=len(self.kv.conversations),
            **{f"steps_{k}": n for k, n in self._step_counts.items()},
            **{f"step_seconds_{k}": t for k, t in self._step_seconds.items()},
            **{f"step_gpu_seconds_{k}": t for k, t in self._step_gpu_seconds.items()}, slow_steps=self._slow_steps,
            steps_overlapped=self._overlapped, **{f"not_overlapped_{k}": n for k, n in self._not_overlapped.items()},
            rank_messages=messages, rank_message_seconds=message_seconds)
