"""Random paged batches and an independent dense attention oracle for the kernel tests."""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

from pensieve.kernels.metadata import AttentionMetadata


# The tests build inputs on the CPU. Without a GPU the kernels run there under TRITON_INTERPRET=1;
# with one (PENSIEVE_TEST_DEVICE=cuda runs on the H100) compiled Triton needs CUDA tensors, so the
# kernel calls go through these shims and their results come back to the CPU for the checks.
ON_GPU = torch.cuda.is_available()


def to_kernel_device(x):
    if not ON_GPU:
        return x
    if isinstance(x, torch.Tensor):
        return x.cuda()
    if dataclasses.is_dataclass(x):
        return dataclasses.replace(x, **{f.name: getattr(x, f.name).cuda() for f in dataclasses.fields(x)
                                         if isinstance(getattr(x, f.name), torch.Tensor)})
    return x


def run_kernel(fn: Callable, *args, inplace: tuple[int, ...] = (), **kwargs):
    """fn(*args) on the kernel device; args at the `inplace` indices are written back to the CPU."""
    moved = [to_kernel_device(a) for a in args]
    out = fn(*moved, **kwargs)
    for i in inplace:
        if moved[i] is not args[i]:
            args[i].copy_(moved[i].cpu())
    return out.cpu() if isinstance(out, torch.Tensor) else out


def make_batch(
    seqs: list[tuple[int, list[int]]],   # per sequence: (seq_len, positions of its new tokens)
    block_size: int,
    num_blocks: int,
    device: str = "cpu",
    seed: int = 0,
) -> AttentionMetadata:
    """Metadata for sequences whose KV lives in shuffled (non-contiguous) blocks of the pool."""
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-seq_len // block_size) for seq_len, _ in seqs)
    needed = sum(-(-seq_len // block_size) for seq_len, _ in seqs)
    assert needed <= num_blocks
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros((len(seqs), max_blocks), dtype=torch.int32)
    positions, slots, starts, lens = [], [], [0], []
    used = 0
    for b, (seq_len, pos) in enumerate(seqs):
        assert pos == sorted(pos) and pos[-1] == seq_len - 1
        n = -(-seq_len // block_size)
        tables[b, :n] = perm[used:used + n].to(torch.int32)
        used += n
        positions += pos
        slots += [int(tables[b, p // block_size]) * block_size + p % block_size for p in pos]
        starts.append(starts[-1] + len(pos))
        lens.append(seq_len)
    return AttentionMetadata(
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        block_tables=tables.to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_size=block_size,
        max_query_len=max(len(p) for _, p in seqs),
        max_seq_len=max(lens),
        decode_only=all(len(p) == 1 for _, p in seqs),
        new_tokens_are_suffix=all(p == list(range(n - len(p), n)) for n, p in seqs),
        has_context=any(n > len(p) for n, p in seqs),
    )


def dense_attention(
    q: torch.Tensor,            # [T, Hq, D]
    kv_cache: torch.Tensor,     # [NB, 2, bs, Hkv, D]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:              # [T, Hq, D] float32
    """Per-query, per-head loop in float64: no shared code with the reference or the kernel."""
    T, num_heads, _ = q.shape
    bs, num_kv = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // num_kv
    out = torch.zeros(q.shape, dtype=torch.float64)
    starts = meta.query_start_loc.tolist()
    for b in range(meta.num_seqs):
        seq_len = int(meta.seq_lens[b])
        table = meta.block_tables[b].tolist()
        keys = torch.stack([kv_cache[table[j // bs], 0, j % bs] for j in range(seq_len)]).double()  # [S, Hkv, D]
        vals = torch.stack([kv_cache[table[j // bs], 1, j % bs] for j in range(seq_len)]).double()
        for t in range(starts[b], starts[b + 1]):
            p = int(meta.positions[t])
            for h in range(num_heads):
                kh = keys[: p + 1, h // group]                                     # [p+1, D]
                s = (kh @ q[t, h].double()) * scale
                w = torch.exp(s - s.max())
                out[t, h] = (w / w.sum()) @ vals[: p + 1, h // group]
    return out.float()


def random_cache(num_blocks: int, block_size: int, num_kv: int, head_dim: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((num_blocks, 2, block_size, num_kv, head_dim), generator=gen).to(dtype)


def random_q(T: int, num_heads: int, head_dim: int, dtype: torch.dtype, seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((T, num_heads, head_dim), generator=gen).to(dtype)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
