"""Building blocks shared by the model implementations: linears, norms, rotary embedding, weight loading.

Parameters are allocated with torch.empty (no random init): load_weights fills
every one of them, and skipping init makes building a 13B model on the GPU
instant. A model that is used without load_weights holds garbage.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pensieve.distributed.group import ParallelGroup, split_evenly
from pensieve.kernels import SmallLinearWorkspace, use_fused_kernels, use_small_batch_linear

logger = logging.getLogger(__name__)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, workspace: SmallLinearWorkspace) -> torch.Tensor:
    """x W^T + b. Decode-sized batches (<= 32 rows) on CUDA stream the weight through a Triton kernel
    (kernels/linear.py: 6% faster than cuBLAS over the 8B/13B weight shapes on the H100), the rest go to cuBLAS."""
    if use_small_batch_linear(x) and weight.stride(1) == 1:
        from pensieve.kernels.linear import small_batch_linear

        return small_batch_linear(x, weight, bias, workspace)
    return F.linear(x, weight, bias)


@dataclass(frozen=True)
class Shard:
    """A contiguous part of one checkpoint dimension: `size` rows (or columns) from `start`."""
    start: int
    size: int


def read_weight(source: Any, rows: Shard | None = None, cols: Shard | None = None) -> torch.Tensor:
    """The [rows, cols] part of a checkpoint tensor. `source` is a tensor, or a lazy safetensors slice
    (loader.iter_weights), of which only that part is read from disk."""
    if isinstance(source, torch.Tensor):
        t = source if rows is None else source.narrow(0, rows.start, rows.size)
        return t if cols is None else t.narrow(1, cols.start, cols.size)
    r = slice(None) if rows is None else slice(rows.start, rows.start + rows.size)
    if cols is None:
        return source[r]
    return source[r, cols.start:cols.start + cols.size]


class Linear(nn.Module):
    """y = x W^T + b, or this rank's shard of a tensor-parallel linear.

    `output_sizes` lists this rank's rows of each stacked sub-matrix of a fused linear (qkv, gate_up).
    Column-parallel: sub-matrix i's rows start at `output_starts[i]` in the checkpoint's sub-matrix, and
    the output stays sharded. Row-parallel (`reduce` set): the input columns are `input_shard` of the
    checkpoint's, the partial outputs are summed over the ranks, and the bias is added once, after the sum.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int | Sequence[int],
        bias: bool,
        dtype: torch.dtype,
        *,
        output_starts: Sequence[int] | None = None,
        input_shard: Shard | None = None,
        reduce: ParallelGroup | None = None,
    ) -> None:
        super().__init__()
        sizes = (out_features,) if isinstance(out_features, int) else tuple(out_features)
        self.output_sizes: tuple[int, ...] = sizes
        self.output_starts = tuple(output_starts) if output_starts is not None else None
        self.input_shard = input_shard
        self.reduce = reduce if reduce is not None and reduce.size > 1 else None
        self.weight = nn.Parameter(torch.empty(sum(sizes), in_features, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(sum(sizes), dtype=dtype), requires_grad=False) if bias else None
        self.workspace = SmallLinearWorkspace()

    @classmethod
    def column(cls, in_features: int, out_features: int | Sequence[int], bias: bool, dtype: torch.dtype,
               tp: ParallelGroup) -> Linear:
        """Every stacked sub-matrix split evenly by rows over the ranks."""
        sizes = (out_features,) if isinstance(out_features, int) else tuple(out_features)
        local = [split_evenly(n, tp.size, "a column-parallel output size") for n in sizes]
        return cls(in_features, local, bias, dtype, output_starts=[tp.rank * n for n in local] if tp.size > 1 else None)

    @classmethod
    def row(cls, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, tp: ParallelGroup) -> Linear:
        """The input split evenly by columns over the ranks; outputs summed over them."""
        local = split_evenly(in_features, tp.size, "a row-parallel input size")
        shard = Shard(tp.rank * local, local) if tp.size > 1 else None
        return cls(local, out_features, bias, dtype, input_shard=shard, reduce=tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        if self.reduce is None:
            return linear(x, self.weight, self.bias, self.workspace)
        y = self.reduce.all_reduce(linear(x, self.weight, None, self.workspace))
        return y if self.bias is None else y + self.bias

    def shard_slice(self, shard: int) -> slice:
        start = sum(self.output_sizes[:shard])
        return slice(start, start + self.output_sizes[shard])

    def load(self, leaf: str, shard: int, source: Any) -> None:
        """Copy sub-matrix `shard` of a checkpoint's weight or bias (`leaf`) into this rank's part."""
        param = self.weight if leaf == "weight" else self.bias
        if param is None:
            raise ValueError(f"the checkpoint has a {leaf} this linear does not")
        rows = Shard(self.output_starts[shard], self.output_sizes[shard]) if self.output_starts is not None else None
        if leaf == "bias" and self.reduce is not None:
            rows = None                      # a row-parallel bias is whole on every rank
        cols = self.input_shard if leaf == "weight" else None
        dst = param.data[self.shard_slice(shard)] if len(self.output_sizes) > 1 else param.data
        copy_checked(dst, read_weight(source, rows, cols))


class Embedding(nn.Module):
    """A lookup table, whole on every rank (OPT's learned positions)."""

    def __init__(self, num_embeddings: int, dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim, dtype=dtype), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, dim]
        return F.embedding(ids, self.weight)


class VocabParallelEmbedding(nn.Module):
    """The token embedding split by vocabulary rows over the ranks (each holds ceil(V / size) rows, the
    last zero-padded). A rank looks up the ids in its range and zeroes the rest; the sum over ranks is
    the embedding. Its weight doubles as a vocab-parallel LM head (`vocab_logits`)."""

    def __init__(self, num_embeddings: int, dim: int, dtype: torch.dtype, tp: ParallelGroup) -> None:
        super().__init__()
        self.tp = tp
        per_rank = -(-num_embeddings // tp.size)
        self.start = tp.rank * per_rank
        self.num_local = max(0, min(num_embeddings - self.start, per_rank))   # real rows on this rank
        self.weight = nn.Parameter(torch.empty(per_rank, dim, dtype=dtype), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, dim]
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_local)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)

    def load(self, leaf: str, shard: int, source: Any) -> None:
        self.weight.data[self.num_local:].zero_()
        copy_checked(self.weight.data[:self.num_local], read_weight(source, Shard(self.start, self.num_local)))


def vocab_logits(hidden: torch.Tensor, weight: torch.Tensor, vocab_size: int, tp: ParallelGroup,
                 workspace: SmallLinearWorkspace) -> torch.Tensor | None:
    """[N, hidden] -> [N, vocab] float32 logits on rank 0 from a vocab-parallel weight; None elsewhere."""
    logits = tp.gather_last_dim(linear(hidden, weight, None, workspace))
    if logits is None:
        return None
    return (logits if logits.shape[-1] == vocab_size else logits[:, :vocab_size]).float()


def copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"checkpoint shape {tuple(src.shape)} != model shape {tuple(dst.shape)}")
    dst.copy_(src)


class RMSNorm(nn.Module):
    """RMSNorm with an optional fused residual add.

    forward(x) -> norm(x); forward(x, residual) -> (norm(x + residual), x + residual).
    """

    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # One fused op (it accumulates in float32 for half inputs): per-op launch
        # overhead, not bandwidth, bounds small decode batches in eager mode.
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None  # [..., dim], [..., dim]
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if x.dim() == 2 and x.stride(1) == 1 and use_fused_kernels(x):
            from pensieve.kernels.fused import add_rms_norm

            out, summed = add_rms_norm(x, residual, self.weight, self.eps)
            return out if summed is None else (out, summed)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float, elementwise_affine: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.dim = dim
        if elementwise_affine:
            self.weight: nn.Parameter | None = nn.Parameter(torch.empty(dim, dtype=dtype), requires_grad=False)
            self.bias: nn.Parameter | None = nn.Parameter(torch.empty(dim, dtype=dtype), requires_grad=False)
        else:
            self.weight = self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., dim]
        return F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [T, 2 * I] -> [T, I]
    if x.stride(-1) == 1 and use_fused_kernels(x):
        from pensieve.kernels.fused import silu_and_mul_triton

        return silu_and_mul_triton(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


# ---------------------------------------------------------------- rotary embedding


def rope_parameters(config: Any) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling dict or None) from a transformers 4.x or 5.x config."""
    params = getattr(config, "rope_parameters", None)  # transformers 5: theta and scaling in one dict
    if isinstance(params, dict) and params:
        theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
        scaling = dict(params)
    else:
        theta = float(getattr(config, "rope_theta", 10000.0))
        scaling = dict(getattr(config, "rope_scaling", None) or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    scaling["rope_type"] = rope_type
    return theta, scaling


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:  # [head_dim // 2] fp32
    # float32 on the CPU, as the reference implementations compute it: at
    # position 100k a float64 inv_freq would shift angles by ~1e-2 rad.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim))
    if scaling is None:
        return inv_freq
    rope_type = scaling["rope_type"]
    factor = float(scaling["factor"])
    if rope_type == "linear":
        return inv_freq / factor
    if rope_type == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept,
        # and the band between interpolates smoothly between the two.
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen - low) / (high - low)).clamp(0.0, 1.0)
        scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        out = torch.where(wavelen > old_len / low, inv_freq / factor, scaled)
        out = torch.where(wavelen < old_len / high, inv_freq, out)
        return out
    # dynamic NTK rescales with the sequence length (no fixed cache); yarn etc. are not needed yet.
    raise NotImplementedError(f"rope_type {rope_type!r} is not supported")


@dataclass(frozen=True)
class Rope:
    """One step's rotary inputs, looked up once and used by every layer: the positions and the model's
    cos/sin table (read directly by the fused kernel), or cos/sin gathered per token [T, 1, D] fp32 (the
    PyTorch path)."""
    positions: torch.Tensor
    table: torch.Tensor
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding (rotate halves) from a float32 cos/sin table indexed by position.

    One table per model (64 MB for Llama 3.1's 128k positions): the model looks
    up cos/sin once per step and every layer applies them. Indexing by per-token
    position makes non-contiguous positions (a recomputed prefix next to a new
    turn) work with no special case.
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None) -> None:
        super().__init__()
        self.head_dim = head_dim
        inv_freq = rope_inv_freq(head_dim, theta, scaling).to(torch.get_default_device())
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device), inv_freq)
        # [max_positions, head_dim]: cos of the half frequencies, then sin.
        self.register_buffer("cos_sin", torch.cat([freqs.cos(), freqs.sin()], dim=-1), persistent=False)

    def forward(self, positions: torch.Tensor) -> Rope:  # [T]
        if use_fused_kernels(positions):
            return Rope(positions, self.cos_sin)
        cos, sin = self.cos_sin.index_select(0, positions).unsqueeze(1).chunk(2, dim=-1)
        return Rope(positions, self.cos_sin, torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1))


def apply_rotary(
    x: torch.Tensor,    # [T, H, D]: q and k heads together, one pass for both
    rope: Rope,
) -> torch.Tensor:      # [T, H, D] in x's dtype (the fused kernel rotates x in place)
    if rope.cos is None or rope.sin is None:
        from pensieve.kernels.fused import rotary_inplace

        return rotary_inplace(x, rope.table, rope.positions)
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return torch.addcmul(xf * rope.cos, rotated, rope.sin).to(x.dtype)


# ---------------------------------------------------------------- weight loading


def load_named_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, Any]],
    stacked: Sequence[tuple[str, str, int]] = (),
    skip: Sequence[str] = (),
) -> None:
    """Copy checkpoint tensors into `model`'s parameters by name.

    stacked: (fused module name, checkpoint module name, shard index), e.g.
    ("qkv_proj", "k_proj", 1): "...k_proj.weight" goes to rows of shard 1 of
    "...qkv_proj.weight". Names containing any of `skip` are ignored; other
    unknown names are logged and ignored. Raises if a parameter stays unloaded. A sharded module
    (tensor parallelism) takes only its rank's part; a lazy checkpoint slice reads only that part.
    """
    params = dict(model.named_parameters())
    expected: set[tuple[str, int]] = set()
    for name, _ in params.items():
        owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if isinstance(owner, Linear):
            expected.update((name, shard) for shard in range(len(owner.output_sizes)))
        else:
            expected.add((name, 0))

    loaded: set[tuple[str, int]] = set()
    for ckpt_name, source in weights:
        if any(s in ckpt_name for s in skip):
            continue
        target, shard = ckpt_name, 0
        for fused, part, index in stacked:
            if f".{part}." in ckpt_name:
                target, shard = ckpt_name.replace(f".{part}.", f".{fused}."), index
                break
        param = params.get(target)
        if param is None:
            logger.warning("ignoring checkpoint tensor %s", ckpt_name)
            continue
        owner_name, leaf = target.rsplit(".", 1)
        owner = model.get_submodule(owner_name)
        try:
            if isinstance(owner, (Linear, VocabParallelEmbedding)):
                owner.load(leaf, shard, source)   # this rank's part only
            else:
                copy_checked(param.data, read_weight(source))
        except ValueError as exc:
            raise ValueError(f"{ckpt_name}: {exc}") from None
        loaded.add((target, shard))
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}")
