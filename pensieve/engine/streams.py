"""Per-request output queues in the callers' event loops, filled from the thread that runs or
reads the engine (AsyncEngine's engine thread, EngineProcess's reader thread)."""
from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterable

from pensieve.engine.outputs import RequestOutput


class OutputStream:
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's loop has closed: nobody is listening
            pass

    async def iterate(self, abandon: Callable[[], None]) -> AsyncIterator[RequestOutput]:
        """The request's outputs up to the finished one; `abandon` (abort it) if the caller stops
        early (disconnect, cancellation) or the request failed, so its blocks are freed at once."""
        finished = False
        try:
            while True:
                item = await self.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                abandon()


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for q, out in items:
        q.put_nowait(out)


class OutputStreams:
    def __init__(self) -> None:
        self._streams: dict[str, OutputStream] = {}
        self._lock = threading.Lock()

    def open(self, request_id: str) -> OutputStream:
        """From the caller's event loop, before the request reaches the engine. An id already in
        flight is refused here: replacing its stream would leave its caller waiting forever."""
        stream = OutputStream()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already running")
            self._streams[request_id] = stream
        return stream

    def pop(self, request_id: str) -> OutputStream | None:
        with self._lock:
            return self._streams.pop(request_id, None)

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._streams)

    def fail(self, request_id: str, exc: BaseException) -> None:
        stream = self.pop(request_id)
        if stream is not None:
            stream.put(exc)

    def fail_all(self, exc: BaseException) -> None:
        for rid in self.ids():
            self.fail(rid, exc)

    def deliver(self, outputs: Iterable[RequestOutput]) -> None:
        """One wake-up per event loop per step, not one per output: each call_soon_threadsafe writes
        to the loop's self-pipe, and the delivering thread would pay that (and a GIL hand-off) per
        running request."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        with self._lock:
            for out in outputs:
                stream = self._streams.pop(out.request_id, None) if out.finished else self._streams.get(out.request_id)
                if stream is not None:
                    by_loop.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that caller's loop has closed: nobody is listening
                pass
