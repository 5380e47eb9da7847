"""benchmarks/host_step_cost.py as a CPU smoke run: both systems, pools small enough that the tiered cache
evicts, copies and reuses, every phase timed and the device's work kept apart from the host's."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_host_step_cost_times_each_phase(tmp_path, tiny_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "host_step_cost.py"), "--clients", "12", "--think-steps", "4",
           "--warmup", "20", "--steps", "60", "--gpu-blocks", "48", "--cpu-blocks", "48", "--max-input-tokens", "40",
           "--max-output-tokens", "6", "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = {r["system"]: r for r in json.loads((tmp_path / "results.json").read_text())["results"]}
    tiered, stateless = results["tiered"], results["stateless"]
    for r in (tiered, stateless):
        assert r["steps"] == 60 and r["running_mean"] > 0
        phases = r["phases_ms_per_step"]
        assert phases["schedule"] > 0 and phases["postprocess"] > 0 and phases["forward"] > 0
        assert abs(r["wall_ms_per_step"] - r["host_ms_per_step"] - r["device_ms_per_step"]) < 1e-6
        assert 0 < r["host_ms_per_step"] < r["wall_ms_per_step"]
    assert tiered["hit_share"] > 0 and stateless["hit_share"] == 0
    counters = tiered["engine_stats"]
    assert counters["swapped_out_blocks"] > 0 and counters["swapped_in_blocks"] > 0
    assert "| **host** |" in (tmp_path / "summary.md").read_text()
