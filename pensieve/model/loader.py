"""Build a model from an HF checkpoint directory and stream its weights in.

dtype "auto": the checkpoint's dtype on CUDA (bfloat16 when it names none),
but always float32 on the CPU: this CPU has no fast bf16/fp16 matrix multiply
(bf16 measured ~5x slower than fp32), and the CPU path exists for tests and
demos, where float32 also makes results comparable with HF's.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from pensieve.distributed.group import SINGLE, HeadShard, ParallelGroup

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


@dataclass(frozen=True)
class KVSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int


def model_class(architecture: str) -> type[nn.Module]:
    from pensieve.model.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
    from pensieve.model.opt import OPTForCausalLM

    classes: dict[str, type[nn.Module]] = {
        "LlamaForCausalLM": LlamaForCausalLM,
        "MistralForCausalLM": MistralForCausalLM,
        "Qwen2ForCausalLM": Qwen2ForCausalLM,
        "Qwen3ForCausalLM": Qwen3ForCausalLM,
        "OPTForCausalLM": OPTForCausalLM,
    }
    if architecture not in classes:
        raise ValueError(f"unsupported architecture {architecture!r}; supported: {sorted(classes)}")
    return classes[architecture]


def model_kv_spec(config: Any, tp: ParallelGroup = SINGLE) -> KVSpec:
    """The KV cache shape of one rank: its KV heads only (tensor parallelism splits them)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return KVSpec(num_layers=config.num_hidden_layers, num_kv_heads=HeadShard.of(heads, kv_heads, tp).num_kv,
                  head_dim=head_dim)


def max_context_len(config: Any) -> int:
    """Longest sequence the model serves: its position table, capped at a sliding window.

    We attend over the full context; within the window that equals sliding-window attention.
    """
    limit = int(config.max_position_embeddings)
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", config.model_type == "mistral")
    if window and uses_window:
        limit = min(limit, int(window))
    return limit


def resolve_dtype(dtype: str | torch.dtype, config: Any, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}")
        return _DTYPES[dtype]
    if torch.device(device).type == "cpu":
        return torch.float32
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = _DTYPES.get(declared.removeprefix("torch."))
    return declared if isinstance(declared, torch.dtype) else torch.bfloat16


def _weight_files(model_dir: Path) -> tuple[list[Path], bool]:
    """The checkpoint's weight files and whether they are safetensors."""
    for index_name, safe in (("model.safetensors.index.json", True), ("pytorch_model.bin.index.json", False)):
        index = model_dir / index_name
        if index.exists():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [model_dir / n for n in names], safe
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files, True
    files = sorted(model_dir.glob("*.bin"))
    if files:
        return files, False
    raise FileNotFoundError(f"no *.safetensors or *.bin weights in {model_dir}")


def iter_weights(model_dir: str | Path) -> Iterator[tuple[str, Any]]:
    """(name, tensor) for every tensor of the checkpoint, one file at a time. Safetensors tensors come as
    lazy slices (indexing reads only that part), so each tensor-parallel rank reads only its shard; use
    each before advancing the iterator."""
    files, safe = _weight_files(Path(model_dir))
    for file in files:
        if safe:
            from safetensors import safe_open

            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_slice(name)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
            yield from state.items()
            del state


def resolve_model_path(model_path: str) -> Path:
    path = Path(model_path).expanduser()
    if path.exists():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model_path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))


def load_config(model_path: str | Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model_path))


def load_model(
    model_path: str | Path, dtype: str | torch.dtype, device: torch.device | str, tp: ParallelGroup = SINGLE
) -> tuple[nn.Module, Any, torch.dtype]:
    """(model in eval mode on `device`, its HF config, the dtype chosen). Under tensor parallelism, this
    rank's shard of the model, read from its slices of the checkpoint."""
    path = resolve_model_path(str(model_path))
    device = torch.device(device)
    config = load_config(path)
    archs = getattr(config, "architectures", None) or []
    if not archs:
        raise ValueError(f"{path}/config.json names no architecture")
    torch_dtype = resolve_dtype(dtype, config, device)
    cls = model_class(archs[0])
    # Parameters are torch.empty (layers.py), so building straight on the device costs nothing.
    with torch.device(device):
        model = cls(config, torch_dtype, tp)
    logger.info("loading %s (%s, %s) onto %s", path, archs[0], torch_dtype, device)
    with torch.no_grad():
        model.load_weights(iter_weights(path))
    model.eval()
    return model, config, torch_dtype
