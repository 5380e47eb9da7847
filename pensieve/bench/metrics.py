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
    sweep higher rates) or base_below_range (base over the bound everywhere and its lowest rate unknown).
    A base over the bound already at its lowest swept rate x sustains less than x, so tiered / x is a
    lower bound on the ratio."""
    t_st, b_st = tiered["status"], base["status"]
    if b_st == "below_range":
        if t_st != "below_range" and base.get("below"):
            return tiered["value"] / base["below"], "lower_bound"
        return None, "base_below_range"
    if t_st == "below_range":
        return 0.0, "exact"
    if t_st == "at_least" and b_st == "at_least":
        return None, "unknown"
    r = ratio(tiered["value"], base["value"])
    if t_st == "at_least":
        return r, "lower_bound"
    if b_st == "at_least":
        return r, "upper_bound"
    return r, "exact"
