"""Windows of engine steps for torch.profiler: count N busy steps, then report what ran.

The profiler must start in the thread that loaded the CUDA profiler (Kineto): the synchronous
engine profiles in its own (the caller's) thread; the async engine starts the profiler in the
caller's thread and asks the engine thread only to count steps. GPU kernels are recorded
process-wide either way.
"""
from __future__ import annotations

import time
from typing import Callable

import torch


def activities(cuda: bool) -> list[torch.profiler.ProfilerActivity]:
    acts = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    return acts


def report(summary: str, prof: torch.profiler.profile, cuda: bool, rows: int = 25) -> str:
    """The window's summary line, then the ops with the most self time (GPU, then host)."""
    avg = prof.key_averages()
    lines = [summary]
    for key in (["self_device_time_total"] if cuda else []) + ["self_cpu_time_total"]:
        try:
            lines.append(avg.table(sort_by=key, row_limit=rows, max_name_column_width=60))
        except Exception as exc:  # column names move between torch versions
            lines.append(f"(no table by {key}: {exc})")
    return "\n".join(lines)


class StepWindow:
    """Counts the next `num_steps` busy steps; then calls `done` with 'K steps in W s: {path: n}'."""

    def __init__(self, num_steps: int, done: Callable[[str], None], cuda: bool,
                 on_begin: Callable[[], None] | None = None) -> None:
        self.left, self.done, self.cuda, self.on_begin = num_steps, done, cuda, on_begin
        self.paths: dict[str, int] = {}
        self.t0: float | None = None

    def begin_step(self) -> None:
        if self.t0 is None:
            if self.on_begin is not None:
                self.on_begin()
            self.t0 = time.perf_counter()

    def end_step(self, path: str) -> bool:
        """True once the window is full (and reported)."""
        self.paths[path] = self.paths.get(path, 0) + 1
        if path != "idle":
            self.left -= 1
        if self.left > 0:
            return False
        if self.cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - (self.t0 or time.perf_counter())
        self.done(f"{sum(self.paths.values())} steps in {wall:.3f} s: {self.paths}")
        return True


def kernel_times(prof: torch.profiler.profile, calls: int) -> list[tuple[str, float, float]]:
    """(kernel, launches per call, device microseconds per call) for every kernel a profile recorded
    over `calls` calls of the same work (graph replays, launches), longest first."""
    rows = []
    for e in prof.key_averages():
        total = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)  # renamed across torch versions
        if total > 0:
            rows.append((e.key, e.count / calls, total / calls))
    return sorted(rows, key=lambda r: -r[2])


def interval_union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of (start, end) intervals as sorted, disjoint intervals (touching ones merge)."""
    merged: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def copy_overlap(copies: list[tuple[float, float]], compute: list[tuple[float, float]]) -> dict[str, float]:
    """How much of the time the GPU spent copying (union of copy intervals) ran while compute kernels
    ran too (intersection with the union of compute intervals). Times in any one unit."""
    cu, ku = interval_union(copies), interval_union(compute)
    copy_time = sum(b - a for a, b in cu)
    both, j = 0.0, 0
    for a, b in cu:
        while j < len(ku) and ku[j][1] <= a:
            j += 1
        k = j
        while k < len(ku) and ku[k][0] < b:
            both += min(b, ku[k][1]) - max(a, ku[k][0])
            k += 1
    return {"copy_time": copy_time, "overlapped": both, "share": both / copy_time if copy_time else 0.0}


def hidden_share(forward_s: list[float], pipelined_s: list[float], copy_s: float,
                 resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """The share of a copy's time hidden behind compute, from paired rounds: round i timed a forward
    alone (forward_s[i]) and the same forward with the copy pipelined into it (pipelined_s[i]), back
    to back. What a round's pipelined step lost is the copy time not hidden; the share is one minus
    its median over the copy's own time, clamped to [0, 1]. Also the share at the exposure's
    quartiles (how single rounds scatter) and a bootstrap 95% interval of the median (how well the
    rounds pin it down: a forward drifts by about as much as a short copy takes)."""
    import numpy as np

    exposed = np.asarray(pipelined_s, dtype=float) - np.asarray(forward_s, dtype=float)
    if exposed.size == 0 or copy_s <= 0:
        raise ValueError("need paired rounds and a positive copy time")

    def share(x: float) -> float:
        return max(0.0, min(1.0, 1.0 - float(x) / copy_s))

    q25, q50, q75 = np.percentile(exposed, [25, 50, 75])
    medians = np.median(np.random.default_rng(seed).choice(exposed, (resamples, exposed.size)), axis=1)
    lo, hi = np.percentile(medians, [97.5, 2.5])  # more exposure, less hidden
    return {"share": share(q50), "iqr_low": share(q75), "iqr_high": share(q25),
            "ci95_low": share(lo), "ci95_high": share(hi)}


def trace_copy_overlap(prof: torch.profiler.profile, copy_kernel: str = "_copy_blocks_kernel") -> dict[str, float]:
    """copy_overlap over a profiled window's GPU activity: memcpys and the block-copy kernel are copies,
    every other kernel is compute. Also the host's time inside cudaMemcpyAsync (a copy that blocks the
    host shows up here with the copy's whole duration) and the count of each, in microseconds."""
    copies, compute = [], []
    host_memcpy_us, host_memcpy_n = 0.0, 0
    for e in prof.events():
        span = (e.time_range.start, e.time_range.end)
        if e.device_type == torch.autograd.DeviceType.CUDA:
            (copies if e.name.startswith("Memcpy") or copy_kernel in e.name else compute).append(span)
        elif e.name == "cudaMemcpyAsync":
            host_memcpy_us += span[1] - span[0]
            host_memcpy_n += 1
    out = copy_overlap(copies, compute)
    out.update(copies=len(copies), kernels=len(compute), host_memcpy_us=host_memcpy_us, host_memcpy_calls=host_memcpy_n)
    return out
