"""Rank 0 of a tensor-parallel engine: starts ranks 1..N-1, then mirrors each runner call on them.

Every call that runs the model (a step, the Cost(l) profile) first goes to the other ranks as one
message (channel.py), then runs on rank 0's own ModelRunner; the model's collectives pair them up.
Rank 0 alone samples. A watchdog thread notices a rank that exits: the engine then fails with an
error naming it (never a hang), and every rank is torn down.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence as Seq
from multiprocessing.connection import wait as wait_for_processes
from pathlib import Path

import torch
import torch.distributed as dist

from pensieve.config import EngineConfig
from pensieve.distributed.channel import Kind, Message, StepChannel
from pensieve.distributed.worker import join_group, leave_group, rank_device, worker_main
from pensieve.engine.model_runner import LaunchedStep, ModelRunner, StepInput, StepResult
from pensieve.engine.sequence import Sequence

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 30.0


class RankFailure(RuntimeError):
    """A tensor-parallel rank failed to start or died: the engine cannot step any more."""


class TensorParallelExecutor:
    def __init__(self, config: EngineConfig, device: torch.device, max_model_len: int,
                 eos_token_ids: list[int]) -> None:
        from pensieve.engine.executor import load_runner

        size = config.tensor_parallel_size
        if device.type == "cuda" and torch.cuda.device_count() < (device.index or 0) + size:
            raise ValueError(f"tensor_parallel_size {size} needs {size} GPUs; {torch.cuda.device_count()} visible")
        self._dir = Path(tempfile.mkdtemp(prefix="pensieve-tp-"))
        rendezvous = str(self._dir / "rendezvous")
        ctx = mp.get_context("spawn")
        self._failure: str | None = None
        self._closing = False
        self._errors = []
        self._workers = []
        for rank in range(1, size):
            receive, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=worker_main, name=f"pensieve-rank-{rank}", daemon=True,
                               args=(rank, size, rendezvous, config, device, max_model_len, eos_token_ids, send,
                                     logging.getLogger().level))
            proc.start()
            send.close()
            self._workers.append(proc)
            self._errors.append(receive)
        self._watchdog = threading.Thread(target=self._watch, name="pensieve-tp-watchdog", daemon=True)
        self._watchdog.start()
        # at interpreter exit multiprocessing ends the ranks: that is no failure to report
        atexit.register(_closing_at_exit, weakref.ref(self))
        self.messages, self.message_seconds = 0, 0.0   # the cost of reaching the other ranks
        self._retired = 0
        try:
            self.tp = join_group(0, size, rendezvous, rank_device(device, 0))
            self.channel = StepChannel(self.tp.cpu_group)
            self.runner: ModelRunner = load_runner(config, rank_device(device, 0), max_model_len, eos_token_ids, self.tp)
        except BaseException as exc:
            failure = None if isinstance(exc, ValueError) else self._wait_for_failure()
            self._teardown(grace_s=0.0)
            if failure is not None:   # rank 0 failed because another rank did: name that one
                raise RankFailure(failure) from exc
            raise
        self.num_gpu_blocks = self.runner.num_gpu_blocks
        self.num_cpu_blocks = self.runner.num_cpu_blocks
        self.kv_bytes_per_token = self.runner.kv_bytes_per_token
        self.max_graph_rows = self.runner.max_graph_rows
        log.info("tensor parallel over %d ranks ready", size)

    # ------------------------------------------------------------ failures
    def _watch(self) -> None:
        """Wait for any worker to exit; unless rank 0 is closing the group, that is a failure."""
        sentinels = {p.sentinel: (rank, p) for rank, p in enumerate(self._workers, start=1)}
        while sentinels:
            for s in wait_for_processes(list(sentinels)):
                rank, proc = sentinels.pop(s)
                proc.join()
                if self._closing:
                    continue
                reason = ""
                try:
                    errors = self._errors[rank - 1]
                    if errors.poll():
                        reason = f": {errors.recv()}"
                except (EOFError, OSError):
                    pass
                self._failure = self._failure or (f"tensor-parallel rank {rank} exited with code {proc.exitcode}"
                                                  f"{reason}")
                log.error("%s; stopping every rank", self._failure)
                self._kill_workers()
                # Rank 0 may wait in a collective for the dead rank: gloo fails it at once (closed
                # sockets); NCCL needs its communicators aborted.
                if dist.is_initialized() and dist.get_backend() == "nccl":
                    try:
                        dist.distributed_c10d._abort_process_group()
                    except Exception:
                        log.exception("aborting the NCCL communicators failed")

    def _wait_for_failure(self, timeout: float = 5.0) -> str | None:
        """After a collective failed: give the watchdog time to see which rank died."""
        deadline = time.monotonic() + timeout
        while self._failure is None and time.monotonic() < deadline:
            if not any(p.is_alive() for p in self._workers):
                time.sleep(0.05)   # all gone: let the watchdog read their errors
                break
            time.sleep(0.05)
        return self._failure

    def _check(self) -> None:
        if self._failure is not None:
            raise RankFailure(self._failure)

    def _mirrored(self, fn, *args):
        """Run `fn` (rank 0's part of a call whose message went out) and turn a broken group into RankFailure."""
        try:
            return fn(*args)
        except Exception as exc:
            if self._wait_for_failure(timeout=2.0) is not None:
                raise RankFailure(self._failure) from exc
            raise

    def _send(self, msg: Message) -> None:
        self._check()
        t = time.perf_counter()
        self._mirrored(self.channel.send, msg)
        self._retired = 0
        self.messages += 1
        self.message_seconds += time.perf_counter() - t

    @property
    def failure(self) -> str | None:
        return self._failure

    @property
    def rank_processes(self) -> list[mp.Process]:
        """The processes of ranks 1..N-1, in rank order."""
        return list(self._workers)

    # ------------------------------------------------------------ the executor protocol
    def launch(self, step: StepInput, sample: Seq[Sequence] | None = None,
               input_ids: torch.Tensor | None = None) -> LaunchedStep:
        self._send(Message(Kind.STEP, step=step, retired_swap_outs=self._retired))
        return self._mirrored(self.runner.launch, step, sample, input_ids)

    def finish(self, step: LaunchedStep) -> StepResult:
        self._check()
        return self._mirrored(self.runner.finish, step)

    def sampled_ids(self, step: LaunchedStep, rows: list[int]) -> torch.Tensor:
        return self.runner.sampled_ids(step, rows)

    def completed_swap_outs(self) -> int:
        n = self.runner.completed_swap_outs()
        self._retired += n   # the other ranks make later copies wait for theirs (channel.Message)
        return n

    def wait_swap_outs(self) -> int:
        n = self.runner.wait_swap_outs()
        self._retired += n
        return n

    def sync_transfers(self) -> None:
        self.runner.sync_transfers()

    def time_block_recompute(self, context_len: int) -> float:
        return self._everywhere("time_block_recompute", context_len)

    # ------------------------------------------------------------ a saved cache: every rank's shard
    @property
    def tp_size(self) -> int:
        return self.tp.size

    def kv_block_layout(self):
        return self.runner.kv_block_layout()

    def write_kv_shards(self, directory, blocks):
        return self._everywhere("write_kv_shards", str(directory), blocks)

    def verify_kv_shards(self, directory, keys, checksums):
        return self._everywhere("verify_kv_shards", str(directory), keys, checksums)

    def read_kv_shards(self, directory, keys, checksums, tier, placements):
        return self._everywhere("read_kv_shards", str(directory), keys, checksums, tier, placements)

    def _everywhere(self, name: str, *args):
        self._send(Message(Kind.CALL, call=(name, args), retired_swap_outs=self._retired))
        return self._mirrored(getattr(self.runner, name), *args)

    def message_stats(self) -> tuple[int, float]:
        return self.messages, self.message_seconds

    def shutdown(self) -> None:
        """Stop every rank (idempotent): SHUTDOWN to the live group, else kill; no orphan, no leftover file."""
        if self._closing:
            return
        if self._failure is None:
            try:
                self.channel.send(Message(Kind.SHUTDOWN, retired_swap_outs=self._retired))
            except Exception:
                log.exception("telling the other ranks to stop failed; killing them")
        self._teardown()

    def _teardown(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        self._closing = True
        deadline = time.monotonic() + grace_s
        for p in self._workers:
            p.join(max(0.0, deadline - time.monotonic()))
        self._kill_workers()
        leave_group()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _kill_workers(self) -> None:
        for p in self._workers:
            if p.is_alive():
                p.kill()
        for p in self._workers:
            p.join(5)


def _closing_at_exit(ref: weakref.ref) -> None:
    executor = ref()
    if executor is not None:
        executor._closing = True
