"""Metrics on hand-made timelines with known answers."""
from __future__ import annotations

import pytest

from pensieve.bench.metrics import headline, percentile, ratio, stats_delta, summarize, sustained_rate
from pensieve.bench.records import TurnResult


def rec(send: float, first: float, finish: float, out: int, prompt: int = 10, gpu: int = 0, cpu: int = 0,
        recomputed: int = 0, error: str | None = None) -> TurnResult:
    return TurnResult(request_id=f"r{send}", conversation_id="c", turn_index=0, send_time=send,
                      first_token_time=first, finish_time=finish, prompt_tokens=prompt, output_tokens=out,
                      gpu_hit_tokens=gpu, cpu_hit_tokens=cpu, recomputed_tokens=recomputed,
                      cached_tokens=gpu + cpu, error=error)


def test_record_latencies():
    r = rec(1.0, 1.5, 3.0, out=4)
    assert r.ttft == pytest.approx(0.5)
    assert r.e2e == pytest.approx(2.0)
    assert r.normalized_latency == pytest.approx(0.5)
    assert r.tpot == pytest.approx(0.5)          # 1.5 s for the 3 tokens after the first
    assert rec(0, 1, 1, out=1).tpot is None


def test_percentile_linear_interpolation():
    assert percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)
    assert percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 90) == pytest.approx(9.1)
    assert percentile([], 50) is None


def test_summarize_known_timeline():
    records = [
        rec(0.0, 0.5, 2.0, out=10, prompt=100, gpu=60, cpu=20, recomputed=5),   # norm 0.2
        rec(1.0, 1.2, 2.0, out=4, prompt=50, gpu=0, cpu=0),                       # norm 0.25
        rec(2.0, 2.1, 4.0, out=20, prompt=50, gpu=40),                             # norm 0.1
        rec(3.0, 3.1, 3.2, out=0, error="boom"),                                   # error: not counted
    ]
    s = summarize(records)
    assert s["num_requests"] == 3 and s["num_errors"] == 1
    assert s["span_s"] == pytest.approx(4.0)
    assert s["throughput_rps"] == pytest.approx(3 / 4.0)
    assert s["output_tokens_per_s"] == pytest.approx(34 / 4.0)
    assert s["normalized_latency"]["mean"] == pytest.approx((0.2 + 0.25 + 0.1) / 3)
    assert s["normalized_latency"]["p50"] == pytest.approx(0.2)
    assert s["normalized_latency"]["p90"] == pytest.approx(0.24)       # 0.2 + 0.8 * (0.25 - 0.2)
    assert s["ttft"]["mean"] == pytest.approx((0.5 + 0.2 + 0.1) / 3)
    assert s["tpot"]["mean"] == pytest.approx((1.5 / 9 + 0.8 / 3 + 1.9 / 19) / 3)
    c = s["cache"]
    assert (c["prompt_tokens"], c["gpu_hit_tokens"], c["cpu_hit_tokens"], c["recomputed_tokens"]) == (200, 100, 20, 5)
    assert c["computed_prompt_tokens"] == 80
    assert c["hit_rate"] == pytest.approx(0.6) and c["cpu_hit_rate"] == pytest.approx(0.1)
    # warmup drops the turns sent before it
    assert summarize(records, warmup=1.5)["num_requests"] == 1
    assert summarize([])["throughput_rps"] == 0.0


def test_sustained_rate_interpolation():
    xs = [0.5, 1.0, 2.0, 4.0]
    lats = [0.04, 0.06, 0.12, 0.30]
    r = sustained_rate(xs, lats, 0.1)
    assert r.status == "interpolated"
    assert r.value == pytest.approx(1.0 + (0.1 - 0.06) / (0.12 - 0.06) * 1.0)
    assert sustained_rate(xs, lats, 0.5).value == 4.0 and sustained_rate(xs, lats, 0.5).status == "at_least"
    low = sustained_rate(xs, lats, 0.01)
    assert low.value is None and low.status == "below_range"
    # unsorted input, a failed point (None) counts as over the bound
    r2 = sustained_rate([2.0, 1.0], [None, 0.05], 0.1)
    assert r2.value == 1.0 and r2.status == "interpolated"
    # first crossing wins even if a later point dips back
    assert sustained_rate([1, 2, 3], [0.05, 0.15, 0.05], 0.1).value == pytest.approx(1.5)
    # past saturation throughput falls (OPT-13B tiered, benchmarks/results/multiturn/opt-13b-r10-22/: 30.4,
    # 39.0, 38.4 req/s at 10, 16, 22 conv/s): points go by offered rate, and the overloaded point cannot
    # pull the answer below 39.0
    thr, lat, offered = [30.4, 39.0, 38.4], [0.024, 0.074, 0.288], [10, 16, 22]
    assert sustained_rate(thr, lat, 0.08, offered).value == pytest.approx(39.0)
    assert sustained_rate(thr, lat, 0.05, offered).value == pytest.approx(30.4 + (0.026 / 0.05) * 8.6)
    # throughput falls before latency crosses (Llama-2-13B-GQA10 tiered,
    # benchmarks/results/multiturn/llama-2-13b-gqa10-headline-d05a776/: 85.4, 79.3, 81.9 req/s at 26, 30, 34
    # conv/s): the best point under the bound stands, crossed or never crossed
    thr, lat, offered = [85.4, 79.3, 81.9], [0.0228, 0.0425, 0.0899], [26, 30, 34]
    assert sustained_rate(thr, lat, 0.05, offered).value == pytest.approx(85.4)
    assert sustained_rate(thr, lat, 0.03, offered).value == pytest.approx(85.4)
    never = sustained_rate(thr, lat, 0.1, offered)
    assert (never.value, never.status) == (pytest.approx(85.4), "at_least")
    # a later point with more throughput still counts, interpolated towards the crossing as before
    assert sustained_rate([10, 12, 20], [0.02, 0.03, 0.07], 0.05).value == pytest.approx(12 + 0.5 * 8)


def test_ratio_and_delta():
    assert ratio(3.0, 2.0) == pytest.approx(1.5)
    assert ratio(None, 2.0) is None and ratio(1.0, 0.0) is None
    assert stats_delta({"a": 1, "b": 2.5, "s": "x"}, {"a": 4, "b": 3.0, "s": "y", "new": 1}) == {"a": 3, "b": 0.5}
    assert stats_delta(None, {"a": 1}) == {}


def _point(rate: float, thr: float, mean: float, p90: float) -> dict:
    return {"rate": rate, "summary": {"throughput_rps": thr, "normalized_latency": {"mean": mean, "p90": p90}}}


def test_headline_ratios():
    pts = {
        "tiered": [_point(1, 5.0, 0.05, 0.08), _point(2, 10.0, 0.08, 0.12), _point(4, 20.0, 0.2, 0.3)],
        "stateless": [_point(1, 5.0, 0.08, 0.1), _point(2, 10.0, 0.2, 0.4), _point(4, 20.0, 0.5, 0.9)],
        "gpu": [_point(1, 5.0, 0.06, 0.09), _point(2, 10.0, 0.1, 0.14), _point(4, 20.0, 0.3, 0.5)],
    }
    h = headline(pts, [0.1, 0.2])
    tiered = h["sustained_rates"]["mean"]["0.1"]["tiered"]["value"]
    stateless = h["sustained_rates"]["mean"]["0.1"]["stateless"]["value"]
    assert tiered == pytest.approx(10.0 + (0.1 - 0.08) / 0.12 * 10.0)
    assert stateless == pytest.approx(5.0 + (0.1 - 0.08) / 0.12 * 5.0)
    assert h["tiered_vs_stateless"]["mean"]["0.1"] == pytest.approx(tiered / stateless)
    assert h["tiered_vs_gpu"]["mean"]["0.1"] == pytest.approx(tiered / 10.0)
    assert h["tiered_vs_transformers"]["mean"]["0.1"] is None       # not run
    assert h["sustained_rates"]["mean"]["0.2"]["tiered"]["status"] == "at_least"
    assert h["ratio_status"]["tiered_vs_stateless"]["mean"]["0.1"] == "exact"
    assert h["ratio_status"]["tiered_vs_transformers"]["mean"]["0.1"] == "not_run"
    # tiered never crosses 0.2 (a lower bound), gpu crosses it at 4.0 -> 20 req/s... interpolated
    assert h["ratio_status"]["tiered_vs_gpu"]["mean"]["0.2"] == "lower_bound"
    assert h["tiered_vs_gpu"]["mean"]["0.2"] == pytest.approx(20.0 / (10.0 + 0.1 / 0.2 * 10.0))
    # P90 variant and the rate axis
    assert h["sustained_rates"]["p90"]["0.1"]["tiered"]["value"] == pytest.approx(5.0 + 0.02 / 0.04 * 5.0)
    hr = headline(pts, [0.1], x_key="rate")
    assert hr["sustained_rates"]["mean"]["0.1"]["gpu"]["value"] == pytest.approx(2.0)


def test_tiered_ratio_statuses():
    from pensieve.bench.metrics import tiered_ratio

    interp = {"value": 4.0, "status": "interpolated"}
    assert tiered_ratio(interp, {"value": 2.0, "status": "interpolated"}) == (2.0, "exact")
    assert tiered_ratio({"value": 8.0, "status": "at_least"}, interp) == (2.0, "lower_bound")
    assert tiered_ratio(interp, {"value": 8.0, "status": "at_least"}) == (0.5, "upper_bound")
    assert tiered_ratio({"value": 8.0, "status": "at_least"}, {"value": 8.0, "status": "at_least"}) == \
        (None, "unknown")
    assert tiered_ratio(interp, {"value": None, "status": "below_range"}) == (None, "base_below_range")
    # a base over the bound at its lowest swept rate (3 req/s) sustains less: tiered / 3 is a lower bound
    assert tiered_ratio(interp, {"value": None, "status": "below_range", "below": 3.0}) == (4.0 / 3.0, "lower_bound")
    assert tiered_ratio({"value": None, "status": "below_range", "below": 1.0},
                        {"value": None, "status": "below_range", "below": 3.0}) == (None, "base_below_range")
    # tiered over the bound at its lowest swept rate (6 req/s) sustains less: 6 / base is an upper bound, not 0
    assert tiered_ratio({"value": None, "status": "below_range", "below": 6.0}, interp) == (1.5, "upper_bound")
    assert tiered_ratio({"value": None, "status": "below_range"}, interp) == (None, "tiered_below_range")


def test_sustained_rate_below_range_records_the_lowest_rate():
    from pensieve.bench.metrics import sustained_rate

    r = sustained_rate([6.0, 3.0], [0.2, 0.15], 0.1)
    assert (r.value, r.status, r.to_json()["below"]) == (None, "below_range", 3.0)


def _turn(conv: str, idx: int, ttft: float, prompt: int, cached: int) -> TurnResult:
    return TurnResult(request_id=f"{conv}-{idx}", conversation_id=conv, turn_index=idx, send_time=float(idx),
                      first_token_time=idx + ttft, finish_time=idx + ttft + 1.0, prompt_tokens=prompt,
                      output_tokens=10, gpu_hit_tokens=cached, cached_tokens=cached)


def test_turn_view_by_turn_number():
    from pensieve.bench.metrics import turn_view

    recs = [_turn("a", 0, 0.4, 100, 0), _turn("b", 0, 0.6, 100, 0),        # turn 1: nothing cached
            _turn("a", 1, 0.1, 200, 150), _turn("b", 1, 0.3, 200, 50),      # turn 2: 200 of 400 cached
            *[_turn("c", i, 0.2, 1000, 900) for i in range(2, 12)]]        # turns 3-12, one each
    view = turn_view(recs)
    t1, t2 = view["per_turn"]["1"], view["per_turn"]["2"]
    assert t1["count"] == 2 and t1["hit_rate"] == 0.0 and t1["ttft"]["mean"] == pytest.approx(0.5)
    assert t2["hit_rate"] == pytest.approx(0.5) and t2["ttft"]["mean"] == pytest.approx(0.2)
    assert set(view["per_turn"]) == {str(i) for i in range(1, 13)}
    b = view["buckets"]
    assert list(b) == ["1", "2", "3", "4", "5", "6-10", "11-20"]
    assert b["6-10"]["count"] == 5 and b["11-20"]["count"] == 2 and b["6-10"]["hit_rate"] == pytest.approx(0.9)
    # the summary carries the view of its measured turns
    assert summarize(recs, warmup=1.0)["by_turn"]["per_turn"].keys() == {str(i) for i in range(2, 13)}


def _gauges(running: float, waiting: float, used: float, cached: float = 0.0, total: float = 100.0) -> dict:
    return {"num_running": running, "num_waiting": waiting, "gpu_blocks_total": total, "gpu_blocks_used": used,
            "gpu_blocks_cached": cached, "cpu_blocks_total": 200.0, "cpu_blocks_used": 50.0}


def test_occupancy_says_what_binds():
    from pensieve.bench.metrics import occupancy

    # running requests hold 90% of the pool while others wait: the pool caps the batch
    pool = [(t, _gauges(40, 5 if t >= 2 else 0, 90 if t >= 2 else 30, 5)) for t in range(10)]
    o = occupancy(pool, warmup=1.0, max_num_seqs=256)
    assert o["binds"] == "gpu_pool" and o["samples"] == 9
    assert o["gpu_used_frac"]["max"] == pytest.approx(0.9) and o["num_running"]["mean"] == 40
    assert o["cpu_used_frac"]["mean"] == pytest.approx(0.25)
    assert o["pool_bound_share"] == pytest.approx(8 / 9)
    # the warm-up samples are left out: the same run seen from t=2 is bound in every sample
    assert occupancy(pool, warmup=2.0)["pool_bound_share"] == 1.0
    seqs = [(t, _gauges(16, 3, 40, 20)) for t in range(5)]
    assert occupancy(seqs, max_num_seqs=16)["binds"] == "max_num_seqs"
    assert occupancy(seqs, max_num_seqs=256)["binds"] == "queue"              # waiting with pool room
    idle = [(t, _gauges(3, 0, 10, 60)) for t in range(5)]
    o = occupancy(idle, max_num_seqs=256)
    assert o["binds"] == "none" and o["gpu_free_frac"]["mean"] == pytest.approx(0.3)
    assert occupancy(idle, max_num_seqs=256, preemptions=2)["binds"] == "gpu_pool"   # preempted: the pool was short
    assert occupancy([])["samples"] == 0


def test_ratios_across_seeds():
    from pensieve.bench.metrics import across_seeds

    def point(rate: float, p90: float) -> dict:
        return {"rate": rate, "summary": {"throughput_rps": rate, "num_requests": 10,
                                          "normalized_latency": {"mean": p90, "p90": p90}}}

    per_seed = {
        # seed 0: tiered crosses 0.1 at 30, stateless at 15: 2.0 exactly
        "0": headline({"tiered": [point(20, 0.05), point(40, 0.15)], "stateless": [point(10, 0.05), point(20, 0.15)]},
                      [0.1]),
        # seed 1: 1.5
        "1": headline({"tiered": [point(20, 0.05), point(40, 0.15)], "stateless": [point(15, 0.05), point(25, 0.15)]},
                      [0.1]),
        # seed 2: tiered never crossed: >= 40 / 20
        "2": headline({"tiered": [point(20, 0.05), point(40, 0.08)], "stateless": [point(10, 0.05), point(30, 0.15)]},
                      [0.1]),
    }
    out = across_seeds(per_seed)
    cell = out["ratios"]["tiered_vs_stateless"]["p90"]["0.1"]
    assert cell["values"] == {"0": pytest.approx(2.0), "1": pytest.approx(1.5), "2": pytest.approx(2.0)}
    assert cell["status"] == {"0": "exact", "1": "exact", "2": "lower_bound"}
    assert (cell["n"], cell["min"], cell["max"]) == (3, pytest.approx(1.5), pytest.approx(2.0))
    assert cell["mean"] == pytest.approx(5.5 / 3)
    assert out["ratios"]["tiered_vs_gpu"]["p90"]["0.1"]["n"] == 0
    assert out["sustained_rates"]["p90"]["0.1"]["stateless"]["values"]["1"] == pytest.approx(20.0)
