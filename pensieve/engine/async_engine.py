"""The engine behind the server: one background thread steps the engine while asyncio callers stream.

Callers never touch engine state: they post commands (add, abort, delete) to
the engine thread, which applies them between steps and pushes each step's
outputs back to the callers' event loops.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
from concurrent.futures import Future
from typing import Any, AsyncIterator, Callable

import torch

from pensieve.config import EngineConfig
from pensieve.engine import profiling
from pensieve.engine.llm_engine import EngineStats, LLMEngine
from pensieve.engine.outputs import RequestOutput
from pensieve.engine.streams import OutputStreams
from pensieve.sampling_params import SamplingParams

log = logging.getLogger(__name__)

__all__ = ["AsyncEngine", "EngineStats"]


class AsyncEngine:
    """The engine on a thread of the caller's process; implements EngineClient (engine/client.py)."""

    def __init__(self, config: EngineConfig, preloaded: tuple | None = None) -> None:
        self.config = config
        if config.gil_switch_interval_s is not None and sys.getswitchinterval() > config.gil_switch_interval_s:
            sys.setswitchinterval(config.gil_switch_interval_s)  # process-wide: see EngineConfig
        self.engine = LLMEngine(config, preloaded)
        self.tokenizer = self.engine.tokenizer
        self.max_model_len = self.engine.max_model_len
        self.model_name = config.model.model
        self.device = self.engine.device.type
        self._commands: queue.SimpleQueue[Callable[[], Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams = OutputStreams()
        self._stats = self.engine.stats()
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="pensieve-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        checked = True
        while self._running:
            self._drain()
            if not self.engine.has_unfinished():
                if not checked:
                    checked = True
                    self.engine.idle_check()
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            checked = False
            in_flight = self._streams.ids()
            outputs, error = self.engine.step_or_abort(in_flight)
            if error is not None:
                for rid in in_flight:
                    self._streams.fail(rid, RuntimeError(error))
                if self.engine.failure is not None:   # no rank group to step on: the engine is over
                    log.error("the engine stopped: %s", self.engine.failure)
                    self._running = False
                    self._streams.fail_all(RuntimeError(f"the engine stopped: {self.engine.failure}"))
                    self.engine.shutdown()
                continue
            self._stats = self.engine.stats()  # before the outputs: a caller that saw its last token sees this step
            self._streams.deliver(outputs)

    def _drain(self) -> None:
        changed = False
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            cmd()
            changed = True
        if changed:
            self._stats = self.engine.stats()

    def _post(self, cmd: Callable[[], Any]) -> None:
        self._commands.put(cmd)
        self._wake.set()

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the engine thread and wait for its result."""
        fut: Future = Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:  # handed back to the caller
                fut.set_exception(exc)

        self._post(run)
        return fut.result()

    # ------------------------------------------------------------ caller side
    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       conversation_id: str | None = None, append_to_conversation: bool = False,
                       stream: bool = True, cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """stream=True: an output per step carrying only what is new (outputs.py). False: the output of
        the first token (time to first token) and a final one with the whole completion, so a caller
        that streams nothing costs the event loop two wake-ups per request, not one per token."""
        if not self._running:
            raise RuntimeError("the engine is shut down")
        if not append_to_conversation:  # an appended turn is checked whole, on the engine thread
            self.engine.validate_prompt(prompt_token_ids, params)  # pure: raises ValueError before anything starts
        outputs = self._streams.open(request_id)

        def add() -> None:
            try:
                self.engine.add_request(request_id, prompt_token_ids, params, conversation_id,
                                        append_to_conversation=append_to_conversation, stream=stream,
                                        cache_salt=cache_salt)
            except Exception as exc:
                self._streams.fail(request_id, exc)

        self._post(add)
        async for out in outputs.iterate(abandon=lambda: self._post(lambda: self._abort_on_engine(request_id))):
            yield out

    def _abort_on_engine(self, request_id: str) -> None:
        """On the engine thread: free the request's blocks and hand its caller the final output."""
        stream = self._streams.pop(request_id)
        out = self.engine.abort_request(request_id)
        if stream is not None and out is not None:
            stream.put(out)

    async def abort(self, request_id: str) -> None:
        self._post(lambda: self._abort_on_engine(request_id))

    def delete_conversation(self, conversation_id: str) -> bool:
        return self._call(lambda: self.engine.delete_conversation(conversation_id))

    def reset_cache(self) -> bool:
        return self._call(self.engine.reset_cache)

    def cached_block_keys(self) -> tuple[list[bytes], list[bytes]]:
        """Content keys each tier holds (GPU, CPU), read on the engine thread between steps."""
        return self._call(self.engine.cached_block_keys)

    def stats(self) -> EngineStats:
        return self._stats

    @property
    def alive(self) -> bool:
        return self._running and self._thread.is_alive()

    def check_integrity(self) -> None:
        self._call(self.engine.check_integrity)

    async def profile(self, num_steps: int) -> str:
        """torch.profiler over the engine's next `num_steps` busy steps; returns the report. The
        profiler runs in the caller's thread (the CUDA profiler cannot start on the engine thread):
        it records the engine's GPU kernels and the caller's host ops."""
        loop = asyncio.get_running_loop()
        window: asyncio.Future[str] = loop.create_future()
        cuda = self.engine.device.type == "cuda"

        def done(summary: str) -> None:
            loop.call_soon_threadsafe(lambda: window.done() or window.set_result(summary))

        with torch.profiler.profile(activities=profiling.activities(cuda)) as prof:
            self._post(lambda: self.engine.watch_steps(num_steps, done))
            summary = await window
        return profiling.report(summary, prof, cuda)

    async def shutdown(self) -> None:
        if not self._running:
            return

        def close() -> None:
            outputs, saved = self.engine.close(self._streams.ids())
            self._streams.deliver(outputs)
            if saved is not None:
                log.info("saved %d cached KV blocks to %s", saved, self.config.cache.persist_path)

        await asyncio.get_running_loop().run_in_executor(None, self._call, close)
        self._running = False
        self._wake.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10)
