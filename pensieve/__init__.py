"""Pensieve: stateful LLM serving for multi-turn chat."""
from pensieve.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "LLM":  # imported lazily: it pulls in torch models and transformers
        from pensieve.engine.llm import LLM

        return LLM
    raise AttributeError(name)
