"""Benchmark metrics: pure functions over per-turn records and per-rate summaries."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from pensieve.bench.records import TurnResult

Variant = Literal["mean", "p90"]
VARIANT_KEYS: dict[str, str] = {"mean": "mean", "p90": "p90"}
BASELINES = ("stateless", "gpu", "transformers")


def percentile(values: Sequence[float], q: float) -> float | None:
    """q-th percentile (0..100) with linear interpolation between order statistics; None for no values."""
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def describe(values: Sequence[float]) -> dict[str, float | None]:
    """mean, P50, P90, P99 of a sample (all None when empty)."""
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "count": 0}
    return {
        "mean": float(np.mean(values)),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "count": len(values),
    }


def summarize(records: Iterable[TurnResult], warmup: float = 0.0) -> dict[str, Any]:
    """Throughput, latency distributions and cache use of the turns sent at or after `warmup` seconds.
    Throughput is counted over the span from the first measured send to the last measured finish."""
    measured = [r for r in records if r.send_time >= warmup]
    ok = [r for r in measured if r.ok]
    out: dict[str, Any] = {"num_requests": len(ok), "num_errors": len(measured) - len(ok)}
    if ok:
        span = max(r.finish_time for r in ok) - min(r.send_time for r in ok)  # type: ignore[type-var]
    else:
        span = 0.0
    out_tokens = sum(r.output_tokens for r in ok)
    out["span_s"] = span
    out["throughput_rps"] = len(ok) / span if span > 0 else 0.0
    out["output_tokens_per_s"] = out_tokens / span if span > 0 else 0.0
    out["output_tokens"] = out_tokens
    out["normalized_latency"] = describe([r.normalized_latency for r in ok])  # type: ignore[misc]
    out["ttft"] = describe([r.ttft for r in ok if r.ttft is not None])
    out["tpot"] = describe([r.tpot for r in ok if r.tpot is not None])
    out["e2e"] = describe([r.e2e for r in ok])  # type: ignore[misc]
    prompt = sum(r.prompt_tokens for r in ok)
    gpu = sum(r.gpu_hit_tokens for r in ok)
    cpu = sum(r.cpu_hit_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    out["by_turn"] = turn_view(ok)
    out["cache"] = {
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "gpu_hit_tokens": gpu,
        "cpu_hit_tokens": cpu,
        "recomputed_tokens": sum(r.recomputed_tokens for r in ok),
        "computed_prompt_tokens": prompt - cached,
        "hit_rate": cached / prompt if prompt else 0.0,
        "gpu_hit_rate": gpu / prompt if prompt else 0.0,
        "cpu_hit_rate": cpu / prompt if prompt else 0.0,
    }
    return out


# Turn-number buckets of the per-turn view's table (numbers count from 1, as users count turns).
TURN_BUCKETS: tuple[tuple[int, int | None], ...] = ((1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 10), (11, 20),
                                                    (21, 30), (31, None))


def _turn_stats(recs: Sequence[TurnResult]) -> dict[str, Any]:
    prompt = sum(r.prompt_tokens for r in recs)
    cached = sum(r.cached_tokens for r in recs)
    return {
        "count": len(recs),
        "prompt_tokens_mean": prompt / len(recs),
        "hit_rate": cached / prompt if prompt else 0.0,
        "gpu_hit_rate": sum(r.gpu_hit_tokens for r in recs) / prompt if prompt else 0.0,
        "cpu_hit_rate": sum(r.cpu_hit_tokens for r in recs) / prompt if prompt else 0.0,
        "ttft": describe([r.ttft for r in recs if r.ttft is not None]),
        "normalized_latency": describe([r.normalized_latency for r in recs]),  # type: ignore[misc]
    }


def turn_view(records: Iterable[TurnResult]) -> dict[str, Any]:
    """Cache hit rate (cached / prompt tokens) and TTFT by turn number, the view of SGLang's multi-turn
    benchmark: `per_turn` for every turn number (1 = a conversation's first turn), `buckets` over
    TURN_BUCKETS for the report's table. A turn's hit rate is what the cache saved of its history."""
    by_index: dict[int, list[TurnResult]] = {}
    for r in records:
        by_index.setdefault(r.turn_index + 1, []).append(r)
    per_turn = {str(k): _turn_stats(v) for k, v in sorted(by_index.items())}
    buckets: dict[str, Any] = {}
    for lo, hi in TURN_BUCKETS:
        recs = [r for k, v in by_index.items() if k >= lo and (hi is None or k <= hi) for r in v]
        if recs:
            label = str(lo) if hi == lo else (f"{lo}+" if hi is None else f"{lo}-{hi}")
            buckets[label] = _turn_stats(recs)
    return {"per_turn": per_turn, "buckets": buckets}


# A sample is "pool-bound" when the running requests hold this much of the GPU pool while others wait: the
# scheduler admits only while more than the admission reserve (10%) is free, so the batch can grow no further.
POOL_BOUND_USED = 0.85
POOL_BOUND_SHARE = 0.10      # a point whose samples are pool-bound this often is limited by the pool


def occupancy(samples: Sequence[tuple[float, Mapping[str, float]]], warmup: float = 0.0,
              max_num_seqs: int | None = None, preemptions: float = 0.0) -> dict[str, Any]:
    """The running batch and the GPU pool over a point, from the gauges sampled while it ran (those at or
    after `warmup` seconds), and what bound the batch:
    - gpu_pool: the running requests' KV filled the pool while requests waited (or requests were preempted);
    - max_num_seqs: the batch reached the scheduler's sequence cap;
    - queue: requests waited with pool room to spare (compute or the step's token budget binds);
    - none: nothing waited: the point is under capacity."""
    picked = [g for t, g in samples if t >= warmup] or [g for _, g in samples]
    picked = [g for g in picked if g.get("gpu_blocks_total")]
    if not picked:
        return {"samples": 0}
    total = float(picked[0]["gpu_blocks_total"])
    used = [g.get("gpu_blocks_used", 0.0) / total for g in picked]
    cached = [g.get("gpu_blocks_cached", 0.0) / total for g in picked]
    running = [g.get("num_running", 0.0) for g in picked]
    waiting = [g.get("num_waiting", 0.0) for g in picked]
    bound = sum(1 for u, w in zip(used, waiting) if u >= POOL_BOUND_USED and w > 0) / len(picked)
    if bound >= POOL_BOUND_SHARE or preemptions > 0:
        binds = "gpu_pool"
    elif max_num_seqs is not None and max(running) >= max_num_seqs:
        binds = "max_num_seqs"
    elif float(np.mean(waiting)) >= 1.0:
        binds = "queue"
    else:
        binds = "none"
    out: dict[str, Any] = {
        "samples": len(picked),
        "num_running": {"mean": float(np.mean(running)), "p50": percentile(running, 50),
                        "p90": percentile(running, 90), "max": max(running)},
        "num_waiting": {"mean": float(np.mean(waiting)), "max": max(waiting)},
        "gpu_blocks_total": total,
        "gpu_used_frac": {"mean": float(np.mean(used)), "p90": percentile(used, 90), "max": max(used)},
        "gpu_cached_frac": {"mean": float(np.mean(cached))},
        "gpu_free_frac": {"mean": float(np.mean([1.0 - u - c for u, c in zip(used, cached)]))},
        "pool_bound_share": bound,
        "preemptions": preemptions,
        "binds": binds,
    }
    cpu_total = float(picked[0].get("cpu_blocks_total", 0.0) or 0.0)
    if cpu_total > 0:
        cpu = [g.get("cpu_blocks_used", 0.0) / cpu_total for g in picked]
        out["cpu_used_frac"] = {"mean": float(np.mean(cpu)), "max": max(cpu)}
    return out


def stats_delta(before: Mapping[str, Any] | None, after: Mapping[str, Any] | None) -> dict[str, float]:
    """after - before for every numeric key both have (engine counters, /metrics samples)."""
    if not before or not after:
        return {}
    out: dict[str, float] = {}
    for k, v in after.items():
        b = before.get(k)
        if isinstance(v, (int, float)) and isinstance(b, (int, float)) and not isinstance(v, bool):
            out[k] = v - b
    return out


@dataclass(frozen=True)
class SustainedRate:
    value: float | None
    # interpolated: the bound is crossed between two swept points; at_least: never exceeded (value = the
    # highest swept point, a lower bound); below_range: exceeded already at the lowest point (value None,
    # and the rate it sustains is under `below`, the lowest swept x)
    status: str
    below: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"value": self.value, "status": self.status}
        if self.below is not None:
            out["below"] = self.below
        return out


def sustained_rate(xs: Sequence[float], latencies: Sequence[float | None], bound: float,
                   offered: Sequence[float] | None = None) -> SustainedRate:
    """Highest x (request rate) whose latency stays <= bound, interpolating linearly between the last point
    under the bound and the first one above it. Points are taken in increasing offered load (`offered`, the
    swept arrival rates; x itself when not given): past saturation the measured throughput stops growing or
    falls, so ordering by it would put an overloaded point before the last good one. For the same reason
    the answer is never below the highest x of a point under the bound before the crossing (a later good
    point, or the interpolation towards a crossing point, whose throughput fell, does not lower it). A
    missing latency counts as above the bound (the run failed at that rate)."""
    order = list(offered) if offered is not None else list(xs)
    pts = [(x, v) for _, x, v in sorted(zip(order, xs, latencies), key=lambda p: p[0])]
    if not pts:
        return SustainedRate(None, "below_range")
    lat = [math.inf if v is None else float(v) for _, v in pts]
    if lat[0] > bound:
        return SustainedRate(None, "below_range", float(pts[0][0]))
    best = float(pts[0][0])
    for i in range(1, len(pts)):
        if lat[i] > bound:
            x0, x1 = float(pts[i - 1][0]), float(pts[i][0])
            l0, l1 = lat[i - 1], lat[i]
            if math.isinf(l1):
                return SustainedRate(best, "interpolated")
            frac = (bound - l0) / (l1 - l0) if l1 != l0 else 0.0
            return SustainedRate(max(best, x0 + frac * max(0.0, x1 - x0)), "interpolated")
        best = max(best, float(pts[i][0]))
    return SustainedRate(best, "at_least")


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is unknown or b is 0."""
    if a is None or b is None or b <= 0:
        return None
    return a / b


def bound_key(bound: float) -> str:
    return f"{bound:g}"


def headline(points: Mapping[str, Sequence[Mapping[str, Any]]], bounds: Sequence[float],
             x_key: str = "throughput_rps") -> dict[str, Any]:
    """For each variant (mean, p90) and latency bound, each system's sustained rate and the tiered ratios.

    `points[system]` is that system's swept points, each {"rate": conversations/s, "summary": summarize(...)}.
    x_key picks the x-axis: "throughput_rps" (measured requests/s, the paper's axis) or "rate" (the offered
    conversation arrival rate)."""
    sustained: dict[str, dict[str, dict[str, Any]]] = {}
    for variant, stat in VARIANT_KEYS.items():
        sustained[variant] = {}
        for bound in bounds:
            per_sys: dict[str, Any] = {}
            for system, pts in points.items():
                # a point where no turn was even sent (no arrival in its window) says nothing about the bound
                pts = [p for p in pts if p["summary"].get("num_requests", 1) or p["summary"].get("num_errors", 0)]
                xs = [float(p["rate"]) if x_key == "rate" else float(p["summary"][x_key]) for p in pts]
                lats = [p["summary"]["normalized_latency"][stat] for p in pts]
                per_sys[system] = sustained_rate(xs, lats, bound, [float(p["rate"]) for p in pts]).to_json()
            sustained[variant][bound_key(bound)] = per_sys
    out: dict[str, Any] = {"x_axis": x_key, "sustained_rates": sustained, "ratio_status": {}}
    for base in BASELINES:
        key = f"tiered_vs_{base}"
        out[key] = {}
        out["ratio_status"][key] = {}
        for variant in VARIANT_KEYS:
            out[key][variant] = {}
            out["ratio_status"][key][variant] = {}
            for bound in bounds:
                per_sys = sustained[variant][bound_key(bound)]
                if "tiered" in per_sys and base in per_sys:
                    r, st = tiered_ratio(per_sys["tiered"], per_sys[base])
                else:
                    r, st = None, "not_run"
                out[key][variant][bound_key(bound)] = r
                out["ratio_status"][key][variant][bound_key(bound)] = st
    return out


def tiered_ratio(tiered: Mapping[str, Any], base: Mapping[str, Any]) -> tuple[float | None, str]:
    """tiered / base sustained rate, and what kind of number it is: exact (both interpolated), lower_bound
    (tiered never crossed the bound in the sweep), upper_bound (base never crossed), unknown (neither did:
    sweep higher rates), base_below_range (base over the bound everywhere and its lowest rate unknown) or
    tiered_below_range (the same for tiered). A base over the bound already at its lowest swept rate x
    sustains less than x, so tiered / x is a lower bound on the ratio; a tiered over the bound at its lowest
    rate x gives x / base as an upper bound (sweep tiered lower for the ratio itself)."""
    t_st, b_st = tiered["status"], base["status"]
    if b_st == "below_range":
        if t_st != "below_range" and base.get("below"):
            return tiered["value"] / base["below"], "lower_bound"
        return None, "base_below_range"
    if t_st == "below_range":
        if tiered.get("below") and base["value"]:
            return tiered["below"] / base["value"], "upper_bound"
        return None, "tiered_below_range"
    if t_st == "at_least" and b_st == "at_least":
        return None, "unknown"
    r = ratio(tiered["value"], base["value"])
    if t_st == "at_least":
        return r, "lower_bound"
    if b_st == "at_least":
        return r, "upper_bound"
    return r, "exact"


RATIO_KEYS = tuple(f"tiered_vs_{b}" for b in BASELINES)


def across_seeds(per_seed: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Headline figures over workload seeds: for each ratio (and each system's sustained rate), variant and
    bound, the value of every seed with its status, and the mean / min / max of the seeds that have one.
    `per_seed[seed]` is headline(...) of that seed's points alone."""

    def spread(values: Mapping[str, float | None]) -> dict[str, Any]:
        known = [v for v in values.values() if v is not None]
        return {"values": dict(values), "n": len(known),
                "mean": float(np.mean(known)) if known else None,
                "min": min(known) if known else None, "max": max(known) if known else None}

    out: dict[str, Any] = {"seeds": list(per_seed), "ratios": {}, "sustained_rates": {}}
    first = next(iter(per_seed.values()), None)
    if first is None:
        return out
    for key in RATIO_KEYS:
        out["ratios"][key] = {}
        for variant, per_bound in first.get(key, {}).items():
            out["ratios"][key][variant] = {}
            for bound in per_bound:
                values = {s: h[key][variant].get(bound) for s, h in per_seed.items()}
                cell = spread(values)
                cell["status"] = {s: h["ratio_status"][key][variant].get(bound) for s, h in per_seed.items()}
                out["ratios"][key][variant][bound] = cell
    for variant, per_bound in first["sustained_rates"].items():
        out["sustained_rates"][variant] = {}
        for bound in per_bound:
            systems = sorted({sys for h in per_seed.values() for sys in h["sustained_rates"][variant][bound]})
            out["sustained_rates"][variant][bound] = {}
            for system in systems:
                cells = {s: h["sustained_rates"][variant][bound].get(system) for s, h in per_seed.items()}
                cell = spread({s: (c or {}).get("value") for s, c in cells.items()})
                cell["status"] = {s: (c or {}).get("status") for s, c in cells.items()}
                out["sustained_rates"][variant][bound][system] = cell
    return out
