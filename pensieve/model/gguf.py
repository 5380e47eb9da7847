"""GGUF checkpoints (llama.cpp's single-file format), read with transformers' GGUF support and the `gguf` package.

The config, tokenizer and chat template come from the file's metadata (transformers' `gguf_file=` loaders);
the weights are dequantized by `gguf` one tensor at a time, renamed to the Hugging Face names by
transformers' GGUF name map (which also undoes llama.cpp's rotary permutation of q/k), and cast to the
serving dtype. Also here: the two checkpoint helpers every engine front needs for both formats
(`load_tokenizer`, `fingerprint_files`), so callers never test for a format themselves.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pensieve.errors import CheckpointError


def is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


def pretrained_args(path: str | Path) -> tuple[str, dict[str, str]]:
    """(name_or_path, kwargs) for a transformers `from_pretrained`: a GGUF file is its folder plus `gguf_file`."""
    path = Path(path)
    if is_gguf(path):
        return str(path.parent), {"gguf_file": path.name}
    return str(path), {}


def load_gguf_config(path: str | Path) -> Any:
    """The HF config the file's metadata describes, with `architectures` set (GGUF metadata names none)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name, kwargs = pretrained_args(path)
    try:
        config = AutoConfig.from_pretrained(name, **kwargs)
    except (ValueError, NotImplementedError, KeyError) as exc:
        # transformers' refusal ("GGUF model with architecture X is not supported yet"): one line
        raise CheckpointError(f"cannot load {path}: {_first_line(exc)}") from None
    if not getattr(config, "architectures", None):
        arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
        if arch is None:
            raise CheckpointError(f"{path}: model type {config.model_type!r} has no causal-LM class")
        config.architectures = [arch]
    return config


def iter_gguf_weights(path: str | Path, config: Any, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor in `dtype`) for every tensor of the file, dequantized one at a time.

    Every tensor's quantization type is checked before the first is read, so an unsupported file fails
    at once with one line instead of after dequantizing most of it.
    """
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    reader = GGUFReader(str(path))
    unsupported = _unsupported_types(reader)
    if unsupported:
        raise CheckpointError(f"{path}: unsupported GGUF quantization type(s) {', '.join(unsupported)}")
    arch_field = reader.fields["general.architecture"]
    architecture = bytes(arch_field.parts[arch_field.data[0]]).decode()
    # transformers' processor for the architecture undoes llama.cpp's q/k permutation (identity elsewhere)
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config.to_dict())
    names = _hf_names(architecture, config)
    for tensor in reader.tensors:
        values = dequantize(tensor.data, tensor.tensor_type)
        result = processor.process(weights=values, name=tensor.name, tensor_key_mapping=names,
                                   parsed_parameters={"tensors": {}})
        if result.name not in names:
            continue  # e.g. rope_freqs: derived from the config, not a parameter
        # F32 tensors come back as read-only views of the mapped file: copied only then
        yield names[result.name], torch.from_numpy(np.require(result.weights, requirements=["C", "W"])).to(dtype)


def _hf_names(architecture: str, config: Any) -> dict[str, str]:
    """{GGUF tensor name: HF parameter name}: gguf's name table applied to an HF model's state-dict names.

    The HF model is built on the meta device (no memory); its names are the ones our models' load_weights
    expects. (transformers' own get_gguf_hf_weights_map does the same but rebuilds gguf's table once per
    submodule: seconds on a 30-layer model.)
    """
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map
    from transformers import AutoModelForCausalLM

    arch = next((a for a, n in MODEL_ARCH_NAMES.items() if n == architecture), None)
    if arch is None:
        raise CheckpointError(f"GGUF architecture {architecture!r} is unknown to the installed gguf package")
    table = get_tensor_name_map(arch, config.num_hidden_layers)
    with torch.device("meta"):
        hf_names = list(AutoModelForCausalLM.from_config(config).state_dict())
    names = {}
    for hf_name in hf_names:
        module, _, suffix = hf_name.rpartition(".")
        gguf_name = table.get_name(module)
        if gguf_name is not None:
            names[f"{gguf_name}.{suffix}"] = hf_name
    return names


def _unsupported_types(reader: Any) -> list[str]:
    """Names of the file's tensor types `gguf` cannot dequantize (tried on one row of each type)."""
    from gguf import dequantize

    first_of_type = {}
    for tensor in reader.tensors:
        first_of_type.setdefault(tensor.tensor_type, tensor)
    unsupported = []
    for qtype, tensor in first_of_type.items():
        try:
            dequantize(tensor.data[:1], qtype)
        except NotImplementedError:
            unsupported.append(qtype.name)
    return sorted(unsupported)


def load_tokenizer(model: str | Path, tokenizer: str | Path | None = None) -> Any:
    """The tokenizer (and chat template) of a checkpoint directory or GGUF file; `tokenizer` overrides."""
    from transformers import AutoTokenizer

    from pensieve.model.loader import resolve_model_path

    path = resolve_model_path(str(tokenizer or model))
    name, kwargs = pretrained_args(path)
    if not kwargs:
        return AutoTokenizer.from_pretrained(name)
    try:
        return AutoTokenizer.from_pretrained(name, **kwargs)
    except (ValueError, KeyError, NotImplementedError) as exc:  # a GGUF whose metadata holds no usable tokenizer
        raise CheckpointError(f"cannot load the tokenizer of {path}: {_first_line(exc)}") from None


def fingerprint_files(model_path: str | Path) -> list[Path]:
    """The files whose bytes identify a checkpoint's weights: the GGUF itself, or a directory's weight files."""
    root = Path(model_path)
    if root.is_file():
        return [root]
    return sorted(list(root.glob("*.safetensors")) + list(root.glob("*.bin")))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
