"""Ranks 1..N-1 of a tensor-parallel engine: each loads its model shard and runs what rank 0 sends.

A worker has no scheduler, cache manager or sampler: it mirrors rank 0's ModelRunner call by call
(the same warm-ups and captures at start, then one `launch` per step), so every collective of the
sharded model meets its peers on the other ranks. It ends on rank 0's SHUTDOWN message, when rank 0's
process dies (the kernel kills it with its parent) or when the group breaks.
"""
from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
from datetime import timedelta
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from pensieve.config import EngineConfig
from pensieve.distributed.channel import Kind, StepChannel
from pensieve.distributed.group import ParallelGroup

log = logging.getLogger(__name__)

# Rank 0 may stay idle for as long as nobody sends a request: the other ranks wait for its next
# message in a broadcast that must not time out. A dead rank 0 ends them another way (below).
MESSAGE_TIMEOUT = timedelta(days=30)
# Joining the group and the model's collectives: long enough for the slowest rank's start-up work
# (loading a 70B shard, compiling kernels) between two collectives.
COLLECTIVE_TIMEOUT = timedelta(minutes=20)


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: the r-th GPU after the one rank 0 uses, or the CPU."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


def join_group(rank: int, size: int, rendezvous: str, device: torch.device) -> ParallelGroup:
    """Join the group (NCCL between GPUs, gloo on the CPU) and open the gloo group for step messages."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=rank, world_size=size,
                            timeout=COLLECTIVE_TIMEOUT, device_id=device if device.type == "cuda" else None)
    cpu_group = dist.new_group(backend="gloo", timeout=MESSAGE_TIMEOUT)
    return ParallelGroup(rank, size, dist.group.WORLD, cpu_group)


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def die_with_parent() -> None:
    """Ask Linux to kill this process when its parent dies, however it dies: no orphans. (The signal
    follows the parent *thread* that started it: engines start their ranks from the thread that builds them.)"""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except OSError:
        return
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:   # the parent died before the call above
        sys.exit(1)


def worker_main(rank: int, size: int, rendezvous: str, config: EngineConfig, device: torch.device,
                max_model_len: int, eos_token_ids: list[int], errors: Connection, log_level: int) -> None:
    die_with_parent()
    # Ctrl-C reaches the whole process group: rank 0 shuts the ranks down in order, so workers ignore it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s %(name)s [rank {rank}]: %(message)s")
    from pensieve.engine.executor import load_runner

    try:
        device = rank_device(device, rank)
        tp = join_group(rank, size, rendezvous, device)
        runner = load_runner(config, device, max_model_len, eos_token_ids, tp)
    except BaseException as exc:   # reported to rank 0, which names this rank in its error
        errors.send(f"{type(exc).__name__}: {exc}")
        raise SystemExit(1) from None
    try:
        serve(runner, StepChannel(tp.cpu_group))
    finally:
        leave_group()


# The runner methods rank 0 may ask every rank to run (besides steps).
MIRRORED_CALLS = frozenset({"time_block_recompute", "write_kv_shards", "verify_kv_shards", "read_kv_shards"})


def serve(runner, channel: StepChannel) -> None:
    """Run rank 0's messages on this rank's runner until SHUTDOWN."""
    while True:
        msg = channel.recv()
        if msg.retired_swap_outs:
            runner.transfer.retire_swap_outs(msg.retired_swap_outs)
        if msg.kind is Kind.STEP:
            runner.launch(msg.step)
        elif msg.kind is Kind.CALL:
            name, args = msg.call
            if name not in MIRRORED_CALLS:
                raise ValueError(f"rank 0 asked for an unknown call {name!r}")
            getattr(runner, name)(*args)
        else:
            runner.transfer.synchronize()
            return
