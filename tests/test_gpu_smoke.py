"""benchmarks/gpu_smoke.sh cannot rot unseen: its --cpu mode runs here.

Only what no other test covers: the kill -9 / resume steps through the script, and its
35-step check in this process (a process start costs more than the check); the study, the
benchmark scripts and real-data training have their own tests, and the whole --cpu walk
takes minutes on 2 shared cores.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
SCRIPT = BENCH / "gpu_smoke.sh"
DEVICE_PREP = ROOT.parent / "shared" / "tools" / "device-prep"  # ../shared/tools/device-prep, where there is one
MiB = 2**20


def _smoke(*args: str, log: Path) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(SCRIPT), *args, "--log", str(log)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_cpu_mode_kills_resumes_and_steps_without_the_gpu(tmp_path: Path, tracking_uri: str) -> None:
    log = tmp_path / "smoke.log"
    p = _smoke("--cpu", "--only", "kill,refuse,resume", "--tracking-uri", tracking_uri, log=log)
    text = log.read_text()
    assert p.returncode == 0, text[-3000:]
    steps = text.split("--- summary")[0]
    lines = [line for line in steps.splitlines() if line.startswith(("ok ", "skip ", "FAIL "))]
    assert [line.split()[0] for line in lines] == ["ok", "ok", "skip", "ok"], lines  # refuse needs CUDA
    assert "killed with SIGKILL (exit 137)" in text  # the run was killed, not left to finish
    assert "one FINISHED run" in text and "train/loss steps 5..20 each once" in text  # resumed in the same run
    assert text.rstrip().endswith("smoke passed")


def test_the_no_sync_check_runs_its_35_steps_on_cpu() -> None:
    spec = importlib.util.spec_from_file_location("smoke_checks", BENCH / "smoke_checks.py")
    checks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checks)
    assert checks.no_sync("cpu", 8).startswith("35 steps on cpu: iteration 35, mean loss ")


def test_bad_options_exit_2_before_any_step(tmp_path: Path) -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0  # the whole script parses
    for args in (["--gpu"], ["--only", "kill,nosuch"]):
        p = _smoke(*args, log=tmp_path / "x.log")
        assert p.returncode == 2 and len(p.stderr.splitlines()) == 1 and not (tmp_path / "x.log").exists()


def _sent_bytes() -> tuple[int, bool]:
    """What the device tool sends: the working tree's tracked and untracked-not-ignored files, plus
    ``.device/`` (carried; git ignores it). Returns (bytes, whether .device/ was there to count)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.split(b"\0")
    files = [ROOT / os.fsdecode(p) for p in listed if p]
    device = ROOT / ".device"
    files += [p for p in device.rglob("*")] if device.is_dir() else []
    return sum(p.stat().st_size for p in files if p.is_file() and not p.is_symlink()), device.is_dir()


def test_the_device_run_fits_its_limits_timings_one_csv_and_the_summary_table(tmp_path: Path) -> None:
    """``--cpu`` through the timing steps into an $OUT-like folder: what comes back is the log and ONE CSV
    (the device returns at most 8 files, 2 folders deep), and the log ends with the summary table (images/s,
    every shipped study projected, the compile rule). What travels (tree + .device/) stays under 64 MiB."""
    out = tmp_path / "OUT"
    out.mkdir()
    p = _smoke("--cpu", "--only", "bench,compile,fused", log=out / "smoke.log")
    text = (out / "smoke.log").read_text()
    assert p.returncode == 0, text[-3000:]
    files = [f for f in out.rglob("*") if f.is_file()]
    assert sorted(f.name for f in files) == ["smoke-timings.csv", "smoke.log"]
    assert all(f.stat().st_size < 16 * MiB and re.fullmatch(r"[A-Za-z0-9._-]+", f.name) for f in files)
    table = text[text.index("=== resnet_lab smoke summary (cpu)"):]
    rows = (out / "smoke-timings.csv").read_text().splitlines()
    assert rows[0].startswith("source,") and len(rows) > 4  # eager, compiled and probe-overhead rows, one file
    for line in ("| resnet-8 | reference |", "| resnet-8 | fp32 eager |", "| resnet-8 | bf16 compiled default |",
                 "cifar10_paper (50 runs)", "fashion_mnist (27 runs)", "d2l_resnet18 (2 runs)",
                 "compile rule these numbers support (default): "):
        assert line in table, line
    assert text.rstrip().endswith("smoke passed")

    if not (ROOT / ".device").is_dir() and DEVICE_PREP.is_file():
        prep = subprocess.run([str(DEVICE_PREP)], cwd=ROOT, capture_output=True, text=True, timeout=300)
        if prep.returncode != 0:
            warnings.warn(f"device-prep failed here ({prep.stderr.strip()[-200:]}): size counted without .device/")
    size, with_device = _sent_bytes()
    if not with_device:
        warnings.warn("no .device/ here (../shared/tools/device-prep makes it): the tree's size is counted without it")
    assert size < 64 * MiB, f"{size / MiB:.1f} MiB would travel to the device, over its 64 MiB"
