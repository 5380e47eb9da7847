"""The offline Python API, shaped like vLLM's: LLM(model).generate(prompts, params)."""
from __future__ import annotations

import itertools
from typing import Any, Sequence as Seq

from pensieve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pensieve.engine.llm_engine import LLMEngine
from pensieve.engine.outputs import RequestOutput
from pensieve.sampling_params import SamplingParams

Prompt = str | dict[str, Any]


class LLM:
    """`LLM()` runs the demo model (pensieve/demo.py); `LLM(path)` an HF checkpoint directory or a .gguf file."""

    def __init__(self, model: str | None = None, *, device: str = "auto", dtype: str = "auto", block_size: int = 16,
                 gpu_memory_utilization: float = 0.9, num_gpu_blocks: int | None = None,
                 max_model_len: int | None = None, cache_mode: str = "tiered", num_cpu_blocks: int | None = None,
                 cpu_cache_gb: float | None = None, max_num_seqs: int = 256, max_num_batched_tokens: int = 4096,
                 enforce_eager: bool = False, seed: int = 0, tokenizer: str | None = None,
                 tensor_parallel_size: int = 1, **cache_kwargs: Any) -> None:
        if model is None:
            from pensieve.demo import demo_gguf_path

            model = str(demo_gguf_path())
        config = EngineConfig(
            model=ModelConfig(model=model, dtype=dtype, max_model_len=max_model_len, tokenizer=tokenizer, seed=seed),
            cache=CacheConfig(block_size=block_size, cache_mode=cache_mode, gpu_memory_utilization=gpu_memory_utilization,
                              num_gpu_blocks=num_gpu_blocks, num_cpu_blocks=num_cpu_blocks, cpu_cache_gb=cpu_cache_gb,
                              **cache_kwargs),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens),
            device=device, enforce_eager=enforce_eager, tensor_parallel_size=tensor_parallel_size)
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def _token_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer(prompt)["input_ids"]
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"])
        raise TypeError("a prompt is a string or {'prompt_token_ids': [...]}")

    def generate(self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 conversation_ids: Seq[str | None] | None = None,
                 append_to_conversation: bool = False) -> list[RequestOutput]:
        """conversation_ids name each prompt's conversation; with append_to_conversation the prompts are
        only the new turns, appended by the engine to what each conversation said so far."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        convs = list(conversation_ids) if conversation_ids is not None else [None] * len(prompts)
        order: list[str] = []
        for prompt, p, conv in zip(prompts, params_list, convs):
            rid = f"offline-{next(self._ids)}"
            self.engine.add_request(rid, self._token_ids(prompt), p, conversation_id=conv,
                                    append_to_conversation=append_to_conversation)
            order.append(rid)
        done: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[rid] for rid in order]

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks, if any (they also stop when this process exits)."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]],
             sampling_params: SamplingParams | None = None) -> list[RequestOutput]:
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [{"prompt_token_ids": self.tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True,
                                                                          return_dict=False)}
                   for m in conversations]
        return self.generate(prompts, sampling_params)
