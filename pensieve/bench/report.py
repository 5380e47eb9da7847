"""Benchmark output: results JSON, a markdown summary, and normalized-latency-vs-rate plots."""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REQUIRED_KEYS = ("device", "systems", "bounds", "points", "sustained_rates",
                 "tiered_vs_stateless", "tiered_vs_gpu", "tiered_vs_transformers", "workload", "command")


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isinf(v) or math.isnan(v):
            return str(v)
        return f"{v:.{digits}f}"
    return str(v)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _swaps(delta: Mapping[str, Any]) -> str:
    """Blocks swapped out / in during a point, from engine stats deltas or /metrics samples."""
    out = sum(v for k, v in delta.items() if "swapped_out" in k or "swap_out" in k)
    inn = sum(v for k, v in delta.items() if "swapped_in" in k or "swap_in" in k)
    return f"{int(out)}/{int(inn)}" if delta else "-"


def _ratio_cell(results: Mapping[str, Any], key: str, variant: str, bound: str) -> str:
    value = results[key][variant].get(bound)
    status = results.get("ratio_status", {}).get(key, {}).get(variant, {}).get(bound, "exact")
    prefix = {"lower_bound": ">=", "upper_bound": "<="}.get(status, "")
    return prefix + _fmt(value, 2) if value is not None else "-"


def markdown_summary(results: Mapping[str, Any]) -> str:
    """Two tables: every (system, rate) point, then the sustained rate per latency bound with the ratios."""
    lines = [f"# Multi-turn benchmark ({results.get('device', '?')})", ""]
    wl = results.get("workload", {})
    if wl:
        lines.append("Workload: " + ", ".join(f"{k}={v}" for k, v in wl.items() if not isinstance(v, (dict, list))))
        lines.append("")
    # the two cache tiers: GPU and CPU memory on a GPU; on a CPU both live in host memory
    first, second = ("tier-1", "tier-2") if results.get("device") == "cpu" else ("GPU", "CPU")
    lines += ["| system | rate (conv/s) | req/s | out tok/s | norm lat mean (s/tok) | norm lat P90 | TTFT mean (s) "
              f"| TTFT P90 | TPOT mean | {first} hit | {second} hit | recomputed tok | swap out/in blocks | errors |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for system in results["systems"]:
        for p in results["points"].get(system, []):
            s = p["summary"]
            c = s["cache"]
            lines.append("| " + " | ".join([
                system, _fmt(p["rate"], 2), _fmt(s["throughput_rps"]), _fmt(s["output_tokens_per_s"], 1),
                _fmt(s["normalized_latency"]["mean"], 4), _fmt(s["normalized_latency"]["p90"], 4),
                _fmt(s["ttft"]["mean"]), _fmt(s["ttft"]["p90"]), _fmt(s["tpot"]["mean"], 4),
                _pct(c["gpu_hit_rate"]), _pct(c["cpu_hit_rate"]), str(c["recomputed_tokens"]),
                _swaps(p.get("stats_delta") or {}), str(s["num_errors"])]) + " |")
    lines.append("")
    axis = results.get("x_axis", "throughput_rps")
    lines.append(f"Highest sustained rate ({axis}) under each normalized-latency bound; "
                 "`>=` marks a system that never crossed the bound in the sweep, `<` one over it at the lowest rate.")
    lines.append("")
    systems = list(results["systems"])
    ratio_keys = [k for k in ("tiered_vs_stateless", "tiered_vs_gpu", "tiered_vs_transformers") if k in results]
    lines.append("| variant | bound (s/tok) | " + " | ".join(systems) + " | " + " | ".join(ratio_keys) + " |")
    lines.append("|---|---|" + "---|" * (len(systems) + len(ratio_keys)))
    for variant, per_bound in results["sustained_rates"].items():
        for bound, per_sys in per_bound.items():
            cells = []
            for system in systems:
                sr = per_sys.get(system, {"value": None, "status": "below_range"})
                prefix = {"at_least": ">=", "below_range": "<"}.get(sr["status"], "")
                if sr["value"] is None:  # over the bound at its lowest rate: under that rate, if known
                    cells.append(prefix + (_fmt(sr["below"]) if sr.get("below") is not None else "min"))
                else:
                    cells.append(prefix + _fmt(sr["value"]))
            ratios = [_ratio_cell(results, k, variant, bound) for k in ratio_keys]
            lines.append(f"| {variant} | {bound} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    lines.append("")
    return "\n".join(lines)


def plot_latency(results: Mapping[str, Any], path: Path) -> None:
    """Normalized latency against request rate, one line per system; mean and P90 panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, stat, title in ((axes[0], "mean", "mean"), (axes[1], "p90", "P90")):
        for system in results["systems"]:
            pts = results["points"].get(system, [])
            xs = [p["summary"]["throughput_rps"] for p in pts]
            ys = [p["summary"]["normalized_latency"][stat] for p in pts]
            xy = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if xy:
                ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=system)
        top = ax.get_ylim()[1]
        for bound in results.get("bounds", []):
            if bound <= top * 1.5:   # a bound far above every point would only flatten the curves
                ax.axhline(bound, color="grey", linewidth=0.6, linestyle=":")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("throughput (requests/s)")
        ax.set_ylabel(f"{title} normalized latency (s/token)")
        ax.set_title(f"{title} normalized latency")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Pensieve multi-turn benchmark ({results.get('device', '?')})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: Mapping[str, Any], out_dir: str | Path,
                 records: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> dict[str, Path]:
    """Write results.json, summary.md, latency.png (and records.jsonl with every turn when given)."""
    missing = [k for k in REQUIRED_KEYS if k not in results]
    if missing:
        raise ValueError(f"results lack {missing}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "summary.md", "plot": out / "latency.png"}
    paths["json"].write_text(json.dumps(results, indent=2, default=str) + "\n")
    paths["markdown"].write_text(markdown_summary(results))
    plot_latency(results, paths["plot"])
    if records is not None:
        paths["records"] = out / "records.jsonl"
        with open(paths["records"], "w") as f:
            for key, recs in records.items():
                for r in recs:
                    f.write(json.dumps({"point": key, **r}, default=str) + "\n")
    return paths
