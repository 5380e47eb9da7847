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


def _seeds(results: Mapping[str, Any]) -> list[Any]:
    return list(dict.fromkeys(p.get("seed", 0) for pts in results["points"].values() for p in pts))


def _point_label(p: Mapping[str, Any], several_seeds: bool) -> str:
    return f"{p['rate']:g}" + (f" s{p.get('seed', 0)}" if several_seeds else "")


def _occupancy_table(results: Mapping[str, Any], several_seeds: bool) -> list[str]:
    rows = []
    for system in results["systems"]:
        for p in results["points"].get(system, []):
            o = p.get("occupancy") or {}
            if not o.get("samples"):
                continue
            cpu = o.get("cpu_used_frac", {}).get("mean")
            rows.append("| " + " | ".join([
                system, _point_label(p, several_seeds), _fmt(o["num_running"]["mean"], 1), _fmt(o["num_running"]["max"], 0),
                _fmt(o["num_waiting"]["mean"], 1), _pct(o["gpu_used_frac"]["mean"]), _pct(o["gpu_used_frac"]["max"]),
                _pct(o["gpu_cached_frac"]["mean"]), _pct(o["gpu_free_frac"]["mean"]), _pct(cpu),
                _pct(o["pool_bound_share"]), str(o["binds"])]) + " |")
    if not rows:
        return []
    return ["Running batch and GPU pool per point (sampled while it ran, after the warm-up): requests running "
            "and waiting, the pool's share held by running requests (mean, max), by idle conversations' cache, "
            "free; `binds` says what limited the batch (gpu_pool: running KV filled the pool while requests "
            "waited; max_num_seqs; queue: requests waited with pool room, so compute or the token budget; "
            "none: under capacity).", "",
            "| system | rate (conv/s) | running mean | running max | waiting mean | GPU running | GPU running max "
            "| GPU idle cache | GPU free | CPU used | pool-bound samples | binds |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|", *rows, ""]


def _step_table(results: Mapping[str, Any], several_seeds: bool) -> list[str]:
    """The engine's step accounting per point (EngineStats deltas over the whole point, warm-up included)."""
    paths = ("graph", "rows", "eager", "swapin")
    rows = []
    for system in results["systems"]:
        for p in results["points"].get(system, []):
            d = p.get("stats_delta") or {}
            steps = sum(d.get(f"steps_{k}", 0) for k in paths)
            if not steps:
                continue
            wall = sum(d.get(f"step_seconds_{k}", 0.0) for k in paths)
            gpu = sum(d.get(f"step_gpu_seconds_{k}", 0.0) for k in paths)
            computed = d.get("prompt_tokens", 0) - d.get("gpu_hit_tokens", 0) - d.get("cpu_hit_tokens", 0)

            def per_step(k: str) -> str:
                n = d.get(f"steps_{k}", 0)
                if not n:
                    return "-"
                on_gpu = f" / {_fmt(1e3 * d[f'step_gpu_seconds_{k}'] / n, 1)}" if gpu else ""
                return f"{n}: {_fmt(1e3 * d[f'step_seconds_{k}'] / n, 1)}{on_gpu}"

            refused = sorted(((n, k.removeprefix("not_overlapped_")) for k, n in d.items()
                              if k.startswith("not_overlapped_")), reverse=True)
            why = ", ".join(f"{k.replace('_', ' ')} {_pct(n / steps)}" for n, k in refused[:3] if n) or "-"
            rows.append("| " + " | ".join([
                system, _point_label(p, several_seeds), str(steps), _pct(d.get("steps_overlapped", 0) / steps), why,
                _fmt(computed / steps, 0), *(per_step(k) for k in ("graph", "rows", "eager")),
                _fmt(1e3 * (wall - gpu) / steps, 1) if gpu else "-"]) + " |")
    if not rows:
        return []
    return ["Engine steps per point (the whole point, warm-up included): how many, the share launched while the "
            "step before still ran (async scheduling) and the main reasons the others waited for it (the step "
            "before read back at once: it computed prompt tokens or copies; requests waiting; a sequence new to the "
            "batch; penalties; every sequence finishing; growth needing a copy), prompt tokens computed per step, "
            "and per path (decode "
            "CUDA graph, mixed step as graph rows, eager) the count and ms per step, wall / GPU span; host ms: "
            "wall minus GPU span per step, the time the GPU waited on scheduling and postprocessing.", "",
            "| system | rate (conv/s) | steps | overlapped | not overlapped: why | computed prompt tok/step | graph "
            "| rows | eager | host ms/step |",
            "|---|---|---|---|---|---|---|---|---|---|", *rows, ""]


def _turn_tables(results: Mapping[str, Any], several_seeds: bool) -> list[str]:
    out: list[str] = []
    for system in results["systems"]:
        pts = [p for p in results["points"].get(system, []) if p["summary"].get("by_turn", {}).get("buckets")]
        if not pts:
            continue
        labels = sorted({b for p in pts for b in p["summary"]["by_turn"]["buckets"]},
                        key=lambda b: int(b.rstrip("+").split("-")[0]))
        out += [f"{system}: cache hit rate and TTFT mean / P90 (s) by turn number, per point (rate conv/s).", "",
                "| turn | " + " | ".join(_point_label(p, several_seeds) for p in pts) + " |",
                "|---|" + "---|" * len(pts)]
        for label in labels:
            cells = []
            for p in pts:
                b = p["summary"]["by_turn"]["buckets"].get(label)
                cells.append("-" if b is None else
                             f"{_pct(b['hit_rate'])} · {_fmt(b['ttft']['mean'])} / {_fmt(b['ttft']['p90'])} (n={b['count']})")
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def _seed_table(results: Mapping[str, Any]) -> list[str]:
    across = results.get("across_seeds")
    if not across:
        return []
    seeds = [str(sd) for sd in across["seeds"]]
    prefix = {"lower_bound": ">=", "upper_bound": "<="}
    rows = []
    for key, per_variant in across["ratios"].items():
        for variant, per_bound in per_variant.items():
            for bound, cell in per_bound.items():
                if not cell["n"]:
                    continue
                vals = [prefix.get(cell["status"].get(sd) or "", "") + _fmt(cell["values"].get(sd), 2)
                        if cell["values"].get(sd) is not None else "-" for sd in seeds]
                rows.append(f"| {key} | {variant} | {bound} | " + " | ".join(vals) + f" | {_fmt(cell['mean'], 2)} | "
                            f"{_fmt(cell['min'], 2)} | {_fmt(cell['max'], 2)} |")
    if not rows:
        return ["Across seeds: no ratio has a value in any seed (sweep where the systems cross the bounds).", ""]
    return [f"Ratios per workload seed and their spread (the top tables are seed {results.get('headline_seed')}'s); "
            "`>=` / `<=`: a bound, one side never crossed in that seed's sweep.", "",
            "| ratio | variant | bound (s/tok) | " + " | ".join(f"seed {sd}" for sd in seeds) + " | mean | min | max |",
            "|---|---|---|" + "---|" * (len(seeds) + 3), *rows, ""]


def markdown_summary(results: Mapping[str, Any]) -> str:
    """Every (system, rate[, seed]) point; the sustained rate per latency bound with the ratios; the ratios
    per seed with their spread; the running batch and pool per point; the engine's steps per point; the
    per-turn view."""
    lines = [f"# Multi-turn benchmark ({results.get('device', '?')})", ""]
    several_seeds = len(_seeds(results)) > 1
    wl = results.get("workload", {})
    if wl:
        lines.append("Workload: " + ", ".join(f"{k}={v}" for k, v in wl.items() if not isinstance(v, (dict, list))))
        lines.append("")
    ds = results.get("dataset") or {}
    if ds.get("path"):
        cut = "" if ds.get("file_complete", True) else ", the file cut off mid-record"
        lines += [f"Data set: {ds['records_read']} records read from `{Path(ds['path']).name}`{cut}; "
                  f"{ds['conversations']} usable conversations, {ds.get('conversations_used', '?')} used.", ""]
    if results.get("skipped_points"):
        lines += ["Skipped (wall budget): " + ", ".join(results["skipped_points"]), ""]
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
                system, _point_label(p, several_seeds), _fmt(s["throughput_rps"]), _fmt(s["output_tokens_per_s"], 1),
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
    lines += _seed_table(results)
    lines += _occupancy_table(results, several_seeds)
    lines += _step_table(results, several_seeds)
    lines += _turn_tables(results, several_seeds)
    return "\n".join(lines)


def plot_latency(results: Mapping[str, Any], path: Path) -> None:
    """Normalized latency against request rate, one line per system; mean and P90 panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    seeds = _seeds(results)
    for ax, stat, title in ((axes[0], "mean", "mean"), (axes[1], "p90", "P90")):
        for system in results["systems"]:
            for sd in seeds:   # one line per seed: a seed's points share a workload
                pts = [p for p in results["points"].get(system, []) if p.get("seed", 0) == sd]
                xs = [p["summary"]["throughput_rps"] for p in pts]
                ys = [p["summary"]["normalized_latency"][stat] for p in pts]
                xy = [(x, y) for x, y in zip(xs, ys) if y is not None]
                if xy:
                    ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o",
                            label=system if len(seeds) == 1 else f"{system} seed {sd}")
        top = ax.get_ylim()[1]
        for bound in results.get("bounds", []):
            if bound <= top * 1.5:   # a bound far above every point would only flatten the curves
                ax.axhline(bound, color="grey", linewidth=0.6, linestyle=":")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("throughput (requests/s)")
        ax.set_ylabel(f"{title} normalized latency (s/token)")
        ax.set_title(f"{title} normalized latency")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:      # a run whose every point was skipped has no line
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
