"""Llama-family decoders: Llama 2/3.x, Mistral, Qwen2/2.5 (qkv bias), Qwen3 (per-head q/k RMSNorm).

The four differ only in which projections carry a bias and whether q and k
are normalised per head, so one implementation serves all; the subclasses
only pick those flags. Mistral's sliding window is not applied: the loader
caps the context at the window (see loader.max_context_len), where full
attention and sliding-window attention agree.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from pensieve.distributed.group import SINGLE, HeadShard, ParallelGroup
from pensieve.kernels import SmallLinearWorkspace
from pensieve.kernels.metadata import AttentionMetadata
from pensieve.model.attention import PagedAttention
from pensieve.model.layers import (
    Linear, RMSNorm, Rope, RotaryEmbedding, VocabParallelEmbedding, apply_rotary, load_named_weights,
    rope_parameters, silu_and_mul, vocab_logits,
)

_STACKED = (
    ("qkv_proj", "q_proj", 0),
    ("qkv_proj", "k_proj", 1),
    ("qkv_proj", "v_proj", 2),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
)


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    """Under tensor parallelism a rank holds its query heads and their KV heads (HeadShard): qkv_proj is
    column-parallel, o_proj row-parallel (one all-reduce)."""

    def __init__(self, config, layer_idx: int, dtype: torch.dtype, qkv_bias: bool, o_bias: bool, qk_norm: bool,
                 tp: ParallelGroup) -> None:
        super().__init__()
        heads = HeadShard.of(config.num_attention_heads, getattr(config, "num_key_value_heads", None)
                             or config.num_attention_heads, tp)
        self.num_heads, self.num_kv_heads = heads.num_q, heads.num_kv
        self.head_dim = D = head_dim_of(config)
        self.q_size = self.num_heads * D
        self.kv_size = self.num_kv_heads * D
        starts = (heads.q_start * D, heads.kv_start * D, heads.kv_start * D) if tp.size > 1 else None
        self.qkv_proj = Linear(config.hidden_size, (self.q_size, self.kv_size, self.kv_size), qkv_bias, dtype,
                               output_starts=starts)
        self.o_proj = Linear.row(config.num_attention_heads * D, config.hidden_size, o_bias, dtype, tp)
        if qk_norm:
            self.q_norm: RMSNorm | None = RMSNorm(self.head_dim, config.rms_norm_eps, dtype)
            self.k_norm: RMSNorm | None = RMSNorm(self.head_dim, config.rms_norm_eps, dtype)
        else:
            self.q_norm = self.k_norm = None
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5, layer_idx)

    def forward(
        self,
        rope: Rope,
        x: torch.Tensor,                          # [T, hidden]
        kv_cache: torch.Tensor,                   # [num_blocks, 2, block_size, Hkv, D]
        meta: AttentionMetadata,
    ) -> torch.Tensor:                            # [T, hidden]
        T, H = x.shape[0], self.num_heads
        qkv = self.qkv_proj(x)
        qk = qkv[:, : self.q_size + self.kv_size].view(T, -1, self.head_dim)  # [T, Hq + Hkv, D]
        v = qkv[:, self.q_size + self.kv_size :]
        if self.q_norm is not None and self.k_norm is not None:
            qk = torch.cat([self.q_norm(qk[:, :H]), self.k_norm(qk[:, H:])], dim=1)
        qk = apply_rotary(qk, rope)
        # Strided views, no copies: the kernels take any row stride.
        q, k = qk[:, :H].reshape(T, self.q_size), qk[:, H:].reshape(T, self.kv_size)
        return self.o_proj(self.attn(q, k, v, kv_cache, meta))


class LlamaMLP(nn.Module):
    def __init__(self, config, dtype: torch.dtype, bias: bool, tp: ParallelGroup) -> None:
        super().__init__()
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise NotImplementedError(f"hidden_act {act!r}")
        inter = config.intermediate_size
        self.gate_up_proj = Linear.column(config.hidden_size, (inter, inter), bias, dtype, tp)
        self.down_proj = Linear.row(inter, config.hidden_size, bias, dtype, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden]
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, dtype: torch.dtype, flags: dict[str, bool], tp: ParallelGroup) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx, dtype, flags["qkv_bias"], flags["o_bias"], flags["qk_norm"], tp)
        self.mlp = LlamaMLP(config, dtype, flags["mlp_bias"], tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(
        self,
        rope: Rope,
        x: torch.Tensor,                    # [T, hidden]: this layer's input before the residual add
        residual: torch.Tensor | None,      # [T, hidden]: the residual stream (None for layer 0)
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The residual add of the previous sub-block is fused into the next norm.
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(rope, h, kv_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, config, dtype: torch.dtype, flags: dict[str, bool], tp: ParallelGroup) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype, tp)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, dtype, flags, tp) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        theta, scaling = rope_parameters(config)
        self.rotary_emb = RotaryEmbedding(head_dim_of(config), config.max_position_embeddings, theta, scaling)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor], meta: AttentionMetadata
    ) -> torch.Tensor:  # [T, hidden]
        x = self.embed_tokens(input_ids)
        rope = self.rotary_emb(positions)  # looked up once, used by every layer
        residual: torch.Tensor | None = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(rope, x, residual, kv_cache, meta)
        out, _ = self.norm(x, residual)
        return out


class LlamaForCausalLM(nn.Module):
    def __init__(self, config, dtype: torch.dtype, tp: ParallelGroup = SINGLE) -> None:
        super().__init__()
        self.config = config
        self.tp = tp
        self.model = LlamaModel(config, dtype, self._flags(config), tp)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        # Tied: the logits read the embedding matrix itself, so no second copy exists to fall out of sync.
        self.lm_head = (None if self.tie_word_embeddings
                        else VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype, tp))
        self.logits_workspace = SmallLinearWorkspace()

    @staticmethod
    def _flags(config) -> dict[str, bool]:
        bias = bool(getattr(config, "attention_bias", False))
        return {"qkv_bias": bias, "o_bias": bias, "qk_norm": False, "mlp_bias": bool(getattr(config, "mlp_bias", False))}

    def forward(
        self,
        input_ids: torch.Tensor,       # [T] int64
        positions: torch.Tensor,       # [T] int64
        kv_caches: list[torch.Tensor],  # per layer [num_blocks, 2, block_size, Hkv, D]
        meta: AttentionMetadata,
    ) -> torch.Tensor:                 # [T, hidden]
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:  # [N, hidden] -> [N, vocab] float32
        """Logits on rank 0 (gathered from the vocab shards); None on the other ranks."""
        weight = (self.model.embed_tokens if self.lm_head is None else self.lm_head).weight
        return vocab_logits(hidden, weight, self.config.vocab_size, self.tp, self.logits_workspace)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        # rotary_emb.inv_freq: a buffer some old checkpoints saved; lm_head of a tied model duplicates the embedding.
        skip = ["rotary_emb.inv_freq"] + (["lm_head."] if self.tie_word_embeddings else [])
        load_named_weights(self, weights, _STACKED, skip)


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def _flags(config) -> dict[str, bool]:
        return {"qkv_bias": True, "o_bias": False, "qk_norm": False, "mlp_bias": False}


class Qwen3ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def _flags(config) -> dict[str, bool]:
        bias = bool(getattr(config, "attention_bias", False))
        return {"qkv_bias": bias, "o_bias": bias, "qk_norm": True, "mlp_bias": False}
