"""What the server needs of an engine: one protocol, implemented by AsyncEngine (the engine on a
thread of the server's process) and EngineProcess (the engine in a child process)."""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

from pensieve.config import EngineConfig
from pensieve.engine.llm_engine import EngineStats
from pensieve.engine.outputs import RequestOutput
from pensieve.sampling_params import SamplingParams


@runtime_checkable
class EngineClient(Protocol):
    config: EngineConfig
    model_name: str
    tokenizer: Any              # a transformers tokenizer, in the caller's process
    max_model_len: int
    device: str                 # "cuda" | "cpu"

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 conversation_id: str | None = None, append_to_conversation: bool = False,
                 stream: bool = True, cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """The request's outputs (outputs.py: deltas when streamed, else the first token and the whole
        completion); a prompt the engine refuses raises ValueError; leaving early aborts it."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def delete_conversation(self, conversation_id: str) -> bool:
        """Frees the conversation's blocks in both tiers; blocks until the engine has done it."""
        ...

    def reset_cache(self) -> bool:
        """Drops every cached block and conversation (False while requests are unfinished); blocks until
        the engine has done it."""
        ...

    def stats(self) -> EngineStats: ...

    @property
    def alive(self) -> bool: ...

    def check_integrity(self) -> None: ...

    def cached_block_keys(self) -> tuple[list[bytes], list[bytes]]:
        """The content keys the GPU and the CPU tier hold (what a KV event publisher announces)."""
        ...

    async def profile(self, num_steps: int) -> str: ...

    async def shutdown(self) -> None:
        """Aborts what is in flight, saves the cache (with a persist path), stops the engine."""
        ...
