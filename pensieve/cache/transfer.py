"""Moves blocks between the tiers on a side stream, layer by layer.

Swap-ins record one event per layer; layer l's attention waits only for
event l (pipelined with the forward). Runs of consecutive blocks go through
the copy engines, which take no SMs from the forward, and are issued whole at
the forward's first layer wait; the gather kernel's per-layer launches are
issued `lookahead` layers ahead of the layer the forward is launching. Nothing
bulk is issued before the forward's first layer: the step's small metadata
uploads ride the same host-to-device copy engine, and on the H100 uploads
queued behind bulk copies hold the whole forward back, so that no copy hides
(benchmarks/results/engine-tuning/copy-overlap-75e97c5/probe_log.txt). Eviction copies
whose GPU blocks are reused this step must land before the forward starts.
Ahead-of-time swap-outs run behind everything else on a stream of their own
(PCIe is full duplex, and a large swap-out must not hold up the next swap-in
queued behind it), and are never waited for on the hot path: each step's
group records an event, polled at later steps, and the cache manager unpins a
group's blocks once its event has fired.
On the CPU every copy is synchronous and nothing needs waiting.
"""
from __future__ import annotations

from collections import deque
from typing import Callable

import torch

from pensieve.cache.manager import TransferPlan
from pensieve.kernels import copy_blocks


def block_runs(pairs: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(src, dst, count) runs of pairs consecutive on both sides."""
    runs: list[tuple[int, int, int]] = []
    for s, d in pairs:
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


class _Copy:
    """One group of block pairs, moved layer by layer: by the copy engines (one cudaMemcpyAsync
    per run of consecutive blocks and layer) when a forward waits on it layer by layer and the
    pairs form few runs, since DMA takes no SMs from that forward; else by the gather kernel, one
    launch per layer, or one launch for every layer when nothing waits on single layers.
    dma=False (deferred swap-ins, eviction copies, swap-outs) keeps the one-launch kernel:
    DMA would cost the host runs x layers calls (hundreds) in the step, and serving is host-bound
    (on the H100, with DMA for every copy, one serving run read 0.040 s/token against 0.029 with
    the kernel, across machines and not isolated: benchmarks/results/HISTORY.md, Measured and
    dropped). `swap_dma_deferred` sends deferred swap-ins to the copy engines too, an A/B that
    gains nothing on OPT-13B's 13 MB blocks (benchmarks/results/multiturn/opt-13b-kv40-dmadefer-r16/)."""

    def __init__(self, transfer: "KVTransfer", pairs: list[tuple[int, int]], src: torch.Tensor,
                 dst: torch.Tensor, dma: bool = True) -> None:
        self.src, self.dst = src, dst
        self.runs = block_runs(pairs)
        self.use_dma = dma and len(self.runs) <= transfer.dma_max_runs
        if not self.use_dma:
            self.s_ids = transfer._ids([p[0] for p in pairs])
            self.d_ids = transfer._ids([p[1] for p in pairs])

    def layer(self, layer: int) -> None:
        src, dst = self.src[layer], self.dst[layer]
        if self.use_dma:
            for s, d, n in self.runs:
                dst[d:d + n].copy_(src[s:s + n], non_blocking=True)
        else:
            copy_blocks(src, dst, self.s_ids, self.d_ids)

    def all_layers(self) -> None:
        if self.use_dma:
            for layer in range(self.src.shape[0]):
                self.layer(layer)
            return
        # A tier [L, NB, ...] is one pool of L * NB blocks: block b of layer l is row l * NB + b.
        layers = torch.arange(self.src.shape[0], device=self.s_ids.device)[:, None]
        s_ids = (layers * self.src.shape[1] + self.s_ids[None, :]).reshape(-1)
        d_ids = (layers * self.dst.shape[1] + self.d_ids[None, :]).reshape(-1)
        copy_blocks(self.src.flatten(0, 1), self.dst.flatten(0, 1), s_ids, d_ids)


class KVTransfer:
    def __init__(self, gpu_tier: torch.Tensor, cpu_tier: torch.Tensor, pipelined: bool = True,
                 dma_max_runs: int = 0, lookahead_layers: int = 2, dma_deferred: bool = False) -> None:
        self.gpu = gpu_tier       # [L, NB, 2, bs, Hkv, D] on the device
        self.cpu = cpu_tier       # [L, NC, 2, bs, Hkv, D] pinned host memory
        self.num_layers = gpu_tier.shape[0]
        self.pipelined = pipelined
        self.dma_max_runs = dma_max_runs
        self.dma_deferred = dma_deferred  # deferred swap-ins by copy engines too (an A/B; default: the kernel)
        # Swap-ins are issued this many layers ahead of the layer the forward is launching, so the
        # host's issue work overlaps the GPU's forward instead of preceding it.
        self.lookahead = max(1, lookahead_layers)
        self.on_cuda = gpu_tier.is_cuda
        self.stream = torch.cuda.Stream(device=gpu_tier.device) if self.on_cuda else None       # swap-in, eviction
        self.out_stream = torch.cuda.Stream(device=gpu_tier.device) if self.on_cuda else None   # ahead-of-time swap-out
        self._swap_outs: deque[torch.cuda.Event | None] = deque()  # one per step that swapped out, oldest first
        self._swap_in: _Copy | None = None      # this step's swap-in, issued up to layer _issued
        self._issued = 0
        self._events: list[torch.cuda.Event] = []
        self._deferred_out: _Copy | None = None  # this step's swap-out, issued after the last swap-in layer
        self._deferred_in: _Copy | None = None   # a swap-in for the next step, issued whole after this forward
        self._next_step_waits: torch.cuda.Event | None = None  # swap-ins issued for the next step

    def _ids(self, ids: list[int]) -> torch.Tensor:
        t = torch.tensor(ids, dtype=torch.int64, pin_memory=self.on_cuda)
        return t.to(self.gpu.device, non_blocking=True) if self.on_cuda else t

    def start(self, plan: TransferPlan, used_now: bool = True) -> Callable[[int], None] | None:
        """Issue the step's copies; returns the per-layer wait the forward must call (or None).
        used_now=False: no chunk of this step reads the swapped-in blocks; they land behind this
        step's forward and the next step's work waits for them (long done by then)."""
        if self.on_cuda and self._next_step_waits is not None:
            torch.cuda.current_stream().wait_event(self._next_step_waits)
            self._next_step_waits = None
        if not plan:
            return None
        if not self.on_cuda:
            if plan.evict_out:
                _Copy(self, plan.evict_out, self.gpu, self.cpu).all_layers()
            if plan.swap_in:
                _Copy(self, plan.swap_in, self.cpu, self.gpu).all_layers()
            if plan.swap_out:
                _Copy(self, plan.swap_out, self.gpu, self.cpu).all_layers()
                self._swap_outs.append(None)
            return None
        compute = torch.cuda.current_stream()
        self.stream.wait_stream(compute)  # blocks read or overwritten here were last touched by earlier steps
        if plan.swap_out:
            self.out_stream.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            if plan.evict_out:
                _Copy(self, plan.evict_out, self.gpu, self.cpu, dma=False).all_layers()
                evicted = torch.cuda.Event()
                evicted.record(self.stream)
                compute.wait_event(evicted)
            out = _Copy(self, plan.swap_out, self.gpu, self.cpu, dma=False) if plan.swap_out else None
            if not plan.swap_in:
                if out is not None:
                    self._issue_swap_out(out)
                return None
            copy_in = self._swap_in_copy(plan.swap_in, used_now)
        if not used_now:  # issued whole by issue_rest(), once this step's forward is launched
            self._deferred_in, self._deferred_out = copy_in, out
            return None
        self._swap_in, self._issued, self._deferred_out = copy_in, 0, out
        self._events = [torch.cuda.Event() for _ in range(self.num_layers)]
        if not self.pipelined:
            self._issue_through(self.num_layers - 1)
            compute.wait_event(self._events[-1])
            return None
        return self._wait_for_layer  # layer 0's wait issues the first copies, after the step's uploads

    def _swap_in_copy(self, pairs: list[tuple[int, int]], used_now: bool) -> _Copy:
        """A swap-in that a forward waits on layer by layer may take the copy engines; a deferred one
        only with dma_deferred."""
        return _Copy(self, pairs, self.cpu, self.gpu, dma=used_now or self.dma_deferred)

    def _issue_through(self, layer: int) -> None:
        """Issue the swap-in up to `layer`; after its last layer, the deferred swap-out."""
        if self._swap_in is None:
            return
        with torch.cuda.stream(self.stream):
            while self._issued <= min(layer, self.num_layers - 1):
                self._swap_in.layer(self._issued)
                self._events[self._issued].record(self.stream)
                self._issued += 1
            if self._issued == self.num_layers:
                self._swap_in = None
                if self._deferred_out is not None:
                    self._issue_swap_out(self._deferred_out)
                    self._deferred_out = None

    def _issue_swap_out(self, copy: _Copy) -> None:
        # A CPU block this swap-out writes may have been the source of a swap-in issued earlier
        # (its pin ends with that step, not with the copy): land every issued swap-in first.
        self.out_stream.wait_stream(self.stream)
        with torch.cuda.stream(self.out_stream):
            copy.all_layers()
            done = torch.cuda.Event()
            done.record(self.out_stream)
        self._swap_outs.append(done)

    def _wait_for_layer(self, layer: int) -> None:
        # DMA copies take no SMs: issued together at the first layer they hide 88-94% behind the
        # forward on the H100, one layer at a time 63-89% (benchmarks/results/engine-tuning/fused-async-76c3b02/
        # engine.md, dma-all vs dma). Kernel copies compete with the forward for SMs and go
        # `lookahead` layers ahead.
        ahead = self.num_layers if self._swap_in is not None and self._swap_in.use_dma else self.lookahead
        self._issue_through(layer + ahead)
        torch.cuda.current_stream().wait_event(self._events[layer])

    def issue_rest(self) -> None:
        """Issue whatever of this step's copies is still held back (the forward is launched)."""
        if not self.on_cuda:
            return
        if self._deferred_in is not None:
            with torch.cuda.stream(self.stream):
                self._deferred_in.all_layers()
                landed = torch.cuda.Event()
                landed.record(self.stream)
            self._next_step_waits, self._deferred_in = landed, None  # the next step's work waits for it
            if self._deferred_out is not None:
                self._issue_swap_out(self._deferred_out)
                self._deferred_out = None
        self._issue_through(self.num_layers - 1)

    def settle(self, ran_forward: bool) -> None:
        """Step launched. A forward waits for the step's swap-ins and eviction copies, so they are
        done once its sampled tokens are (the cache manager unpins them only then, at the step's
        read-back); without a forward, wait for them here."""
        if not self.on_cuda:
            return
        self.issue_rest()  # a forward that skipped some layer's wait, or a step without a forward
        if not ran_forward:
            self.stream.synchronize()

    def synchronize(self) -> None:
        """Issue every planned copy and wait for both streams (a step that failed midway): the cache
        manager's plan counted on them, and the blocks they write are freed only after they land."""
        if self.on_cuda:
            self.issue_rest()
            self.stream.synchronize()
            self.out_stream.synchronize()

    def completed_swap_outs(self) -> int:
        """How many of the oldest outstanding swap-out groups have landed (without blocking)."""
        n = 0
        while self._swap_outs and (self._swap_outs[0] is None or self._swap_outs[0].query()):
            self._swap_outs.popleft()
            n += 1
        return n

    def retire_swap_outs(self, num_groups: int) -> None:
        """Tensor parallelism, ranks other than 0: rank 0's cache manager saw its oldest `num_groups`
        swap-out groups land and may reuse their blocks from the next step on. This rank's copies of
        those groups may still run: later work on both streams waits for them on the device."""
        for _ in range(min(num_groups, len(self._swap_outs))):
            done = self._swap_outs.popleft()
            if done is not None:
                torch.cuda.current_stream().wait_event(done)
                self.stream.wait_event(done)

    def wait_swap_outs(self) -> int:
        """Block until every outstanding swap-out has landed (idle time, shutdown, checks)."""
        n = len(self._swap_outs)
        for event in self._swap_outs:
            if event is not None:
                event.synchronize()
        self._swap_outs.clear()
        return n
