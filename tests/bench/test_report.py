"""The report writer: files, JSON keys, markdown rows."""
from __future__ import annotations

import json

import pytest

from pensieve.bench.metrics import headline, summarize
from pensieve.bench.records import TurnResult
from pensieve.bench.report import REQUIRED_KEYS, write_report


def _summary(scale: float) -> dict:
    recs = [TurnResult(request_id=f"r{i}", conversation_id="c", turn_index=0, send_time=float(i),
                       first_token_time=i + 0.1 * scale, finish_time=i + scale, prompt_tokens=20, output_tokens=10,
                       gpu_hit_tokens=5, cpu_hit_tokens=2) for i in range(5)]
    return summarize(recs)


def test_write_report(tmp_path):
    systems = ["tiered", "stateless"]
    points = {s: [{"rate": r, "summary": _summary(r * (1 if s == "tiered" else 2))} for r in (0.5, 1.0)]
              for s in systems}
    results = {"device": "cpu", "systems": systems, "bounds": [0.1, 0.2], "points": points,
               "workload": {"think_time_mean_s": 0.0}, "command": "pensieve bench"}
    results.update(headline(points, [0.1, 0.2]))
    recs = {"tiered@0.5": [{"request_id": "r0", "e2e": 1.0}]}
    paths = write_report(results, tmp_path / "out", recs)
    for p in paths.values():
        assert p.exists() and p.stat().st_size > 0
    data = json.loads(paths["json"].read_text())
    for key in REQUIRED_KEYS:
        assert key in data
    assert set(data["tiered_vs_stateless"]["mean"]) == {"0.1", "0.2"}
    md = paths["markdown"].read_text()
    rows = [line for line in md.splitlines() if line.startswith("| tiered |") or line.startswith("| stateless |")]
    assert len(rows) == 4                                        # one per (system, rate)
    assert any(line.startswith("| mean | 0.1 |") for line in md.splitlines())
    assert "GPU" not in md and "| tier-1 hit | tier-2 hit |" in md   # a CPU run has no GPU tier to name
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(paths["records"].read_text().splitlines()[0])["point"] == "tiered@0.5"
    with pytest.raises(ValueError, match="lack"):
        write_report({"device": "cpu"}, tmp_path / "bad")


def test_report_partial_input_selection():
    """`PATH:SYSTEM[@RATE],...` keeps those points of one partial run (a repeat must come from one run)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "report_partial", Path(__file__).resolve().parents[2] / "benchmarks" / "report_partial.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.parse_input("run/partial.json") == (Path("run/partial.json"), None)
    assert mod.parse_input("run/partial.json:tiered,stateless@6") == (
        Path("run/partial.json"), {("tiered", None), ("stateless", 6.0)})


def test_step_table_reports_overlap_paths_and_host_time():
    from pensieve.bench.report import markdown_summary

    delta = {"steps_graph": 100, "steps_rows": 50, "steps_eager": 10, "steps_swapin": 0, "steps_overlapped": 40,
             "step_seconds_graph": 1.3, "step_seconds_rows": 1.0, "step_seconds_eager": 0.5, "step_seconds_swapin": 0.0,
             "step_gpu_seconds_graph": 1.1, "step_gpu_seconds_rows": 0.8, "step_gpu_seconds_eager": 0.42,
             "step_gpu_seconds_swapin": 0.0, "prompt_tokens": 5000, "gpu_hit_tokens": 2000, "cpu_hit_tokens": 1000,
             "not_overlapped_after_read_back": 80, "not_overlapped_waiting": 32, "not_overlapped_growth": 8,
             "not_overlapped_penalties": 0}
    points = {"tiered": [{"rate": 1.0, "summary": _summary(1.0), "stats_delta": delta}],
              "stateless": [{"rate": 1.0, "summary": _summary(2.0)}]}          # no step counts: no row
    results = {"device": "NVIDIA H100", "systems": ["tiered", "stateless"], "bounds": [0.1], "points": points}
    results.update(headline(points, [0.1]))
    md = markdown_summary(results)
    rows = [line for line in md.splitlines() if line.startswith("| tiered | 1 | 160 |")]
    # 160 steps, 25% overlapped, the reasons the rest waited (largest first, none at zero), 2000 computed prompt
    # tokens / 160, 13.0 / 11.0 ms per graph step, host: (2.8 - 2.32) s over 160 steps
    assert rows == ["| tiered | 1 | 160 | 25.0% | after read back 50.0%, waiting 20.0%, growth 5.0% | 12 "
                    "| 100: 13.0 / 11.0 | 50: 20.0 / 16.0 | 10: 50.0 / 42.0 | 3.0 |"]
    assert not any(line.startswith("| stateless | 1 | ") and line.count("|") == 11 for line in md.splitlines())
