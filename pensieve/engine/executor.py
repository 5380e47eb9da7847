"""What the engine runs its steps on: one ModelRunner, or rank 0 of a tensor-parallel group.

The engine (scheduler, cache manager, sampling decisions) lives on rank 0 only. With one GPU the
executor is the ModelRunner itself, with no extra process and no collective on its path. With several,
`distributed.executor.TensorParallelExecutor` sends each call to the other ranks first (one step
message), then runs it on rank 0's runner: one decision, N executions.
"""
from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any, Protocol

import torch

from pensieve.config import EngineConfig
from pensieve.engine.model_runner import LaunchedStep, ModelRunner, StepInput, StepResult
from pensieve.engine.sequence import Sequence


class Executor(Protocol):
    runner: ModelRunner                 # rank 0's runner (the executor itself with one GPU)
    num_gpu_blocks: int
    num_cpu_blocks: int
    kv_bytes_per_token: int             # per rank
    max_graph_rows: int

    def launch(self, step: StepInput, sample: Seq[Sequence] | None = None,
               input_ids: torch.Tensor | None = None) -> LaunchedStep: ...
    def finish(self, step: LaunchedStep) -> StepResult: ...
    def sampled_ids(self, step: LaunchedStep, rows: list[int]) -> torch.Tensor: ...
    def completed_swap_outs(self) -> int: ...
    def wait_swap_outs(self) -> int: ...
    def sync_transfers(self) -> None: ...
    def time_block_recompute(self, context_len: int) -> float: ...
    def message_stats(self) -> tuple[int, float]: ...
    @property
    def failure(self) -> str | None: ...          # a rank died: no step can run any more
    # a saved cache, each rank its own KV heads (cache/persist.py's ShardIO)
    tp_size: int
    def kv_block_layout(self) -> tuple[list[int], torch.dtype]: ...
    def write_kv_shards(self, directory: Any, blocks: list) -> list[list[int]]: ...
    def verify_kv_shards(self, directory: Any, keys: list[bytes], checksums: list[list[int]]) -> set[int]: ...
    def read_kv_shards(self, directory: Any, keys: list[bytes], checksums: list[list[int]], tier: str,
                       placements: list[tuple[int, int]]) -> None: ...
    def shutdown(self) -> None: ...


def load_runner(config: EngineConfig, device: torch.device, max_model_len: int, eos_token_ids: list[int],
                tp: Any = None, preloaded: tuple | None = None) -> ModelRunner:
    """Load this rank's model (or its shard) and build its runner; `preloaded` = (model, hf_config,
    dtype) of an earlier load (one GPU only: a benchmark comparing cache modes loads weights once)."""
    from pensieve.distributed.group import SINGLE, HeadShard
    from pensieve.model.loader import load_model, model_kv_spec

    tp = tp or SINGLE
    mc = config.model
    model, hf_config, dtype = preloaded or load_model(mc.model, mc.dtype, device, tp)
    heads = HeadShard.of(hf_config.num_attention_heads, getattr(hf_config, "num_key_value_heads", None)
                         or hf_config.num_attention_heads, tp)
    return ModelRunner(config, model, model_kv_spec(hf_config, tp), dtype, device, max_model_len, eos_token_ids,
                       heads.num_q, tp)


def build_executor(config: EngineConfig, device: torch.device, max_model_len: int, eos_token_ids: list[int],
                   preloaded: tuple | None = None) -> Executor:
    if config.tensor_parallel_size > 1:
        if preloaded is not None:
            raise ValueError("preloaded weights are for one GPU; tensor-parallel ranks load their own shards")
        from pensieve.distributed.executor import TensorParallelExecutor

        return TensorParallelExecutor(config, device, max_model_len, eos_token_ids)
    return load_runner(config, device, max_model_len, eos_token_ids, preloaded=preloaded)
