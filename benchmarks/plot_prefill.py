"""Prefill time against SDPA, per shape, from prefill_probe.py runs (one bar group per run).

    python benchmarks/plot_prefill.py OUT.png LABEL=probe.json [LABEL=probe.json ...]

Each run contributes its default launch ("ours_default") as a bar; the last run also draws the
dense plain-Triton kernel's best configuration as a marker, and the 1.25x target as a line.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    out, runs = Path(sys.argv[1]), [a.split("=", 1) for a in sys.argv[2:]]
    tables = [(label, json.loads(Path(path).read_text())) for label, path in runs]
    shapes = [r["shape"] for r in tables[-1][1] if r.get("kind") == "sdpa"]
    fig, ax = plt.subplots(figsize=(9, 5.2))
    width = 0.8 / len(tables)
    for i, (label, rows) in enumerate(tables):
        # (the first probe version named its default-launch rows "ours", without launch fields)
        ratio = {r["shape"]: r["ratio_vs_sdpa"] for r in rows
                 if r.get("kind") == "ours_default" or (r.get("kind") == "ours" and r.get("block_m") is None)}
        ax.bar([s + i * width for s in range(len(shapes))], [ratio.get(s, 0) for s in shapes], width, label=label)
    dense = {}
    for r in tables[-1][1]:
        if r.get("kind") == "dense" and "ratio_vs_sdpa" in r:
            dense[r["shape"]] = min(dense.get(r["shape"], 9.0), r["ratio_vs_sdpa"])
    centre = 0.4 - width / 2
    ax.scatter([s + centre for s in range(len(shapes))], [dense.get(s, 0) for s in shapes], marker="_", s=400,
               color="black", label="dense Triton kernel, best launch", zorder=3)
    ax.axhline(1.25, color="red", linestyle="--", linewidth=1, label="target 1.25x")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks([s + centre for s in range(len(shapes))], shapes)
    ax.set_ylabel("time / SDPA (cuDNN) time")
    ax.set_xlabel("batch x new tokens (causal, Llama-3-8B heads, bf16)")
    ax.set_ylim(0.9, max(1.7, ax.get_ylim()[1]))
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    ax.set_title("Prefill attention on one H100: our kernel against SDPA")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
