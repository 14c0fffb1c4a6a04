"""SLURM through submitit (resnet_lab.slurm), tested without a cluster: submitit's ``local``
executor runs the array's tasks as processes on this machine, with the same requeue path a
preempted SLURM task takes (SIGUSR2 -> the task's ``checkpoint()`` -> requeue)."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from resnet_lab import launch, slurm
from resnet_lab.checkpoint import checkpoint_path
from resnet_lab.cli import main
from resnet_lab.errors import UserError
from resnet_lab.study import run_study
from resnet_lab.studyfile import load_scales

pytest.importorskip("submitit")
psutil = pytest.importorskip("psutil")


def _study(tmp_path: Path, name: str, slurm_table: str = "") -> Path:
    """plain-8 and resnet-8, seeds 0 and 1: 4 runs of 20 iterations, the resnet's 60 (the one preempted)."""
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f'name = "{name}"\narchs = ["plain", "resnet"]\ndepths = [8]\nseeds = [0, 1]\n'
        f'[train]\ndataset = "synthetic"\niterations = 20\nbatch_size = 16\nlog_every = 10\n'
        f'eval_every = 20\neval_batch_size = 512\ncheckpoint_every = 10\nprobes = false\n'
        f'checkpoint_dir = "{tmp_path / "ckpt"}"\nprecision = "fp32"\ncompile = false\n'
        f'[overrides.resnet-8]\niterations = 60\neval_every = 60\n'
        f'[cpu]\n[slurm]\nfolder = "{tmp_path / "submitit"}"\n{slurm_table}')
    return path


def test_the_slurm_table_and_flags_become_sbatch_settings(tmp_path: Path) -> None:
    path = _study(tmp_path, "table", 'partition = "gpu"\ntime_min = 90\nsbatch = {account = "proj"}\n'
                                     'setup = ["source .venv/bin/activate"]\n')
    settings = slurm.with_flags(load_scales(path)["full"].slurm, time_min=30, array_parallelism=2,
                                sbatch=["qos=high"])
    params = settings.executor_parameters("slurm")
    assert params["slurm_partition"] == "gpu" and params["timeout_min"] == 30 and params["gpus_per_node"] == 1
    assert params["slurm_array_parallelism"] == 2 and params["slurm_setup"] == ["source .venv/bin/activate"]
    assert params["slurm_additional_parameters"] == {"account": "proj", "qos": "high"}
    assert "slurm_partition" not in settings.executor_parameters("local")


@pytest.mark.parametrize("table, message", [
    ('partiton = "gpu"\n', "[slurm] unknown key 'partiton'"),
    ("time_min = 0\n", "[slurm] time_min must be positive"),
    ('gpus_per_task = "2"\n', "[slurm] gpus_per_task must be int"),
    ("sbatch = {exclusive = true}\n", "[slurm] sbatch values must be strings or integers"),
])
def test_a_bad_slurm_table_is_one_line(tmp_path: Path, table: str, message: str) -> None:
    with pytest.raises(UserError) as e:
        load_scales(_study(tmp_path, "bad", table))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_sqlite_on_a_cluster_is_refused_before_anything_is_written(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "m.db"
    code = main(["study", str(_study(tmp_path, "sq")), "--launcher", "submitit", "--tracking-uri", f"sqlite:///{db}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "needs an MLflow tracking server" in err
    assert not db.exists() and not (tmp_path / "submitit").exists()
    assert main(["study", str(_study(tmp_path, "sq")), "--jobs", "2", "--launcher", "submitit", "--cluster",
                 "local"]) == 2
    assert main(["study", str(_study(tmp_path, "sq")), "--cluster", "local"]) == 2  # --cluster needs submitit


def test_a_local_array_trains_the_study_and_a_preempted_task_resumes(tmp_path: Path, tracking_uri: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Four runs as four array tasks; one task gets SLURM's preemption signal (SIGUSR2) after its
    first checkpoint: submitit calls its checkpoint(), requeues it, and the requeued task continues
    the same MLflow run from the checkpoint. Every run finishes once; no step is logged twice.
    SQLite is fine here: the local cluster's tasks share this machine's filesystem, as --jobs does."""
    path = _study(tmp_path, "array")
    sent: list[int] = []

    def preempt_second(jobs: list[Any], runs: list[Any]) -> None:
        ckpt = checkpoint_path(runs[1].cfg)

        def watch() -> None:
            while not ckpt.exists():  # after its first checkpoint: preempted mid-run, with something to resume
                if jobs[1].done():
                    return
                time.sleep(0.05)
            tasks = psutil.Process(jobs[1]._process.pid).children(recursive=True)
            for task in tasks:
                task.send_signal(signal.SIGUSR2)
                sent.append(task.pid)

        threading.Thread(target=watch, daemon=True).start()

    monkeypatch.setattr(launch, "submitted", preempt_second)
    result = run_study(
        path, launcher="submitit", cluster="local", tracking_uri=tracking_uri, progress=False)
    assert sent, "the second task ended before its first checkpoint was seen"
    assert [o.status for o in result.outcomes] == ["FINISHED"] * 4
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("array")
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'train'")
    assert sorted(r.info.run_name for r in runs) == sorted(o.run.name for o in result.outcomes)  # 4, none twice
    assert all(r.info.status == "FINISHED" for r in runs)
    preempted = next(r for r in runs if r.info.run_name == result.outcomes[1].run.name)
    steps = [m.step for m in client.get_metric_history(preempted.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(10, 61, 10))  # every log step once: resumed, not restarted
    log = "".join(p.read_text() for p in (tmp_path / "submitit").rglob("*_log.*"))
    assert "Calling checkpoint method" in log and "Requeued job" in log
