"""Moves blocks between the tiers on a side stream, layer by layer.

Swap-ins record one event per layer; layer l's attention waits only for
event l (pipelined with the forward). Eviction copies whose GPU blocks are
reused this step must land before the forward starts. Ahead-of-time
swap-outs run behind everything else and are never waited for on the hot
path: each step's group records an event, polled at later steps, and the
cache manager unpins a group's blocks once its event has fired.
On the CPU every copy is synchronous and nothing needs waiting.
"""
from __future__ import annotations

from collections import deque
from typing import Callable

import torch

from pensieve.cache.manager import TransferPlan
from pensieve.kernels import copy_blocks


class KVTransfer:
    def __init__(self, gpu_tier: torch.Tensor, cpu_tier: torch.Tensor, pipelined: bool = True) -> None:
        self.gpu = gpu_tier       # [L, NB, 2, bs, Hkv, D] on the device
        self.cpu = cpu_tier       # [L, NC, 2, bs, Hkv, D] pinned host memory
        self.num_layers = gpu_tier.shape[0]
        self.pipelined = pipelined
        self.on_cuda = gpu_tier.is_cuda
        self.stream = torch.cuda.Stream(device=gpu_tier.device) if self.on_cuda else None
        self._swap_outs: deque[torch.cuda.Event | None] = deque()  # one per step that swapped out, oldest first

    def _ids(self, ids: list[int]) -> torch.Tensor:
        t = torch.tensor(ids, dtype=torch.int64, pin_memory=self.on_cuda)
        return t.to(self.gpu.device, non_blocking=True) if self.on_cuda else t

    def _copy(self, pairs: list[tuple[int, int]], src: torch.Tensor, dst: torch.Tensor,
              events: list | None = None) -> None:
        s_ids = self._ids([p[0] for p in pairs])
        d_ids = self._ids([p[1] for p in pairs])
        for layer in range(self.num_layers):
            copy_blocks(src[layer], dst[layer], s_ids, d_ids)
            if events is not None:
                events[layer].record(self.stream)

    def start(self, plan: TransferPlan) -> Callable[[int], None] | None:
        """Issue the step's copies; returns the per-layer wait the forward must call (or None)."""
        if not plan:
            return None
        if not self.on_cuda:
            if plan.evict_out:
                self._copy(plan.evict_out, self.gpu, self.cpu)
            if plan.swap_in:
                self._copy([(c, g) for c, g in plan.swap_in], self.cpu, self.gpu)
            if plan.swap_out:
                self._copy(plan.swap_out, self.gpu, self.cpu)
                self._swap_outs.append(None)
            return None
        compute = torch.cuda.current_stream()
        self.stream.wait_stream(compute)  # blocks read or overwritten here were last touched by earlier steps
        layer_events = None
        with torch.cuda.stream(self.stream):
            if plan.evict_out:
                self._copy(plan.evict_out, self.gpu, self.cpu)
                evicted = torch.cuda.Event()
                evicted.record(self.stream)
                compute.wait_event(evicted)
            if plan.swap_in:
                layer_events = [torch.cuda.Event() for _ in range(self.num_layers)]
                self._copy(plan.swap_in, self.cpu, self.gpu, layer_events)
            if plan.swap_out:
                self._copy(plan.swap_out, self.gpu, self.cpu)
                done = torch.cuda.Event()
                done.record(self.stream)
                self._swap_outs.append(done)
        if layer_events is None:
            return None
        if not self.pipelined:
            compute.wait_event(layer_events[-1])
            return None
        return lambda layer: torch.cuda.current_stream().wait_event(layer_events[layer])

    def settle(self, ran_forward: bool) -> None:
        """Step end. A forward waited for the step's swap-ins and eviction copies, and the step's
        results were read, so those are done; without a forward, wait for them here."""
        if self.on_cuda and not ran_forward:
            self.stream.synchronize()

    def completed_swap_outs(self) -> int:
        """How many of the oldest outstanding swap-out groups have landed (without blocking)."""
        n = 0
        while self._swap_outs and (self._swap_outs[0] is None or self._swap_outs[0].query()):
            self._swap_outs.popleft()
            n += 1
        return n

    def wait_swap_outs(self) -> int:
        """Block until every outstanding swap-out has landed (idle time, shutdown, checks)."""
        n = len(self._swap_outs)
        for event in self._swap_outs:
            if event is not None:
                event.synchronize()
        self._swap_outs.clear()
        return n
