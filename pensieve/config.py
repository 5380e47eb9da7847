"""Engine configuration: plain frozen dataclasses, built once and passed explicitly."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

CacheMode = Literal["stateless", "gpu", "tiered"]
EvictionPolicyName = Literal["retention", "lru"]


@dataclass(frozen=True)
class ModelConfig:
    model: str                      # checkpoint directory (or hub id when a network exists)
    dtype: str = "auto"             # auto | bfloat16 | float16 | float32
    max_model_len: int | None = None
    tokenizer: str | None = None    # defaults to `model`
    seed: int = 0


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    cache_mode: CacheMode = "tiered"
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks: int | None = None      # overrides gpu_memory_utilization (tests force small pools)
    cpu_cache_gb: float | None = None      # GiB; None: a share of host memory (cache.kv_pool.default_cpu_cache_bytes)
    num_cpu_blocks: int | None = None      # overrides cpu_cache_gb
    eviction_policy: EvictionPolicyName = "retention"
    profile_recompute_cost: bool = True    # on a GPU, time Cost(l) at start-up (the paper's offline profile)
    swap_out_watermark: float = 0.25       # start ahead-of-time swap-out when free GPU blocks < this share
    max_swap_out_blocks_per_step: int = 256
    admit_watermark: float = 0.10          # admit new requests only while this share of GPU blocks stays free
    pipelined_swap_in: bool = True         # layer l waits only for layer l's copy
    defer_swap_in: bool = True             # with other work running, swap a returning conversation in
                                           # behind this step and compute it next step (keeps CUDA graphs)
    # Swap-ins that a forward waits on layer by layer go through the copy engines (one memcpy per
    # run of consecutive blocks and layer) when they are at most this many runs, else the gather
    # kernel; deferred swap-ins (unless swap_dma_deferred), eviction copies and swap-outs take the
    # one-launch kernel (cache/transfer.py says why). On the H100 (Llama-3.1-8B, 1k and 4k tokens, one
    # run) the copy engines moved 85-90% of PCIe and hid 88-94% of it behind the forward, the kernel
    # 64-81% and 76-82% (benchmarks/results/engine-tuning/fused-async-76c3b02/engine.md, dma-all vs kernel8).
    # 0: always the kernel.
    swap_dma_max_runs: int = 8
    swap_dma_deferred: bool = False        # deferred swap-ins by copy engines too (no gain on OPT-13B:
                                           # benchmarks/results/multiturn/opt-13b-kv40-dmadefer-r16/)
    ahead_of_time_swap_out: bool = True
    conversation_ttl: float | None = None  # seconds an idle named conversation is kept
    persist_path: str | None = None        # load the cache from here at start, save it here at shutdown
    persist_strict: bool = False           # a saved cache that cannot be used refuses the start (else: empty)

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: str = "auto"                  # auto | cuda | cpu
    # Shard the model over this many GPUs of the host (one process each; rank 0 runs the engine).
    # Each rank's two-tier cache holds its own KV heads. On a CPU the ranks talk over gloo (tests).
    tensor_parallel_size: int = 1
    enforce_eager: bool = False           # disable CUDA graphs
    # Overlap the host's work with the GPU's: while decode step N runs, schedule and launch step N+1
    # (its tokens taken on the device from N's sampling) and only then read N's tokens back. Outputs
    # come one step later; a request that stops at step N costs step N+1 one wasted row.
    # None: on with CUDA (on a CPU nothing runs asynchronously; tests turn it on to check the logic).
    async_scheduling: bool | None = None
    cuda_graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 320, 384, 512)
    # A mixed step runs as one-token rows through the decode graphs instead of eagerly when its
    # prefill tokens' contexts (re-read once per token) come to at most this many KV bytes and it
    # has at most token_rows_max_tokens tokens. On the H100 an eager 13B forward costs ~30 ms more
    # than its graph (launch-bound: 40 layers of small kernels), while 24 GB of re-reads cost 8 ms
    # (benchmarks/results/HISTORY.md, "mixed steps as graph rows"). Graphs are captured up to
    # max(max_num_seqs, token_rows_max_tokens) rows; 0 bytes disables.
    token_rows_reread_bytes: float = 24e9
    token_rows_max_tokens: int = 512
    # The async engine steps on a thread beside the caller's event loop; after each GPU wait it must
    # win the GIL back, and a busy loop thread keeps it for up to this interval (Python's default is
    # 5 ms, a third of a 13B decode step; benchmarks/gil_contention.py). None leaves the interpreter's
    # setting alone.
    gil_switch_interval_s: float | None = 0.001

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
