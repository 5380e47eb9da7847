"""Rank 0 -> other ranks: one message per runner call, over the group's gloo (CPU) process group.

A message is a fixed header broadcast (kind, payload length, swap-out groups retired) and, when there is
a payload, one more broadcast of it. A step's payload is its batch and transfer plan packed as raw int64
arrays (a few KB for a decode step; no pickling on the per-step path). Rare calls (profiling, saving the
cache) carry a pickled (method, args). Receiving ranks block in the broadcast while rank 0 is idle, so
the group's timeout is long; a rank that dies closes its sockets and the others' broadcast fails.
"""
from __future__ import annotations

import enum
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pensieve.cache.manager import TransferPlan
from pensieve.engine.batch import StepBatch
from pensieve.engine.model_runner import StepInput


class Kind(enum.IntEnum):
    STEP = 1
    CALL = 2
    SHUTDOWN = 3


@dataclass(frozen=True)
class Message:
    kind: Kind
    step: StepInput | None = None               # STEP
    call: tuple[str, tuple] | None = None       # CALL: (runner method, args)
    retired_swap_outs: int = 0                  # swap-out groups rank 0 saw land since its last message


def pack_arrays(arrays: list[np.ndarray]) -> np.ndarray:
    """[count, (ndim, *shape) per array, data...] as one int64 array."""
    head = [len(arrays)]
    for a in arrays:
        head += [a.ndim, *a.shape]
    return np.concatenate([np.array(head, np.int64)] + [a.astype(np.int64, copy=False).ravel() for a in arrays])


def unpack_arrays(buf: np.ndarray) -> list[np.ndarray]:
    count, i = int(buf[0]), 1
    shapes = []
    for _ in range(count):
        ndim = int(buf[i])
        shapes.append(tuple(int(d) for d in buf[i + 1:i + 1 + ndim]))
        i += 1 + ndim
    out = []
    for shape in shapes:
        n = int(np.prod(shape))
        out.append(buf[i:i + n].reshape(shape))
        i += n
    return out


def _pairs(pairs: list[tuple[int, int]]) -> np.ndarray:
    return np.array(pairs, np.int64).reshape(-1, 2)


def encode_step(step: StepInput) -> np.ndarray:
    b, t = step.batch, step.transfers
    flags = np.array([b is not None, b is not None and b.as_rows, step.swap_in_now, step.ids_on_device], np.int64)
    arrays = [flags, _pairs(t.swap_in), _pairs(t.swap_out), _pairs(t.evict_out)]
    if b is not None:
        arrays += [b.input_ids, b.positions, b.query_start_loc, b.seq_lens, b.block_tables, b.slot_mapping,
                   b.logits_rows]
    return pack_arrays(arrays)


def decode_step(buf: np.ndarray) -> StepInput:
    arrays = unpack_arrays(buf)
    flags, swap_in, swap_out, evict_out = arrays[:4]
    transfers = TransferPlan([tuple(p) for p in swap_in.tolist()], [tuple(p) for p in swap_out.tolist()],
                             [tuple(p) for p in evict_out.tolist()])
    batch = None
    if flags[0]:
        ids, pos, qsl, lens, tables, slots, rows = arrays[4:]
        batch = StepBatch(ids, pos, qsl.astype(np.int32), lens.astype(np.int32), tables.astype(np.int32), slots,
                          rows, as_rows=bool(flags[1]))
    return StepInput(batch, transfers, swap_in_now=bool(flags[2]), ids_on_device=bool(flags[3]))


class StepChannel:
    """Both ends of the message stream: rank 0 sends, the other ranks receive."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self._header = torch.zeros(3, dtype=torch.int64)

    def send(self, msg: Message) -> None:
        if msg.kind is Kind.STEP:
            payload = torch.from_numpy(encode_step(msg.step))
        elif msg.kind is Kind.CALL:
            payload = torch.frombuffer(bytearray(pickle.dumps(msg.call)), dtype=torch.uint8)
        else:
            payload = None
        n = 0 if payload is None else payload.numel()
        self._header.copy_(torch.tensor([int(msg.kind), n, msg.retired_swap_outs]))
        dist.broadcast(self._header, src=0, group=self.group)
        if payload is not None:
            dist.broadcast(payload, src=0, group=self.group)

    def recv(self) -> Message:
        dist.broadcast(self._header, src=0, group=self.group)
        kind, n, retired = (int(x) for x in self._header.tolist())
        kind = Kind(kind)
        if kind is Kind.STEP:
            payload = torch.empty(n, dtype=torch.int64)
            dist.broadcast(payload, src=0, group=self.group)
            return Message(kind, step=decode_step(payload.numpy()), retired_swap_outs=retired)
        if kind is Kind.CALL:
            payload = torch.empty(n, dtype=torch.uint8)
            dist.broadcast(payload, src=0, group=self.group)
            return Message(kind, call=pickle.loads(payload.numpy().tobytes()), retired_swap_outs=retired)
        return Message(kind, retired_swap_outs=retired)
