"""The engine core in a process of its own (`pensieve serve --engine-process`).

AsyncEngine steps the engine on a thread of the server's process, so the engine's Python
(scheduling, batch building, postprocessing) and the server's event loop (HTTP, JSON, SSE) take
turns on one GIL, and under load the engine waits for it after every GPU step. Here the engine
steps in a child process (spawned: CUDA is initialised there only) and the server talks to it
through two pipes: commands in; one message per step out, holding that step's outputs and a stats
snapshot. Messages are the frozen dataclasses below, pickled by the pipes. A sender thread writes
the commands, so the event loop never blocks on a full pipe; a reader thread routes each step's
outputs to the callers' loops. The caller-side surface is AsyncEngine's (EngineClient).
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
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Union

from pensieve.config import EngineConfig
from pensieve.distributed.worker import die_with_parent
from pensieve.engine.llm_engine import EngineStats, LLMEngine
from pensieve.engine.outputs import RequestOutput
from pensieve.engine.streams import OutputStreams
from pensieve.model.gguf import load_tokenizer
from pensieve.sampling_params import SamplingParams

log = logging.getLogger(__name__)

# engine methods callers may run and wait for
_CALLS = ("delete_conversation", "reset_cache", "check_integrity", "cached_block_keys")


# ------------------------------------------------------------------ messages
# server -> engine
@dataclass(frozen=True)
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    conversation_id: str | None
    append_to_conversation: bool
    stream: bool
    cache_salt: str | None


@dataclass(frozen=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True)
class CallEngine:
    """Run engine method `name` (one of _CALLS) and reply with its result."""
    call_id: int
    name: str
    args: tuple


@dataclass(frozen=True)
class Profile:
    call_id: int
    num_steps: int


@dataclass(frozen=True)
class Shutdown:
    pass


Command = Union[AddRequest, AbortRequest, CallEngine, Profile, Shutdown]


# engine -> server
@dataclass(frozen=True)
class Ready:
    max_model_len: int
    device: str
    stats: EngineStats


@dataclass(frozen=True)
class StartFailed:
    error: BaseException


@dataclass(frozen=True)
class StepOutputs:
    outputs: list[RequestOutput]
    stats: EngineStats            # after the step: a caller that saw its last token sees this step


@dataclass(frozen=True)
class RequestFailed:
    """The engine refused one request (a bad prompt, a busy conversation)."""
    request_id: str
    error: BaseException


@dataclass(frozen=True)
class StepFailed:
    """A step raised: the engine aborted every request it held and goes on serving."""
    request_ids: list[str]
    error: str


@dataclass(frozen=True)
class Reply:
    call_id: int
    result: Any
    error: BaseException | None


@dataclass(frozen=True)
class Bye:
    saved_blocks: int | None      # blocks saved to the persist path at shutdown (None: not saved)


Result = Union[Ready, StartFailed, StepOutputs, RequestFailed, StepFailed, Reply, Bye]


# ------------------------------------------------------------------ the child process
def _engine_main(config: EngineConfig, commands: Connection, results: Connection, log_level: int) -> None:
    # Ctrl-C reaches the whole process group: the server shuts the engine down in order (in-flight
    # requests aborted, the cache saved), so the engine itself ignores it. Killed with the server.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s [engine]: %(message)s")
    try:
        engine = LLMEngine(config)
    except BaseException as exc:  # reported to the parent, which raises it
        results.send(StartFailed(_portable(exc)))
        return
    results.send(Ready(engine.max_model_len, engine.device.type, engine.stats()))
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

    def send(self, msg: Result) -> None:
        self.results.send(msg)

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
                self.send(StepFailed(sorted(self.live), error))
                self.live.clear()
                if self.engine.failure is not None:   # a rank died: this process ends, the server sees it
                    log.error("the engine stopped: %s", self.engine.failure)
                    self.engine.shutdown()
                    return
                continue
            self.live.difference_update(o.request_id for o in outputs if o.finished)
            self.send(StepOutputs(outputs, self.engine.stats()))

    def apply(self, msg: Command) -> bool:
        """Applies one command; False once the engine has shut down."""
        if isinstance(msg, AddRequest):
            try:
                self.engine.add_request(msg.request_id, msg.prompt_token_ids, msg.params, msg.conversation_id,
                                        append_to_conversation=msg.append_to_conversation, stream=msg.stream,
                                        cache_salt=msg.cache_salt)
            except Exception as exc:
                self.send(RequestFailed(msg.request_id, _portable(exc)))
            else:
                self.live.add(msg.request_id)
        elif isinstance(msg, AbortRequest):
            out = self.engine.abort_request(msg.request_id)
            self.live.discard(msg.request_id)
            if out is not None:
                self.send(StepOutputs([out], self.engine.stats()))
        elif isinstance(msg, CallEngine):
            try:
                if msg.name not in _CALLS:
                    raise ValueError(f"not an engine call: {msg.name!r}")
                result = getattr(self.engine, msg.name)(*msg.args)
            except Exception as exc:
                self.send(Reply(msg.call_id, None, _portable(exc)))
            else:
                self.send(StepOutputs([], self.engine.stats()))   # a call may change them (a cache reset)
                self.send(Reply(msg.call_id, result, None))
        elif isinstance(msg, Profile):  # torch.profiler in this process's main thread, which steps the engine
            call_id = msg.call_id
            self.engine.profile_steps(msg.num_steps, lambda report: self.send(Reply(call_id, report, None)))
        elif isinstance(msg, Shutdown):
            outputs, saved = self.engine.close(sorted(self.live))
            if outputs:
                self.send(StepOutputs(outputs, self.engine.stats()))
            self.send(Bye(saved))
            return False
        else:
            log.error("unknown engine command %r", msg)
        return True


# ------------------------------------------------------------------ the server's side
class EngineProcess:
    """The engine in a child process; implements EngineClient (engine/client.py)."""

    def __init__(self, config: EngineConfig, start_timeout_s: float = 900.0) -> None:
        self.config = config
        self.model_name = config.model.model
        self.tokenizer = load_tokenizer(config.model.model, config.model.tokenizer)
        ctx = mp.get_context("spawn")
        cmd_recv, self._cmd_send = ctx.Pipe(duplex=False)
        self._res_recv, res_send = ctx.Pipe(duplex=False)
        # a daemonic process may not start children: with tensor parallelism this one starts the other
        # ranks, and dies with the server all the same (die_with_parent)
        self._proc = ctx.Process(target=_engine_main, name="pensieve-engine",
                                 args=(config, cmd_recv, res_send, logging.getLogger().level),
                                 daemon=config.tensor_parallel_size == 1)
        self._proc.start()
        cmd_recv.close()
        res_send.close()
        if not self._res_recv.poll(start_timeout_s):
            self._proc.terminate()
            raise RuntimeError(f"the engine process did not start within {start_timeout_s:.0f} s")
        try:
            first: Result = self._res_recv.recv()
        except EOFError:
            first = StartFailed(RuntimeError("the engine process exited while starting"))
        if not isinstance(first, Ready):
            self._proc.join(10)
            err = first.error if isinstance(first, StartFailed) else RuntimeError(repr(first))
            raise RuntimeError(f"the engine process failed to start: {type(err).__name__}: {err}") from err
        self.max_model_len = first.max_model_len
        self.device = first.device
        self._stats: EngineStats = first.stats
        self._streams = OutputStreams()
        self._calls: dict[int, Future] = {}
        self._call_ids = itertools.count()
        self._outbox: queue.SimpleQueue[Command | None] = queue.SimpleQueue()
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
                msg: Result = self._res_recv.recv()
            except (EOFError, OSError):
                break
            if isinstance(msg, StepOutputs):
                self._stats = msg.stats  # before the outputs: a caller that saw its last token sees this step
                self._streams.deliver(msg.outputs)
            elif isinstance(msg, RequestFailed):
                self._streams.fail(msg.request_id, msg.error)
            elif isinstance(msg, StepFailed):
                for rid in msg.request_ids:
                    self._streams.fail(rid, RuntimeError(msg.error))
            elif isinstance(msg, Reply):
                fut = self._calls.pop(msg.call_id, None)
                if fut is not None and msg.error is not None:
                    fut.set_exception(msg.error)
                elif fut is not None:
                    fut.set_result(msg.result)
            elif isinstance(msg, Bye):
                if msg.saved_blocks is not None:
                    log.info("saved %d cached KV blocks to %s", msg.saved_blocks, self.config.cache.persist_path)
                reason = "the engine is shut down"
                break
        self._running = False
        self._streams.fail_all(RuntimeError(reason))
        for fut in list(self._calls.values()):
            fut.set_exception(RuntimeError(reason))
        self._calls.clear()

    def _post(self, msg: Command) -> None:
        self._outbox.put(msg)

    def _call(self, make: Any, *payload: Any) -> Future:
        """Posts `make(call_id, *payload)` and returns the future its Reply resolves."""
        fut: Future = Future()
        call_id = next(self._call_ids)
        self._calls[call_id] = fut
        self._post(make(call_id, *payload))
        if not self._running:  # raced with the reader's exit
            self._calls.pop(call_id, None)
            fut.set_exception(RuntimeError("the engine process exited"))
        return fut

    # ------------------------------------------------------------ caller side
    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       conversation_id: str | None = None, append_to_conversation: bool = False,
                       stream: bool = True, cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """As AsyncEngine.generate; the prompt is validated by the engine process (errors come back
        as the stream's exception)."""
        if not self._running:
            raise RuntimeError("the engine is shut down")
        out_stream = self._streams.open(request_id)
        self._post(AddRequest(request_id, list(prompt_token_ids), params, conversation_id, append_to_conversation,
                              stream, cache_salt))
        async for out in out_stream.iterate(abandon=lambda: self._post(AbortRequest(request_id))):
            yield out

    async def abort(self, request_id: str) -> None:
        self._post(AbortRequest(request_id))

    def delete_conversation(self, conversation_id: str) -> bool:
        return self._call(CallEngine, "delete_conversation", (conversation_id,)).result()

    def reset_cache(self) -> bool:
        return self._call(CallEngine, "reset_cache", ()).result()

    def check_integrity(self) -> None:
        self._call(CallEngine, "check_integrity", ()).result()

    def cached_block_keys(self) -> tuple[list[bytes], list[bytes]]:
        return self._call("call", "cached_block_keys", ()).result()

    def stats(self) -> EngineStats:
        return self._stats

    @property
    def alive(self) -> bool:
        return self._running and self._proc.is_alive()

    async def profile(self, num_steps: int) -> str:
        """torch.profiler over the engine's next `num_steps` busy steps, run in the engine process."""
        return await asyncio.wrap_future(self._call(Profile, num_steps))

    async def shutdown(self) -> None:
        if not self._proc.is_alive():
            return
        self._post(Shutdown())
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._reader.join, 120)
        self._outbox.put(None)
        await loop.run_in_executor(None, self._proc.join, 30)
        if self._proc.is_alive():
            log.warning("the engine process did not exit; terminating it")
            self._proc.terminate()
