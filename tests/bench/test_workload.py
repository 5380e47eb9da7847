"""Poisson arrivals, think times and the schedule built from them."""
from __future__ import annotations

import numpy as np
import pytest

from pensieve.bench.datasets import SHAREGPT_SPEC, generate_synthetic
from pensieve.bench.workload import (WorkloadConfig, append_turn_prompt, build_schedule, num_arrivals,
                                     poisson_arrivals, think_times)


def test_poisson_interarrival_mean_and_shape():
    rng = np.random.default_rng(0)
    times = poisson_arrivals(4.0, rng, duration=5000.0)
    gaps = np.diff([0.0, *times])
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() == pytest.approx(0.25, rel=0.05)            # exponential: std == mean
    assert len(times) == pytest.approx(4.0 * 5000, rel=0.03)
    assert all(b > a for a, b in zip(times, times[1:])) and times[-1] <= 5000.0
    # counts in unit windows are Poisson: variance == mean
    counts = np.bincount(np.floor(times).astype(int), minlength=5000)
    assert counts.var() / counts.mean() == pytest.approx(1.0, abs=0.1)


def test_poisson_bounds():
    rng = np.random.default_rng(1)
    assert len(poisson_arrivals(10.0, rng, max_count=17)) == 17
    with pytest.raises(ValueError):
        poisson_arrivals(1.0, rng)
    with pytest.raises(ValueError):
        poisson_arrivals(0.0, rng, duration=1.0)


def test_think_times():
    rng = np.random.default_rng(2)
    t = think_times(rng, 60.0, 20000)
    assert np.mean(t) == pytest.approx(60.0, rel=0.03)
    assert min(t) >= 0
    assert think_times(rng, 0.0, 3) == [0.0, 0.0, 0.0]


def test_schedule_is_deterministic_and_complete():
    convs = generate_synthetic(SHAREGPT_SPEC, 200, list(range(50)), seed=0)
    cfg = WorkloadConfig(rate=2.0, think_time_mean=30.0, duration=40.0, seed=5)
    s1, s2 = build_schedule(convs, cfg), build_schedule(convs, cfg)
    assert s1 == s2
    assert len(s1) == num_arrivals(cfg)
    assert [sc.start_time for sc in s1] == sorted(sc.start_time for sc in s1)
    for sc in s1:
        assert len(sc.think_times) == len(sc.conversation.turns) - 1
    all_think = [t for sc in s1 for t in sc.think_times]
    assert np.mean(all_think) == pytest.approx(30.0, rel=0.25)
    with pytest.raises(ValueError, match="conversations"):
        build_schedule(convs[:3], cfg)
    with pytest.raises(ValueError):
        WorkloadConfig(rate=1.0, duration=None, max_conversations=None)


def test_turn_prompt_appends_ids():
    assert append_turn_prompt([1, 2, 3], [9, 8]) == [1, 2, 3, 9, 8]
    assert append_turn_prompt([], (4,)) == [4]


def test_a_rate_point_has_the_same_workload_in_any_sweep():
    """Seeds follow the rate, not its place in --rates: runs split across device calls merge point by point."""
    import argparse

    from pensieve.bench.cli import ConversationSource, add_bench_arguments, point_seed

    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    args = parser.parse_args(["--duration", "5", "--seed", "3"])
    source = ConversationSource(args, None)

    def point(rate: float, index: int):
        cfg = WorkloadConfig(rate=rate, think_time_mean=1.0, duration=5.0, seed=point_seed(args.seed, rate))
        convs = source.for_point(cfg, index)
        return [(c.turns, c.system) for c in convs], [(s.start_time, s.think_times) for s in build_schedule(convs, cfg)]

    assert point(6.0, 1) == point(6.0, 0)          # "--rates 3,6" and "--rates 6" agree at 6 conv/s
    assert point(3.0, 0)[0] != point(6.0, 0)[0][:len(point(3.0, 0)[0])]  # and rate points differ
    assert point_seed(3, 6.0) != point_seed(4, 6.0)
