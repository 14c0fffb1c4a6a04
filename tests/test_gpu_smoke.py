"""benchmarks/gpu_smoke.sh cannot rot unseen: its --cpu mode runs here.

Only what no other test covers: the kill -9 / resume steps through the script, and its
35-step check in this process (a process start costs more than the check); the study, the
benchmark scripts and real-data training have their own tests, and the whole --cpu walk
takes minutes on 2 shared cores.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPT = BENCH / "gpu_smoke.sh"


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
