"""Render results.json, summary.md and latency.png from the partial.json that a multi-turn run left
when its time limit cut it short (the bench writes partial.json after every finished point), or
from several runs of one workload at one commit split across device calls (their points merge,
per system, by rate).

    python benchmarks/report_partial.py RUN_DIR/partial.json --device "NVIDIA H100 80GB HBM3" \\
        --command "$(cat RUN_DIR/command.txt)" --out RUN_DIR

An input may keep only some of its points: `run2/partial.json:stateless@6,gpu` takes stateless at 6 conv/s
and every gpu point of that run (a repeat measured in two runs must come from one of them).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pensieve.bench.cli import seeded_headline  # noqa: E402
from pensieve.bench.report import write_report  # noqa: E402


def parse_input(spec: str) -> tuple[Path, set[tuple[str, float | None]] | None]:
    """'run/partial.json:tiered,stateless@6' -> (path, {("tiered", None), ("stateless", 6.0)}); no ':' keeps all."""
    path, sep, sel = spec.partition(":")
    if not sep:
        return Path(path), None
    keep: set[tuple[str, float | None]] = set()
    for item in filter(None, sel.split(",")):
        system, at, rate = item.partition("@")
        keep.add((system, float(rate) if at else None))
    return Path(path), keep


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("partial", nargs="+", help="PATH or PATH:SYSTEM[@RATE],... (the points to keep)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", required=True)
    ap.add_argument("--command", required=True, help="the command that produced the run")
    ap.add_argument("--bounds", default="0.02,0.03,0.05,0.08,0.1")
    ap.add_argument("--x-axis", default="throughput_rps", choices=["throughput_rps", "rate"])
    ap.add_argument("--note", default="", help="what cut the run short, what is missing")
    args = ap.parse_args()
    points: dict[str, list[dict]] = {}
    errors: dict[str, str] = {}
    for spec in args.partial:
        path, keep = parse_input(spec)
        partial = json.loads(path.read_text())
        errors.update(partial.get("errors", {}))
        for system, pts in partial["points"].items():
            merged = {(p.get("seed", 0), p["rate"]): p for p in points.get(system, [])}
            for p in pts:
                if keep is not None and (system, None) not in keep and (system, float(p["rate"])) not in keep:
                    continue
                key = (p.get("seed", 0), p["rate"])
                if key in merged:
                    raise SystemExit(f"{system} @ {p['rate']} (seed {key[0]}) is in more than one run")
                merged[key] = p
            if merged:
                points[system] = [merged[k] for k in sorted(merged)]
    bounds = [float(b) for b in args.bounds.split(",")]
    results = {"device": args.device, "systems": list(points), "bounds": bounds, "points": points,
               "errors": errors, "command": args.command,
               "workload": {"see": "command", "rendered_from": "partial.json", "note": args.note}}
    results.update(seeded_headline(points, bounds, args.x_axis))
    paths = write_report(results, args.out)
    print("wrote", ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
