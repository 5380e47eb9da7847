"""A minimal paged KV cache for model tests: shuffled blocks, block tables, slot mapping, metadata."""
from __future__ import annotations

import random

import torch

from pensieve.model.loader import model_kv_spec
from pensieve.kernels.metadata import AttentionMetadata


class PagedSeqs:
    """Holds sequences' KV in a paged cache and runs model steps over ragged batches of them.

    Blocks are handed out from a shuffled free list, so a sequence's blocks are
    neither contiguous nor in order.
    """

    def __init__(self, model: torch.nn.Module, config, num_blocks: int = 64, block_size: int = 4, seed: int = 0) -> None:
        spec = model_kv_spec(config)
        param = next(model.parameters())
        self.model, self.block_size, self.device = model, block_size, param.device
        self.kv_caches = [
            torch.zeros(num_blocks, 2, block_size, spec.num_kv_heads, spec.head_dim, dtype=param.dtype, device=param.device)
            for _ in range(spec.num_layers)
        ]
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    def step(self, batch: list[tuple[int, list[int], list[int] | None]]) -> list[torch.Tensor]:
        """batch: (seq id, new token ids, their positions or None = appended). Returns per-seq logits [L, vocab]."""
        ids, meta = self.prepare(batch)
        with torch.inference_mode():
            hidden = self.model(ids, meta.positions, self.kv_caches, meta)
            logits = self.model.compute_logits(hidden)
        return list(logits.split([len(b[1]) for b in batch]))

    def prepare(self, batch: list[tuple[int, list[int], list[int] | None]]) -> tuple[torch.Tensor, AttentionMetadata]:
        """Allocate blocks for the new tokens; (input ids [T], metadata) of the step."""
        ids, positions, slots, starts, seq_lens, tables = [], [], [], [0], [], []
        for seq, tokens, pos in batch:
            cur = self.lens.get(seq, 0)
            pos = list(range(cur, cur + len(tokens))) if pos is None else pos
            table = self.tables.setdefault(seq, [])
            new_len = max(cur, max(pos) + 1)
            while len(table) * self.block_size < new_len:
                table.append(self.free.pop())
            self.lens[seq] = new_len
            ids += tokens
            positions += pos
            slots += [table[p // self.block_size] * self.block_size + p % self.block_size for p in pos]
            starts.append(starts[-1] + len(tokens))
            seq_lens.append(new_len)
            tables.append(table)
        width = max(len(t) for t in tables)
        dev = self.device
        meta = AttentionMetadata(
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_size=self.block_size,
            max_query_len=max(len(b[1]) for b in batch),
            max_seq_len=max(seq_lens),
            decode_only=all(len(b[1]) == 1 for b in batch),
        )
        return torch.tensor(ids, dtype=torch.int64, device=dev), meta

    def scramble(self, seq: int, positions: range) -> None:
        """Overwrite the cached KV of `positions` with noise (a dropped prefix that must be recomputed)."""
        table = self.tables[seq]
        for p in positions:
            for cache in self.kv_caches:
                cache[table[p // self.block_size], :, p % self.block_size].normal_()
