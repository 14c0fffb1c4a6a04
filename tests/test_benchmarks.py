"""The benchmark scripts still run and write the rows docs/benchmarks.md is built from.

Smoke runs only, on tiny settings: the timings themselves are never asserted here (they
belong in the scripts' output and docs/benchmarks.md, measured on a named machine).
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def run(script: str, *args: str, tmp_path: Path) -> tuple[str, list[dict[str, str]]]:
    out = tmp_path / "rows.csv"
    p = subprocess.run([sys.executable, str(BENCH / script), *args, "--csv", str(out)], cwd=BENCH,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    with out.open() as f:
        return p.stdout, list(csv.DictReader(f))


def test_probe_overhead_runs(tmp_path: Path) -> None:
    stdout, rows = run("probe_overhead.py", "--device", "cpu", "--models", "resnet-8", "--rounds", "1",
                       "--window", "1", "--warmup", "1", "--flow-reps", "1", tmp_path=tmp_path)
    assert "command: python" in stdout and "load average" in stdout
    assert {r["model"] for r in rows} == {"resnet-8"} and len(rows) >= 3


def test_throughput_runs(tmp_path: Path) -> None:
    stdout, rows = run("throughput.py", "--device", "cpu", "--quick", "--models", "resnet-8", "--ref-workers", "0",
                       "--precisions", "fp32", tmp_path=tmp_path)  # bf16 is emulated (slow) on most CI CPUs
    assert "projection" in stdout and "bf16 on cpu: native" in stdout and "AVX512-BF16" in stdout
    labs = {r["loop"] for r in rows if r["workers"] == ""}
    assert labs == {"lab fp32 contiguous", "lab fp32 channels_last"}  # one row per precision x layout


def test_fused_speed_runs(tmp_path: Path) -> None:
    """fused_speed.py reads both study files and times every group both ways, rounds alternated."""
    stdout, rows = run("fused_speed.py", "--device", "cpu", "--quick", "--precision", "fp32", tmp_path=tmp_path)
    assert "command: python" in stdout and "load average" in stdout and "device cpu: CPU" in stdout
    assert {r["workload"] for r in rows} == {"default", "paper"}
    assert all(float(r["fused_s_per_step"]) > 0 and float(r["unfused_s_per_step"]) > 0 for r in rows)
    assert "default: training" in stdout and "paper: training" in stdout


@pytest.fixture(scope="module")
def report_time(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, list[dict[str, str]]]:
    """report_time.py on a small full-layout store, kept for ui_load.py (building one costs seconds)."""
    tmp = tmp_path_factory.mktemp("report_time")
    stdout, rows = run("report_time.py", "--iterations", "2000", "--repeats", "1", "--store", str(tmp / "s"),
                       tmp_path=tmp)
    return tmp / "s", stdout, rows


@pytest.mark.filterwarnings("ignore")
def test_report_time_runs_the_real_report_on_a_full_layout_store(report_time: tuple) -> None:
    store, stdout, rows = report_time
    what = [r["what"] for r in rows]
    assert what[0] == "end_to_end" and float(rows[0]["seconds"]) > 0
    assert {f"figure {n}" for n in ("degradation", "error_vs_depth", "grad_flow", "grad_norms_by_layer",
                                     "grad_norms_over_training", "layer_responses")} <= set(what)
    assert "9 runs" in stdout and "target" in stdout
    assert (store / "complete").read_text().strip() == "2000"  # kept, to be reused
    # a folder holding something else is refused, not overwritten
    p = subprocess.run([sys.executable, str(BENCH / "report_time.py"), "--iterations", "4000", "--store",
                        str(store)], cwd=BENCH, capture_output=True, text=True)
    assert p.returncode == 2 and "pass an empty or new folder" in p.stderr


def test_ui_load_counts_the_chart_cards_in_a_real_browser(report_time: tuple, tmp_path: Path) -> None:
    """ui_load.py on report_time's store: every section header read, the cards they announce."""
    if not Path("/usr/bin/chromium").is_file():
        message = "ui_load.py needs Debian's chromium (sudo apt-get install chromium)"
        if os.environ.get("RESNET_LAB_REQUIRE_BROWSER"):  # CI installs it: there a missing browser fails
            pytest.fail(message)
        pytest.skip(message)
    stdout, rows = run("ui_load.py", "--store", str(report_time[0]), "--iterations", "2000", "--timeout", "120",
                       tmp_path=tmp_path)
    assert "store: reusing" in stdout and len(rows) == 1
    row = rows[0]
    names = {name: int(n) for name, n in re.findall(r"([^;]+?) \((\d+)\)(?:; |$)", row["section_names"])}
    assert {"final", "test", "train", "val", "z_probes/grad_norm"} <= set(names)
    assert int(row["cards"]) == sum(names.values()) and names["test"] == 2  # test/error, test/loss
    assert float(row["first_chart_s"]) > 0 and float(row["scroll_to_last_s"]) > 0


def _throughput_module() -> object:
    """benchmarks/throughput.py as a module (it imports bench_common from its own folder)."""
    sys.path.insert(0, str(BENCH))
    try:
        import throughput
    finally:
        sys.path.remove(str(BENCH))
    return throughput


def test_the_projection_counts_every_run_of_every_shipped_study() -> None:
    """cifar10_paper is 10 nets x 5 seeds = 50 runs of 64k steps, not 10 nets (issue 25): at 1280 img/s
    (0.1 s a step) for every depth, 50 x 64,000 x 0.1 s. Every study in experiments/ is projected."""
    tp = _throughput_module()
    studies = {s.name: s for s in tp.shipped_studies()}
    assert set(studies) == {p.stem for p in (BENCH.parent / "experiments").glob("*.toml")}
    paper = tp.project({f"resnet-{d}": 1280.0 for d in (20, 32, 44, 56, 110)}, studies["cifar10_paper"])
    assert (paper.runs, paper.projected, paper.scaled, paper.missing) == (50, 50, [], [])
    assert paper.hours == pytest.approx(50 * 64_000 * 0.1 / 3600)
    # Fashion-MNIST: 28x28 images, 9 nets x 3 seeds at 32k steps; resnet-20 and -56 measured, the rest
    # from their depth line; the d2l study's resnet-18 family is not measured here: left out, and said so
    fm = tp.project({"resnet-20": 1280.0, "resnet-56": 640.0}, studies["fashion_mnist"])
    assert (fm.runs, fm.projected, fm.missing) == (27, 27, []) and "resnet-110" in fm.scaled
    d2l = tp.project({"resnet-20": 1280.0}, studies["d2l_resnet18"])
    assert (d2l.projected, d2l.missing, d2l.hours) == (0, ["plain-18", "resnet-18"], 0.0)
    line = tp.projection_line("lab", "cpu", paper)
    assert "cifar10_paper study (50 of 50 runs" in line
