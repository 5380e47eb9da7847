"""Pensieve: stateful LLM serving for multi-turn chat."""
import logging

from pensieve.sampling_params import SamplingParams

# A library logs only where the application asks for it (`pensieve serve` does, at --log-level):
# without this, Python's last-resort handler would print the engine's warnings from LLM().
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "LLM":  # imported lazily: it pulls in torch models and transformers
        from pensieve.engine.llm import LLM

        return LLM
    raise AttributeError(name)
