"""The engine core in a process of its own (`pensieve serve --engine-process`).

AsyncEngine steps the engine on a thread of the server's process, so the engine's Python
(scheduling, batch building, postprocessing) and the server's event loop (HTTP, JSON, SSE) take
turns on one GIL, and under load the engine waits for it after every GPU step. Here the engine
steps in a child process (spawned: CUDA is initialised there only) and the server talks to it
through two pipes: commands in; one message per step out, holding that step's outputs and a stats
snapshot. A sender thread writes the commands, so the event loop never blocks on a full pipe; a
reader thread routes each step's outputs to the callers' loops. The caller-side surface is
AsyncEngine's.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing as mp
import pickle
import queue
import signal
import threading
from collections.abc import AsyncIterator
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any

from transformers import AutoTokenizer

from pensieve.config import EngineConfig
from pensieve.engine.llm_engine import EngineStats, LLMEngine
from pensieve.engine.outputs import RequestOutput
from pensieve.engine.streams import OutputStreams
from pensieve.sampling_params import SamplingParams

log = logging.getLogger(__name__)

_CALLS = ("delete_conversation", "check_integrity", "cached_block_keys")   # engine methods callers may run and wait for


# ------------------------------------------------------------------ the child process
def _engine_main(config: EngineConfig, commands: Connection, results: Connection, log_level: int) -> None:
    # Ctrl-C reaches the whole process group: the server shuts the engine down in order (in-flight
    # requests aborted, the cache saved), so the engine itself ignores it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s [engine]: %(message)s")
    try:
        engine = LLMEngine(config)
    except BaseException as exc:  # reported to the parent, which raises it
        results.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    results.send(("ready", {"max_model_len": engine.max_model_len, "device": engine.device.type,
                            "stats": engine.stats()}))
    _EngineLoop(engine, commands, results).run()


def _portable(exc: BaseException) -> BaseException:
    """The exception itself when it survives pickling (ValueError for a bad prompt does), else a
    RuntimeError with its text: an unpicklable one must not take the engine process down."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


class _EngineLoop:
    def __init__(self, engine: LLMEngine, commands: Connection, results: Connection) -> None:
        self.engine, self.commands, self.results = engine, commands, results
        self.live: set[str] = set()   # requests added and not yet finished

    def run(self) -> None:
        checked = True
        while True:
            idle = not self.engine.has_unfinished()
            if idle and not checked:
                checked = True
                self.engine.idle_check()
            while self.commands.poll(0.05 if idle else 0):
                try:
                    msg = self.commands.recv()
                except EOFError:  # the server is gone without a shutdown: nobody to serve
                    return
                if not self.apply(msg):
                    return
                idle = False
            if not self.engine.has_unfinished():
                continue
            checked = False
            outputs, error = self.engine.step_or_abort(self.live)
            if error is not None:
                self.results.send(("failed_requests", sorted(self.live), error))
                self.live.clear()
                continue
            self.live.difference_update(o.request_id for o in outputs if o.finished)
            self.results.send(("step", outputs, self.engine.stats()))

    def apply(self, msg: tuple) -> bool:
        kind = msg[0]
        if kind == "add":
            _, rid, prompt, params, conv, append, every_step = msg
            try:
                self.engine.add_request(rid, prompt, params, conv, append_to_conversation=append,
                                        every_step=every_step)
            except Exception as exc:
                self.results.send(("request_error", rid, _portable(exc)))
            else:
                self.live.add(rid)
        elif kind == "abort":
            out = self.engine.abort_request(msg[1])
            self.live.discard(msg[1])
            if out is not None:
                self.results.send(("step", [out], self.engine.stats()))
        elif kind == "call":
            _, call_id, name, args = msg
            try:
                if name not in _CALLS:
                    raise ValueError(f"not an engine call: {name!r}")
                result = getattr(self.engine, name)(*args)
            except Exception as exc:
                self.results.send(("reply", call_id, None, _portable(exc)))
            else:
                self.results.send(("reply", call_id, result, None))
        elif kind == "profile":  # torch.profiler in this process's main thread, which steps the engine
            _, call_id, num_steps = msg
            self.engine.profile_steps(num_steps, lambda report: self.results.send(("reply", call_id, report, None)))
        elif kind == "shutdown":
            outputs, saved = self.engine.close(sorted(self.live))
            if outputs:
                self.results.send(("step", outputs, self.engine.stats()))
            self.results.send(("bye", saved))
            return False
        return True


# ------------------------------------------------------------------ the server's side
class EngineProcess:
    def __init__(self, config: EngineConfig, start_timeout_s: float = 900.0) -> None:
        self.config = config
        self.model_name = config.model.model
        self.tokenizer = AutoTokenizer.from_pretrained(config.model.tokenizer or config.model.model)
        ctx = mp.get_context("spawn")
        cmd_recv, self._cmd_send = ctx.Pipe(duplex=False)
        self._res_recv, res_send = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_engine_main, name="pensieve-engine",
                                 args=(config, cmd_recv, res_send, logging.getLogger().level), daemon=True)
        self._proc.start()
        cmd_recv.close()
        res_send.close()
        if not self._res_recv.poll(start_timeout_s):
            self._proc.terminate()
            raise RuntimeError(f"the engine process did not start within {start_timeout_s:.0f} s")
        kind, info = self._res_recv.recv()
        if kind != "ready":
            self._proc.join(10)
            raise RuntimeError(f"the engine process failed to start: {info}")
        self.max_model_len = info["max_model_len"]
        self.device = info["device"]
        self._stats: EngineStats = info["stats"]
        self._streams = OutputStreams()
        self._calls: dict[int, Future] = {}
        self._call_ids = itertools.count()
        self._outbox: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._running = True
        self._sender = threading.Thread(target=self._send_loop, name="pensieve-engine-send", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name="pensieve-engine-read", daemon=True)
        self._sender.start()
        self._reader.start()

    # ------------------------------------------------------------ threads
    def _send_loop(self) -> None:
        while (msg := self._outbox.get()) is not None:
            try:
                self._cmd_send.send(msg)
            except (OSError, ValueError):  # the child is gone; the reader fails what was waiting
                return

    def _read_loop(self) -> None:
        reason = "the engine process exited"
        while True:
            try:
                msg = self._res_recv.recv()
            except (EOFError, OSError):
                break
            kind = msg[0]
            if kind == "step":
                self._stats = msg[2]  # before the outputs: a caller that saw its last token sees this step
                self._streams.deliver(msg[1])
            elif kind == "request_error":
                self._streams.fail(msg[1], msg[2])
            elif kind == "failed_requests":
                for rid in msg[1]:
                    self._streams.fail(rid, RuntimeError(msg[2]))
            elif kind == "reply":
                fut = self._calls.pop(msg[1], None)
                if fut is not None and msg[3] is not None:
                    fut.set_exception(msg[3])
                elif fut is not None:
                    fut.set_result(msg[2])
            elif kind == "bye":
                if msg[1] is not None:
                    log.info("saved %d cached KV blocks to %s", msg[1], self.config.cache.persist_path)
                reason = "the engine is shut down"
                break
        self._running = False
        self._streams.fail_all(RuntimeError(reason))
        for fut in list(self._calls.values()):
            fut.set_exception(RuntimeError(reason))
        self._calls.clear()

    def _post(self, msg: tuple) -> None:
        self._outbox.put(msg)

    def _call(self, msg_kind: str, *payload: Any) -> Future:
        fut: Future = Future()
        call_id = next(self._call_ids)
        self._calls[call_id] = fut
        self._post((msg_kind, call_id, *payload))
        if not self._running:  # raced with the reader's exit
            self._calls.pop(call_id, None)
            fut.set_exception(RuntimeError("the engine process exited"))
        return fut

    # ------------------------------------------------------------ caller side
    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       conversation_id: str | None = None, append_to_conversation: bool = False,
                       every_step: bool = True) -> AsyncIterator[RequestOutput]:
        """As AsyncEngine.generate; the prompt is validated by the engine process (errors come back
        as the stream's exception)."""
        if not self._running:
            raise RuntimeError("the engine is shut down")
        stream = self._streams.open(request_id)
        self._post(("add", request_id, list(prompt_token_ids), params, conversation_id, append_to_conversation,
                    every_step))
        async for out in stream.iterate(abandon=lambda: self._post(("abort", request_id))):
            yield out

    async def abort(self, request_id: str) -> None:
        self._post(("abort", request_id))

    def delete_conversation(self, conversation_id: str) -> bool:
        return self._call("call", "delete_conversation", (conversation_id,)).result()

    def check_integrity(self) -> None:
        self._call("call", "check_integrity", ()).result()

    def cached_block_keys(self) -> tuple[list[bytes], list[bytes]]:
        return self._call("call", "cached_block_keys", ()).result()

    def stats(self) -> EngineStats:
        return self._stats

    @property
    def alive(self) -> bool:
        return self._running and self._proc.is_alive()

    async def profile(self, num_steps: int) -> str:
        """torch.profiler over the engine's next `num_steps` busy steps, run in the engine process."""
        return await asyncio.wrap_future(self._call("profile", num_steps))

    async def shutdown(self) -> None:
        if not self._proc.is_alive():
            return
        self._post(("shutdown",))
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._reader.join, 120)
        self._outbox.put(None)
        await loop.run_in_executor(None, self._proc.join, 30)
        if self._proc.is_alive():
            log.warning("the engine process did not exit; terminating it")
            self._proc.terminate()
