"""Step windows, torch.profiler reports and copy/compute overlap from traces."""
from __future__ import annotations

import pytest

from pensieve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pensieve.model.random_checkpoint import make_random_checkpoint
from pensieve.sampling_params import SamplingParams
from tests.engine.test_conversation_cache import BS, DEVICE, converse, make_engine


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("llama"), "llama", seed=1, initializer_range=0.1)


def test_profile_window_reports_steps_and_ops(checkpoint):
    """profile_steps: torch.profiler over the next N busy steps, reported once through the callback."""
    engine = make_engine(checkpoint, "tiered", num_gpu_blocks=64, num_cpu_blocks=64)
    reports = []
    engine.profile_steps(3, reports.append)
    converse(engine, num_convs=2, num_turns=2)
    assert len(reports) == 1
    head, _, tables = reports[0].partition("\n")
    assert head.startswith("3 steps in ") and "Self CPU" in tables
    assert engine._window is None


def test_async_engine_profile_from_the_event_loop(checkpoint):
    """The server's engine steps on its own thread; a profile asked from the event loop still works
    (on CUDA the profiler must first start in the caller's thread)."""
    import asyncio

    from pensieve.engine.async_engine import AsyncEngine

    config = EngineConfig(
        model=ModelConfig(model=str(checkpoint), max_model_len=256),
        cache=CacheConfig(block_size=BS, num_gpu_blocks=64, num_cpu_blocks=64),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=48),
        device=DEVICE, enforce_eager=DEVICE == "cpu")

    async def main() -> str:
        engine = AsyncEngine(config)
        try:
            window = asyncio.create_task(engine.profile(2))
            params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
            async for _ in engine.generate("r0", [5, 6, 7, 8, 9], params):
                pass
            return await asyncio.wait_for(window, timeout=60)
        finally:
            await engine.shutdown()

    report = asyncio.run(main())
    assert report.startswith("2 steps in ")


def test_copy_overlap_from_intervals():
    """The share of copy time that ran beside compute: unions on both sides, partial overlaps counted."""
    from pensieve.engine.profiling import copy_overlap

    # copies 0-10 and 8-12 (union 0-12: 12 units); compute 5-7, 6-9, 11-20 (union 5-9, 11-20)
    got = copy_overlap([(0, 10), (8, 12)], [(5, 7), (6, 9), (11, 20)])
    assert got["copy_time"] == 12 and got["overlapped"] == 5 and abs(got["share"] - 5 / 12) < 1e-12
    assert copy_overlap([], [(0, 1)])["share"] == 0.0
    assert copy_overlap([(0, 4)], [(4, 8)])["overlapped"] == 0   # touching is not overlapping


def test_interval_union():
    from pensieve.engine.profiling import interval_union

    assert interval_union([(5, 7), (0, 2), (6, 9), (2, 3), (11, 20)]) == [(0, 3), (5, 9), (11, 20)]
    assert interval_union([(0, 10), (2, 4)]) == [(0, 10)] and interval_union([]) == []


def test_hidden_share_from_paired_rounds():
    """Exposure = pipelined - forward per round; share = 1 - median exposure / copy time, clamped;
    quartiles and a bootstrap interval of the median around it."""
    import pytest

    from pensieve.engine.profiling import hidden_share

    forward = [50.0, 52.0, 51.0, 53.0, 50.5]                 # drifting forward times (ms)
    exposed = [0.5, 1.0, 0.0, 2.0, 0.5]                      # the pipelined step's extra time per round
    got = hidden_share(forward, [f + e for f, e in zip(forward, exposed)], copy_s=4.0)
    assert abs(got["share"] - (1 - 0.5 / 4.0)) < 1e-12      # median exposure 0.5 of a 4.0 copy
    assert abs(got["iqr_low"] - (1 - 1.0 / 4.0)) < 1e-12 and abs(got["iqr_high"] - (1 - 0.5 / 4.0)) < 1e-12
    assert got["ci95_low"] <= got["share"] <= got["ci95_high"]
    assert got["ci95_low"] >= 1 - 2.0 / 4.0                 # a median of resamples never passes the worst round
    # a pipelined step faster than the forward hides everything; one slower than forward + copy hides nothing
    assert hidden_share([10.0], [9.0], 2.0)["share"] == 1.0
    assert hidden_share([10.0], [13.0], 2.0)["share"] == 0.0
    with pytest.raises(ValueError):
        hidden_share([], [], 1.0)


def test_trace_copy_overlap_reads_a_profile():
    """On the CPU a profile holds no GPU activity: zero copies, and the fields are all there."""
    import torch

    from pensieve.engine.profiling import trace_copy_overlap

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.ones(8).add_(1)
    got = trace_copy_overlap(prof)
    assert got["copies"] == 0 and got["share"] == 0.0 and got["kernels"] == 0 and "host_memcpy_us" in got


def test_kernel_times_are_per_call_and_longest_first():
    """Device time and launches divided by the calls profiled; events without device time are left out."""
    from types import SimpleNamespace

    from pensieve.engine.profiling import kernel_times

    events = [SimpleNamespace(key="store", count=10, device_time_total=50.0),
              SimpleNamespace(key="gemm", count=20, device_time_total=400.0),
              SimpleNamespace(key="aten::add", count=5, device_time_total=0.0)]
    prof = SimpleNamespace(key_averages=lambda: events)
    assert kernel_times(prof, calls=5) == [("gemm", 4.0, 80.0), ("store", 2.0, 10.0)]
