"""The systems the benchmark drives, behind one interface: `submit(turn) -> TurnResult`.

- EngineBackend: an in-process AsyncEngine (systems tiered / gpu / stateless and their ablations);
- HttpBackend: a running OpenAI-compatible server (ours or another), through the `openai` async client;
- TransformersBackend: HF transformers' own continuous batching on the same model, the external reference
  (stateless: prefix block sharing off unless asked for).
Times are absolute `time.perf_counter()` values; the runner rebases them on the run's start.
"""
from __future__ import annotations

import asyncio
import dataclasses
import gc
import inspect
import json
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pensieve.bench.records import TurnRequest, TurnResult

ENGINE_MODES = ("tiered", "gpu", "stateless")
# Ablation suffixes: `tiered-lru`, `tiered-noaot`, `tiered-nopipe`, combinable (`tiered-lru-noaot`);
# `-dmadefer` sends deferred swap-ins through the copy engines (an A/B of the transfer path).
_SUFFIXES = {"lru": ("eviction_policy", "lru"), "retention": ("eviction_policy", "retention"),
             "noaot": ("ahead_of_time_swap_out", False), "nopipe": ("pipelined_swap_in", False),
             "dmadefer": ("swap_dma_deferred", True)}
_ENGINE_SUFFIXES = {"sync": ("async_scheduling", False)}   # EngineConfig fields


@dataclass(frozen=True)
class SystemSpec:
    name: str                          # the label in results ("tiered", "tiered-lru", "transformers", ...)
    kind: str                          # engine | http | transformers
    cache_mode: str | None = None      # engine systems: CacheConfig.cache_mode
    overrides: tuple[tuple[str, Any], ...] = ()   # CacheConfig fields set by the name's suffixes
    engine_overrides: tuple[tuple[str, Any], ...] = ()   # EngineConfig fields set by them (-sync)


def parse_system(name: str) -> SystemSpec:
    """`tiered`, `gpu`, `stateless` (+ `-lru`, `-noaot`, `-nopipe`, `-dmadefer`, `-sync` suffixes), `transformers`, `http`."""
    name = name.strip()
    if name == "transformers" or name == "http" or name.startswith("http:"):
        return SystemSpec(name=name, kind="transformers" if name == "transformers" else "http")
    base, *suffixes = name.split("-")
    if base not in ENGINE_MODES:
        raise ValueError(f"unknown system {name!r}: use tiered, gpu, stateless (with -lru/-noaot/-nopipe), "
                         "transformers or http")
    overrides, engine_overrides = [], []
    for s in suffixes:
        if s in _ENGINE_SUFFIXES:
            engine_overrides.append(_ENGINE_SUFFIXES[s])
        elif s in _SUFFIXES:
            overrides.append(_SUFFIXES[s])
        else:
            raise ValueError(f"unknown variant suffix {s!r} in {name!r} "
                             f"(known: {', '.join([*_SUFFIXES, *_ENGINE_SUFFIXES])})")
    return SystemSpec(name=name, kind="engine", cache_mode=base, overrides=tuple(overrides),
                      engine_overrides=tuple(engine_overrides))


_DTYPE_BYTES = {"float32": 4, "float": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2}


def kv_bytes_per_token(model_path: str | Path, dtype: str = "auto", device: str = "cuda",
                       tensor_parallel_size: int = 1) -> int:
    """K and V bytes of one token over all layers on one GPU, read from the checkpoint's config (config.json
    or GGUF): under tensor parallelism a GPU holds max(1, kv_heads / size) heads (replicated when fewer).
    dtype "auto": float32 on the CPU, else the checkpoint's torch_dtype (bf16 if unset)."""
    if str(model_path).endswith(".gguf"):
        from pensieve.model.loader import load_config

        cfg = load_config(model_path).to_dict()
    else:
        cfg = json.loads((Path(model_path) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    layers = int(cfg["num_hidden_layers"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    nbytes = _DTYPE_BYTES.get(dtype.replace("torch.", ""), 2)
    local_kv_heads = max(1, kv_heads // tensor_parallel_size)
    return 2 * layers * local_kv_heads * head_dim * nbytes


def blocks_for_budget(gb: float, bytes_per_token: int, block_size: int) -> int:
    """How many KV blocks of block_size tokens fit in `gb` GiB."""
    return max(1, int(gb * (1 << 30)) // (bytes_per_token * block_size))


def _now() -> float:
    return time.perf_counter()


class Backend(ABC):
    """One system under test. start() before submit(), close() at the end."""

    name: str
    tokenizer: Any = None            # a HF tokenizer (synthetic vocab, chat text, re-tokenizing replies)
    max_model_len: int | None = None
    device: str = "cpu"

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def submit(self, req: TurnRequest) -> TurnResult: ...

    async def end_conversation(self, conversation_id: str) -> None:
        """Free what the system keeps for this conversation (no-op for stateless systems)."""

    async def stats(self) -> dict[str, float] | None:
        """Cumulative counters (engine stats or /metrics samples), for swap traffic deltas."""
        return None

    async def sample(self) -> dict[str, float] | None:
        """The gauges of this moment, without waiting (GAUGES: running batch, waiting queue, pool blocks)."""
        return None

    @abstractmethod
    async def close(self) -> None: ...

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


# The gauges a point samples: EngineStats fields, and the /metrics names the server gives them.
GAUGES = {"num_running": "pensieve_num_requests_running", "num_waiting": "pensieve_num_requests_waiting",
          "gpu_blocks_total": "pensieve_gpu_blocks_total", "gpu_blocks_used": "pensieve_gpu_blocks_used",
          "gpu_blocks_cached": "pensieve_gpu_blocks_cached", "cpu_blocks_total": "pensieve_cpu_blocks_total",
          "cpu_blocks_used": "pensieve_cpu_blocks_used"}


def _result(req: TurnRequest, send: float) -> TurnResult:
    return TurnResult(request_id=req.request_id, conversation_id=req.conversation_id, turn_index=req.turn_index,
                      send_time=send, prompt_tokens=len(req.prompt_token_ids))


def _free_accelerator_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


class EngineBackend(Backend):
    """An in-process Pensieve AsyncEngine."""

    def __init__(self, name: str, config: Any, weights: dict[str, Any] | None = None,
                 engine_process: bool = False) -> None:
        self.name = name
        self.config = config      # pensieve.config.EngineConfig
        self.weights = weights    # model path -> (model, hf_config, dtype), shared by the systems of one run
        self.engine_process = engine_process  # the engine steps in a child process (weights not shared)
        self.engine: Any = None

    async def start(self) -> None:
        if self.engine_process:
            from pensieve.engine.engine_process import EngineProcess

            self.engine = await asyncio.to_thread(EngineProcess, self.config)
        else:
            from pensieve.engine.async_engine import AsyncEngine

            key = self.config.model.model
            preloaded = self.weights.get(key) if self.weights is not None else None
            self.engine = AsyncEngine(self.config, preloaded=preloaded)
            if self.weights is not None:
                self.weights[key] = self.engine.engine.loaded
        self.tokenizer = self.engine.tokenizer
        self.max_model_len = int(self.engine.max_model_len)
        self.device = str(self.engine.device)

    async def submit(self, req: TurnRequest) -> TurnResult:
        from pensieve.sampling_params import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=req.max_tokens, ignore_eos=True)
        res = _result(req, _now())
        last = None
        try:
            # the first token and the end are all the records need: no per-token wake-ups of this
            # process's event loop, which shares the GIL with the engine thread it measures
            async for out in self.engine.generate(req.request_id, list(req.prompt_token_ids), params,
                                                  conversation_id=req.conversation_id, stream=False):
                if res.first_token_time is None and out.outputs and out.outputs[0].token_ids:
                    res.first_token_time = _now()
                last = out
        except Exception as exc:  # a refused or failed turn is recorded, not fatal to the run
            res.error = f"{type(exc).__name__}: {exc}"
            return res
        res.finish_time = _now()
        if last is not None:
            comp = last.outputs[0]
            res.output_token_ids = list(comp.token_ids)
            res.output_tokens = len(comp.token_ids)
            res.output_text = comp.text
            res.gpu_hit_tokens = last.cache.gpu_hit_tokens
            res.cpu_hit_tokens = last.cache.cpu_hit_tokens
            res.recomputed_tokens = last.cache.recomputed_tokens
            res.cached_tokens = last.cache.cached_tokens
            if comp.finish_reason == "abort":
                res.error = "aborted"
        return res

    async def profile(self, num_steps: int) -> str:
        return await self.engine.profile(num_steps)

    async def end_conversation(self, conversation_id: str) -> None:
        # delete_conversation waits for the engine thread: keep the event loop free meanwhile
        await asyncio.to_thread(self.engine.delete_conversation, conversation_id)

    async def stats(self) -> dict[str, float] | None:
        # The engine publishes a stats snapshot after each step, just after it streams the step's outputs:
        # between runs wait (briefly) for the snapshot that shows the engine idle.
        deadline = time.perf_counter() + 2.0
        st = self.engine.stats()
        while (st.num_running or st.num_waiting) and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
            st = self.engine.stats()
        return {k: v for k, v in dataclasses.asdict(st).items() if isinstance(v, (int, float))}

    async def sample(self) -> dict[str, float] | None:
        st = self.engine.stats()        # the snapshot the engine published after its last step
        return {k: float(getattr(st, k)) for k in GAUGES}

    async def close(self) -> None:
        if self.engine is not None:
            await self.engine.shutdown()
            self.engine = None
        _free_accelerator_memory()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "engine", "engine_process": self.engine_process,
                "config": _jsonable(dataclasses.asdict(self.config))}


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _extra(obj: Any, key: str) -> Any:
    """A field an OpenAI response object carries beyond the official schema (pydantic extra='allow')."""
    if obj is None:
        return None
    val = getattr(obj, key, None)
    if val is None:
        extra = getattr(obj, "model_extra", None) or {}
        val = extra.get(key)
    return val


class HttpBackend(Backend):
    """A running OpenAI-compatible server. api="completions" sends token-id prompts to /v1/completions;
    api="chat" sends the conversation as messages to /v1/chat/completions. Both stream (TTFT) and ask for
    usage (cached tokens). Generated ids come from a `token_ids` field on the choice when the server sends
    one; otherwise the reply text is re-tokenized (recorded as history_ids="retokenized")."""

    def __init__(self, name: str, url: str, model: str | None = None, api: str = "completions",
                 tokenizer_path: str | None = None, api_key: str | None = None, timeout_s: float = 3600.0) -> None:
        if api not in ("completions", "chat"):
            raise ValueError(f"api must be completions or chat, got {api!r}")
        self.name = name
        self.url = url.rstrip("/")
        self.model = model
        self.api = api
        self.tokenizer_path = tokenizer_path
        self.api_key = api_key or "EMPTY"
        self.timeout_s = timeout_s
        self.client: Any = None
        self._metrics_client: Any = None
        self.history_ids = "unknown"

    async def start(self) -> None:
        import openai

        self.client = openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=self.api_key, max_retries=0,
                                         timeout=self.timeout_s)
        models = await self.client.models.list()
        entries = list(models.data)
        if self.model is None:
            if not entries:
                raise RuntimeError(f"{self.url}/v1/models lists no model")
            self.model = entries[0].id
        for m in entries:
            if m.id == self.model:
                mml = _extra(m, "max_model_len")
                self.max_model_len = int(mml) if mml else None
                root = _extra(m, "root")
                if self.tokenizer_path is None and isinstance(root, str) and Path(root).exists():
                    self.tokenizer_path = root   # a checkpoint directory or .gguf on this machine
        if self.tokenizer_path is None and Path(str(self.model)).is_dir():
            self.tokenizer_path = str(self.model)
        if self.tokenizer_path is not None:
            from pensieve.model.gguf import load_tokenizer

            self.tokenizer = load_tokenizer(self.tokenizer_path)
        self.device = "remote"

    def _usage_into(self, res: TurnResult, usage: Any) -> None:
        if usage is None:
            return
        res.prompt_tokens = int(usage.prompt_tokens or res.prompt_tokens)
        details = getattr(usage, "prompt_tokens_details", None)
        if details is not None:
            res.cached_tokens = int(getattr(details, "cached_tokens", 0) or 0)
        # Pensieve's usage extension: {"pensieve": {"gpu_hit_tokens", "cpu_hit_tokens", "recomputed_tokens"}}
        tiers = _extra(usage, "pensieve")
        for key in ("gpu_hit_tokens", "cpu_hit_tokens", "recomputed_tokens"):
            val = tiers.get(key) if isinstance(tiers, dict) else _extra(details, key)
            if val is not None:
                setattr(res, key, int(val))
        if usage.completion_tokens is not None:
            res.output_tokens = int(usage.completion_tokens)

    async def submit(self, req: TurnRequest) -> TurnResult:
        res = _result(req, _now())
        text_parts: list[str] = []
        ids: list[int] | None = None
        usage = None
        common = dict(model=self.model, max_tokens=req.max_tokens, temperature=0.0, stream=True,
                      stream_options={"include_usage": True})
        try:
            if self.api == "completions":
                stream = await self.client.completions.create(
                    prompt=list(req.prompt_token_ids),
                    extra_body={"ignore_eos": True, "return_token_ids": True,
                                "conversation_id": req.conversation_id}, **common)
            else:
                stream = await self.client.chat.completions.create(
                    messages=list(req.messages),
                    extra_body={"ignore_eos": True, "conversation_id": req.conversation_id}, **common)
            async for chunk in stream:
                for choice in chunk.choices or []:
                    piece = choice.text if self.api == "completions" else (choice.delta.content or "")
                    if res.first_token_time is None and (piece or choice.finish_reason):
                        res.first_token_time = _now()
                    text_parts.append(piece or "")
                    chunk_ids = _extra(choice, "token_ids")
                    if chunk_ids:
                        ids = (ids or []) + [int(t) for t in chunk_ids]
                if chunk.usage is not None:
                    usage = chunk.usage
        except Exception as exc:
            res.error = f"{type(exc).__name__}: {exc}"
            return res
        res.finish_time = _now()
        res.output_text = "".join(text_parts)
        if ids is not None:
            self.history_ids = "exact"
            res.output_token_ids = ids
        elif self.tokenizer is not None:
            self.history_ids = "retokenized"
            res.output_token_ids = list(self.tokenizer.encode(res.output_text, add_special_tokens=False))
        res.output_tokens = len(res.output_token_ids)
        self._usage_into(res, usage)
        if res.output_tokens > 0 and res.first_token_time is None:
            res.first_token_time = res.finish_time
        if self.api == "completions":
            res.cached_tokens = res.cached_tokens or (res.gpu_hit_tokens + res.cpu_hit_tokens)
        return res

    async def stats(self) -> dict[str, float] | None:
        """Samples of the server's /metrics whose name starts with pensieve (swap traffic, hits)."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        out: dict[str, float] = {}
        deadline = time.perf_counter() + 2.0
        while True:   # like EngineBackend.stats: wait (briefly) for a snapshot of the idle engine
            try:
                async with httpx.AsyncClient(timeout=10.0) as client:
                    resp = await client.get(self.url + "/metrics")
                if resp.status_code != 200:
                    return None
            except httpx.HTTPError:
                return None
            out.clear()
            for fam in text_string_to_metric_families(resp.text):
                for s in fam.samples:
                    if s.name.startswith("pensieve") and not s.name.endswith(("_bucket", "_created")):
                        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                        out[f"{s.name}{{{labels}}}" if labels else s.name] = float(s.value)
            busy = out.get("pensieve_num_requests_running", 0) + out.get("pensieve_num_requests_waiting", 0)
            if not busy or time.perf_counter() > deadline:
                return out
            await asyncio.sleep(0.02)

    async def sample(self) -> dict[str, float] | None:
        """The engine gauges of the server's /metrics now; None when the server has none (not Pensieve)."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        try:
            if self._metrics_client is None:
                self._metrics_client = httpx.AsyncClient(timeout=10.0)
            resp = await self._metrics_client.get(self.url + "/metrics")
        except httpx.HTTPError:
            return {}                   # a missed sample; the next one may answer
        if resp.status_code != 200:
            return None
        values = {s.name: float(s.value) for fam in text_string_to_metric_families(resp.text) for s in fam.samples}
        out = {field: values[name] for field, name in GAUGES.items() if name in values}
        return out or None

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None
        if self._metrics_client is not None:
            await self._metrics_client.aclose()
            self._metrics_client = None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "http", "url": self.url, "model": self.model, "api": self.api,
                "history_ids": self.history_ids}


def _accepted_kwargs(fn: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The kwargs `fn` accepts (transformers' continuous batching API moves between releases)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


class TransformersBackend(Backend):
    """HF transformers' continuous batching (`model.init_continuous_batching()` manager), driven request by
    request with streaming. Stateless across turns: each turn's whole prompt is prefilled again (prefix block
    sharing is off unless allow_prefix_sharing)."""

    def __init__(self, name: str, model_path: str, dtype: str = "auto", device: str = "auto",
                 num_kv_tokens: int | None = None, page_size: int = 256, max_batch_tokens: int | None = None,
                 allow_prefix_sharing: bool = False) -> None:
        self.name = name
        self.model_path = model_path
        self.dtype = dtype
        self.device_req = device
        self.num_kv_tokens = num_kv_tokens
        self.page_size = page_size
        self.max_batch_tokens = max_batch_tokens
        self.allow_prefix_sharing = allow_prefix_sharing
        self.model: Any = None
        self.manager: Any = None
        self._queues: dict[str, asyncio.Queue[Any]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._dead: BaseException | None = None  # set once the manager stopped: later turns fail at once
        self.version = "?"

    async def start(self) -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, GenerationConfig

        self.version = transformers.__version__
        try:
            from transformers import ContinuousBatchingConfig
        except ImportError:
            try:
                from transformers.generation.configuration_utils import ContinuousBatchingConfig
            except ImportError:
                ContinuousBatchingConfig = None  # noqa: N806 - older releases pass options on GenerationConfig
        device = self.device_req
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        if self.dtype == "auto":
            torch_dtype = torch.float32 if device == "cpu" else torch.bfloat16
        else:
            torch_dtype = getattr(torch, self.dtype)
        from pensieve.model.gguf import load_tokenizer, pretrained_args

        self.tokenizer = load_tokenizer(self.model_path)
        name, gguf = pretrained_args(self.model_path)   # a .gguf: transformers dequantizes it itself
        try:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, **gguf)
        except TypeError:
            model = AutoModelForCausalLM.from_pretrained(name, torch_dtype=torch_dtype, **gguf)
        self.model = model.to(device).eval()
        self.max_model_len = getattr(model.config, "max_position_embeddings", None)
        if not hasattr(self.model, "init_continuous_batching"):
            raise RuntimeError(f"transformers {self.version} has no continuous batching "
                               "(model.init_continuous_batching); the transformers system needs transformers >= 5")
        gen = GenerationConfig(do_sample=False, max_new_tokens=256, eos_token_id=-1,
                               pad_token_id=self.tokenizer.pad_token_id or 0)
        cb_opts: dict[str, Any] = {"allow_block_sharing": self.allow_prefix_sharing}
        if self.num_kv_tokens is not None:
            cb_opts["num_blocks"] = max(1, self.num_kv_tokens // self.page_size)
        # Given explicitly: inferring it from free memory fails on some releases (5.17 on a CPU without psutil).
        cb_opts["max_batch_tokens"] = self.max_batch_tokens or 2048
        kwargs: dict[str, Any] = {"generation_config": gen}
        if ContinuousBatchingConfig is not None:
            names = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)} \
                if dataclasses.is_dataclass(ContinuousBatchingConfig) else set(cb_opts) | {"page_size"}
            cb_opts["page_size" if "page_size" in names else "block_size"] = self.page_size
            kwargs["continuous_batching_config"] = ContinuousBatchingConfig(
                **{k: v for k, v in cb_opts.items() if k in names})
        else:
            for k, v in cb_opts.items():
                setattr(gen, k, v)
        try:
            self.manager = self.model.init_continuous_batching(**_accepted_kwargs(self.model.init_continuous_batching,
                                                                                  kwargs))
            self.manager.start()
        except Exception as exc:
            raise RuntimeError(f"transformers {self.version}: could not start continuous batching: "
                               f"{type(exc).__name__}: {exc}") from exc
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._pump, name="bench-transformers-results", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        """Move results from the manager's output queue to the asyncio queue of their request."""
        assert self._loop is not None
        while not self._stop.is_set():
            try:
                out = self.manager.get_result(timeout=0.1)
            except Exception as exc:  # the manager died: fail every waiting request
                self._fail_all(exc)
                return
            if out is None:
                if not self.manager.is_running():
                    self._fail_all(RuntimeError("transformers continuous batching thread stopped"))
                    return
                continue
            q = self._queues.get(out.request_id)
            if q is not None:
                self._loop.call_soon_threadsafe(q.put_nowait, out)

    def _fail_all(self, exc: BaseException) -> None:
        """Called from the pump thread: every waiting turn, and every later one, gets `exc`."""
        assert self._loop is not None
        self._dead = exc
        for q in list(self._queues.values()):
            self._loop.call_soon_threadsafe(q.put_nowait, exc)

    async def submit(self, req: TurnRequest) -> TurnResult:
        res = _result(req, _now())
        if self._dead is not None:  # no pump left to answer: fail now rather than wait forever
            res.error = f"{type(self._dead).__name__}: {self._dead}"
            return res
        q: asyncio.Queue[Any] = asyncio.Queue()
        self._queues[req.request_id] = q
        kwargs = _accepted_kwargs(self.manager.add_request, dict(
            input_ids=list(req.prompt_token_ids), request_id=req.request_id, max_new_tokens=req.max_tokens,
            streaming=True, eos_token_id=-1))
        try:
            await asyncio.to_thread(self.manager.add_request, **kwargs)
            while True:
                try:
                    out = await asyncio.wait_for(q.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if self._dead is not None:  # died between our registration and its broadcast
                        raise self._dead
                    continue
                if isinstance(out, Exception):
                    raise out
                if getattr(out, "error", None):
                    raise RuntimeError(out.error)
                toks = list(getattr(out, "generated_tokens", []) or [])
                if res.first_token_time is None and toks:
                    res.first_token_time = _now()
                if out.is_finished():
                    res.finish_time = _now()
                    res.output_token_ids = toks
                    res.output_tokens = len(toks)
                    break
        except Exception as exc:
            res.error = f"{type(exc).__name__}: {exc}"
        finally:
            self._queues.pop(req.request_id, None)
        return res

    async def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)
        if self.manager is not None:
            try:
                await asyncio.to_thread(self.manager.stop, True, 30.0)
            except Exception:  # noqa: BLE001 - stopping a dead manager must not fail the report
                pass
            self.manager = None
        self.model = None
        _free_accelerator_memory()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "transformers", "transformers_version": self.version,
                "model": self.model_path, "num_kv_tokens": self.num_kv_tokens, "page_size": self.page_size,
                "allow_prefix_sharing": self.allow_prefix_sharing}
