"""Merge multi-turn runs into one report: several runs of one workload split across time-limited calls
(their points merge, per system, by rate), or a run cut short (the bench writes partial.json after every
finished point). Writes results.json, summary.md and latency.png, as a whole run does.

    python benchmarks/report_partial.py RUN_A RUN_B --out MERGED
    python benchmarks/report_partial.py RUN_DIR/partial.json --device "NVIDIA H100 80GB HBM3" \\
        --command "$(cat RUN_DIR/command.txt)" --out RUN_DIR

An input is a run folder (its partial.json) or a partial.json path. It may keep only some of its points:
`run2:stateless@6,gpu` takes stateless at 6 conv/s and every gpu point of that run (a point measured in two
runs must come from one of them). --device defaults to the device the inputs' results.json name (they must
agree), --command to their command.txt lines.
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
    """'run/partial.json:tiered,stateless@6' -> (path, {("tiered", None), ("stateless", 6.0)}); no ':' keeps all.
    A folder stands for the partial.json in it."""
    path, sep, sel = spec.partition(":")
    partial = Path(path) / "partial.json" if Path(path).is_dir() else Path(path)
    if not sep:
        return partial, None
    keep: set[tuple[str, float | None]] = set()
    for item in filter(None, sel.split(",")):
        system, at, rate = item.partition("@")
        keep.add((system, float(rate) if at else None))
    return partial, keep


def inputs_device(paths: list[Path]) -> str | None:
    """The one device the inputs' results.json files name (None if none has one); two devices is an error."""
    names = set()
    for path in paths:
        results = path.parent / "results.json"
        if results.exists():
            names.add(json.loads(results.read_text()).get("device"))
    names.discard(None)
    if len(names) > 1:
        raise SystemExit(f"the inputs ran on different devices ({', '.join(sorted(names))}): pass --device")
    return names.pop() if names else None


def inputs_command(paths: list[Path]) -> str:
    lines: dict[str, None] = {}        # in order, each once (two selections of one run share its command)
    for path in paths:
        command = path.parent / "command.txt"
        if command.exists():
            lines.update((line, None) for line in command.read_text().splitlines() if line and line[0] != "#")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("partial", nargs="+", help="RUN_DIR or PATH/partial.json, optionally :SYSTEM[@RATE],...")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default=None, help="default: the device named in the inputs' results.json")
    ap.add_argument("--command", default=None, help="the commands that produced the runs (default: command.txt)")
    ap.add_argument("--bounds", default="0.02,0.03,0.05,0.08,0.1,0.15")
    ap.add_argument("--x-axis", default="throughput_rps", choices=["throughput_rps", "rate"])
    ap.add_argument("--note", default="", help="what cut the run short, what is missing")
    args = ap.parse_args()
    specs = [parse_input(spec) for spec in args.partial]
    device = args.device or inputs_device([path for path, _ in specs])
    if device is None:
        raise SystemExit("no input has a results.json naming its device: pass --device")
    command = args.command if args.command is not None else inputs_command([path for path, _ in specs])
    points: dict[str, list[dict]] = {}
    errors: dict[str, str] = {}
    for path, keep in specs:
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
    results = {"device": device, "systems": list(points), "bounds": bounds, "points": points,
               "errors": errors, "command": command,
               "workload": {"see": "command", "rendered_from": "partial.json", "note": args.note}}
    results.update(seeded_headline(points, bounds, args.x_axis))
    paths = write_report(results, args.out)
    print("wrote", ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
