"""benchmarks/diagnostics_cost.py still runs and writes its rows (timings are never asserted here)."""

from __future__ import annotations

from pathlib import Path

from test_benchmarks import run


def test_diagnostics_cost_runs(tmp_path: Path) -> None:
    stdout, rows = run("diagnostics_cost.py", "--device", "cpu", "--models", "resnet-8", "--data", "synthetic",
                       "--smoke", "--threads", "1", tmp_path=tmp_path)
    assert "load average" in stdout and "total cpu cpu" in stdout
    assert [r["diagnostic"] for r in rows] == ["lesion", "landscape", "curvature", "shattering", "shattering_sweep"]
    assert all(float(r["seconds"]) > 0 for r in rows)
