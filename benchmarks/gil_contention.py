"""Why the async engine lowers the GIL switch interval: a model of its thread, measured on any CPU.

The engine thread waits for the GPU with the GIL released (~14 ms, a 13B decode step), then does
~1 ms of Python (postprocess, schedule, prepare). A busy event-loop thread beside it (the server's,
or the in-process benchmark's) holds the GIL until the interpreter's switch interval forces a
hand-off, so each step can stall for up to that interval after the GPU is done.

    python benchmarks/gil_contention.py

Prints a markdown table of the host overhead per step at three switch intervals, with the other thread busy
and idle (seconds, no GPU). Results: docs/BENCHMARKS.md, "Host".
"""
from __future__ import annotations

import statistics
import sys
import threading
import time

GPU_S = 0.014       # the GPU's part of a step, GIL released
HOST_ITERS = 20000  # ~0.5-1 ms of Python on the engine thread


def busy(stop: threading.Event) -> None:
    x = 0
    while not stop.is_set():
        for i in range(1000):
            x += i


def step_overheads(n: int) -> list[float]:
    """Per step: wall time beyond the GPU's part."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        time.sleep(GPU_S)
        s = 0
        for i in range(HOST_ITERS):
            s += i
        out.append(time.perf_counter() - t - GPU_S)
    return out


def main() -> None:
    print("| switch interval | host overhead per step, loop thread busy | idle |")
    print("|---|---|---|")
    default = sys.getswitchinterval()
    for interval in (0.005, 0.001, 0.0005):
        sys.setswitchinterval(interval)
        stop = threading.Event()
        th = threading.Thread(target=busy, args=(stop,))
        th.start()
        loaded = step_overheads(100)
        stop.set()
        th.join()
        idle = step_overheads(30)
        print(f"| {interval * 1e3:.1f} ms | {1e3 * statistics.median(loaded):.2f} ms | {1e3 * statistics.median(idle):.2f} ms |")
    sys.setswitchinterval(default)


if __name__ == "__main__":
    main()
