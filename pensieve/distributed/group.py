"""A rank's view of its tensor-parallel group: rank, size and the collectives the sharded model needs.

Passed explicitly to every layer that shards (no global state). Size 1 is the single-GPU engine: every
collective returns its input and no process group exists.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelGroup:
    rank: int = 0
    size: int = 1
    device_group: Any = None   # model collectives: NCCL on CUDA, gloo on the CPU
    cpu_group: Any = None      # gloo: step messages from rank 0 and host-side agreement

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (a row-parallel linear's partial outputs)."""
        if self.size > 1:
            dist.all_reduce(x, group=self.device_group)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Concatenate every rank's `x` along the last dim on rank 0 (vocab-parallel logits); None elsewhere."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.is_first else None
        dist.gather(x, parts, dst=0, group=self.device_group)
        return torch.cat(parts, dim=-1) if parts is not None else None

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` on every rank, in place (token ids sampled on rank 0's device)."""
        if self.size > 1:
            dist.broadcast(x, src=0, group=self.device_group)
        return x

    def min_int(self, value: int) -> int:
        """The smallest of every rank's `value` (e.g. KV blocks that fit on every GPU)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())

    def gather_objects(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` (picklable, small, rare: not for the per-step path) on rank 0, by rank."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size if self.is_first else None
        dist.gather_object(obj, out, dst=0, group=self.cpu_group)
        return out

    def any_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Element-wise OR of a bool mask over ranks (e.g. saved blocks damaged on any rank)."""
        if self.size == 1:
            return mask
        t = mask.to(torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return t.bool()


SINGLE = ParallelGroup()


def split_evenly(total: int, size: int, what: str) -> int:
    """`total` split over `size` ranks; a clear error when it does not divide."""
    if total % size:
        raise ValueError(f"{what} ({total}) is not divisible by the tensor-parallel size {size}")
    return total // size


@dataclass(frozen=True)
class HeadShard:
    """This rank's attention heads: query heads [q_start, q_start + num_q) and KV heads
    [kv_start, kv_start + num_kv) of the checkpoint. With fewer KV heads than ranks each KV head is
    replicated on size // num_kv_heads ranks, as vLLM does."""
    num_q: int
    q_start: int
    num_kv: int
    kv_start: int

    @classmethod
    def of(cls, num_heads: int, num_kv_heads: int, tp: ParallelGroup) -> HeadShard:
        num_q = split_evenly(num_heads, tp.size, "num_attention_heads")
        if num_kv_heads >= tp.size:
            num_kv = split_evenly(num_kv_heads, tp.size, "num_key_value_heads")
            kv_start = tp.rank * num_kv
        else:
            if tp.size % num_kv_heads:
                raise ValueError(f"the tensor-parallel size {tp.size} is not a multiple of num_key_value_heads "
                                 f"({num_kv_heads})")
            num_kv, kv_start = 1, tp.rank // (tp.size // num_kv_heads)
        return cls(num_q, tp.rank * num_q, num_kv, kv_start)
