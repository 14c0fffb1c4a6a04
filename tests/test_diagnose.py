"""``resnet-lab diagnose`` on a synthetic two-run study (plain-8 and resnet-8, 20 iterations):
every diagnostic logged into each run, atomically and resumably; bad input logs nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import RunStatus

from resnet_lab.cli import main
from resnet_lab.diagnostics.run import SWEEP, tag_key
from resnet_lab.study import run_study
from resnet_lab.studyfile import load_scales

NAMES = ("lesion", "landscape", "curvature", "shattering")
METRICS = {"lesion": ("diag/lesion/baseline_error", "diag/lesion/single_mean_increase", "diag/lesion/single_max_increase"),
           "landscape": ("diag/landscape/sharpness",),
           "curvature": ("diag/curvature/lambda_max", "diag/curvature/trace"),
           "shattering": ("diag/shattering/rho1/init", "diag/shattering/rho1/final")}
# Tiny sizes, the same at both scales. The lesion takes the whole synthetic test set (512 images),
# so deleting nothing must give the test error training logged.
SIZES = """
[{t}.lesion]
test_images = 512
draws = 1
batch_size = 256
[{t}.landscape]
train_images = 32
line_points = 5
grid = 4
path_points = 4
batch_size = 32
[{t}.curvature]
images = 8
power_max_iterations = 4
hutchinson_vectors = 2
hutchinson_block = 2
batch_size = 8
[{t}.shattering]
points = 16
pairs = 2
max_lag = 4
bn_images = 64
sweep_depths = [8, 14]
sweep_seeds = 1
batch_size = 64
"""
STUDY = """name = "{name}"
depths = [8]
[train]
dataset = "synthetic"
iterations = 20
batch_size = 32
log_every = 10
eval_every = 20
eval_batch_size = 512
# fp32 stated: the lesion baseline (diagnosed in fp32) is compared with the run's own test error
precision = "fp32"
checkpoint_dir = "{ckpt}"
[diagnostics]
{full}
[cpu]
[cpu.diagnostics]
{cpu}
"""


def _study_file(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(STUDY.format(name=name, ckpt=tmp_path / "ckpt", full=SIZES.format(t="diagnostics"),
                                 cpu=SIZES.format(t="cpu.diagnostics")))
    return path


def _trained(tmp_path: Path, uri: str, name: str) -> Path:
    path = _study_file(tmp_path, name)
    result = run_study(path, tracking_uri=uri, progress=False)
    assert [o.status for o in result.outcomes] == ["FINISHED", "FINISHED"]
    return path


def _runs(client: MlflowClient, name: str) -> tuple[object, dict[str, object]]:
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("kind") == "study")
    return parent, {r.info.run_name: r for r in runs if r.data.tags.get("kind") == "train"}


def _snapshot(client: MlflowClient, name: str) -> dict[str, tuple]:
    """Everything diagnose could add to a run: tags, metric histories, artifacts."""
    exp = client.get_experiment_by_name(name)
    out = {}
    for r in client.search_runs([exp.experiment_id]):
        rid = r.info.run_id
        hist = {k: len(client.get_metric_history(rid, k)) for k in r.data.metrics}
        arts = sorted(a.path for a in client.list_artifacts(rid, "diagnostics"))
        out[rid] = (dict(r.data.tags), hist, arts, r.info.status)
    return out


def _complete(client: MlflowClient, run: object, name: str) -> bool:
    """The run has diagnostic ``name``: its tag, and then also its table and metrics."""
    rid = run.info.run_id
    if tag_key(name) not in run.data.tags:
        return False
    table = client.download_artifacts(rid, f"diagnostics/{name}.parquet")
    assert len(pd.read_parquet(table)) > 0
    assert all(k in run.data.metrics for k in METRICS[name]), (run.info.run_name, name)
    return True


def test_diagnose_logs_every_table_and_metric_into_each_run_and_a_rerun_logs_nothing(
        tmp_path: Path, tracking_uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = _trained(tmp_path, tracking_uri, "diag_e2e")
    assert main(["diagnose", str(path), "--tracking-uri", tracking_uri, "--no-progress"]) == 0
    assert "diagnostics logged: 9;" in capsys.readouterr().out  # 4 per run, the sweep on the parent
    client = MlflowClient(tracking_uri)
    parent, runs = _runs(client, "diag_e2e")
    settings = load_scales(path)["cpu"].diagnostics.settings
    for run in runs.values():
        assert {n: run.data.tags[tag_key(n)] for n in NAMES} == {n: settings.hash(n) for n in NAMES}
        assert all(_complete(client, run, n) for n in NAMES)
        # exactly the diag/* keys: 8, the room a run keeps for them in its 30-key budget (issue 14)
        assert {k for k in run.data.metrics if k.startswith("diag/")} == {k for keys in METRICS.values() for k in keys}
        # nothing deleted = the run's own test error: same images, same normalisation as training
        assert run.data.metrics["diag/lesion/baseline_error"] == pytest.approx(run.data.metrics["test/error"])
        lesion = pd.read_parquet(client.download_artifacts(run.info.run_id, "diagnostics/lesion.parquet"))
        assert set(lesion["kind"]) >= {"baseline", "single"}
        moments = pd.read_parquet(client.download_artifacts(run.info.run_id, "diagnostics/shattering.parquet"))
        assert sorted(set(moments["moment"])) == ["final", "init"]
    assert parent.data.tags[tag_key(SWEEP)] == settings.hash(SWEEP)
    sweep = pd.read_parquet(client.download_artifacts(parent.info.run_id, f"diagnostics/{SWEEP}.parquet"))
    assert set(zip(sweep["arch"], sweep["depth"])) == {(a, d) for a in ("plain", "resnet") for d in (8, 14)}

    _report_has_the_diagnostics(tmp_path, tracking_uri, "diag_e2e")

    before = _snapshot(client, "diag_e2e")
    assert main(["diagnose", str(path), "--tracking-uri", tracking_uri, "--no-progress"]) == 0
    # 2 runs x 4 diagnostics, and the depth sweep on the parent run
    assert "diagnostics logged: 0; already logged with the same settings: 9" in capsys.readouterr().out
    assert _snapshot(client, "diag_e2e") == before


def _report_has_the_diagnostics(tmp_path: Path, uri: str, name: str) -> None:
    """The report's section: the four figures (PNG + PDF) and, for each, a sentence set beside its paper."""
    from analysis.report import write_report

    md = write_report(name, tracking_uri=uri, out_dir=tmp_path / "reports", log_to_mlflow=False).read_text()
    section = md[md.index("## Why the deep plain nets degrade"):]
    for fig in NAMES:
        assert (tmp_path / "reports" / name / "figures" / f"{fig}.png").stat().st_size > 0
        assert (tmp_path / "reports" / name / "figures" / f"{fig}.pdf").exists()
        assert f"figures/{fig}.png" in section
    for paper in ("Veit et al. 2016", "Li et al. 2018", "Yao et al. 2020", "Balduzzi et al. 2017"):
        line = next((l for l in section.splitlines() if l.startswith("- ") and paper in l), f"no sentence: {paper}")
        assert any(f" {verdict} {paper}" in line for verdict in ("consistent with", "unlike", "not comparable with")), line
    assert "Not run for this study" not in section


def test_sigkill_mid_diagnose_leaves_each_diagnostic_complete_or_absent_and_a_rerun_completes(
        tmp_path: Path, tracking_uri: str) -> None:
    path = _trained(tmp_path, tracking_uri, "diag_kill")
    cmd = [sys.executable, "-m", "resnet_lab", "diagnose", str(path), "--tracking-uri", tracking_uri, "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    for line in proc.stderr:  # the marker: the first diagnostic of the first run is logged
        if " logged (" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL  # killed in the middle, not finished
    client = MlflowClient(tracking_uri)
    _, runs = _runs(client, "diag_kill")
    done = [(r.info.run_name, n) for r in runs.values() for n in NAMES if _complete(client, r, n)]
    assert 1 <= len(done) < 2 * len(NAMES)

    assert main(["diagnose", str(path), "--tracking-uri", tracking_uri, "--no-progress"]) == 0
    _, runs = _runs(client, "diag_kill")
    assert all(_complete(client, r, n) for r in runs.values() for n in NAMES)


def _bad(kind: str, tmp_path: Path, uri: str, path: Path, runs: dict[str, object]) -> list[str]:
    """The command line of one bad-input case."""
    plain = runs["plain-8-s0"].info.run_id
    client = MlflowClient(uri)
    if kind == "unknown diagnostic":
        return [str(path), "--only", "lesion,hessian"]
    if kind == "run not finished":
        run = client.create_run(client.get_experiment_by_name("diag_bad").experiment_id, run_name="half")
        client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
        return ["--run", run.info.run_id]
    if kind == "run without weights":
        run = client.create_run(client.get_experiment_by_name("diag_bad").experiment_id, run_name="old")
        client.set_terminated(run.info.run_id, "FINISHED")
        return ["--run", run.info.run_id]
    if kind == "unreadable store":
        garbage = tmp_path / "garbage.db"
        garbage.write_bytes(b"not a database" * 100)
        return ["--run", plain, "--tracking-uri", f"sqlite:///{garbage}"]
    if kind == "missing store":
        return ["--run", plain, "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"]
    assert kind == "no finished runs"
    other = _study_file(tmp_path, "diag_never_run")
    return [str(other)]


BAD = {"unknown diagnostic": ["unknown diagnostic 'hessian'"], "run not finished": ["FAILED, not FINISHED"],
       "run without weights": ["no model/state_dict.pt"], "unreadable store": ["cannot reach the MLflow"],
       "missing store": ["no MLflow tracking store", "none.db"], "no finished runs": ["diag_never_run"]}


def test_bad_input_is_one_line_exit_2_and_logs_nothing(tmp_path: Path, tracking_uri: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = _trained(tmp_path, tracking_uri, "diag_bad")
    client = MlflowClient(tracking_uri)
    _, runs = _runs(client, "diag_bad")
    for kind, words in BAD.items():
        args = _bad(kind, tmp_path, tracking_uri, path, runs)
        before = _snapshot(client, "diag_bad")
        capsys.readouterr()
        code = main(["diagnose", *args, *([] if "--tracking-uri" in args else ["--tracking-uri", tracking_uri]),
                     "--no-progress"])
        out, err = capsys.readouterr()
        assert code == 2 and err.count("\n") == 1 and err.startswith("resnet-lab: error:"), (kind, err)
        assert all(w in err for w in words), (kind, err)
        assert _snapshot(client, "diag_bad") == before, kind
    assert not (tmp_path / "none.db").exists() and client.get_experiment_by_name("diag_never_run") is None

    from analysis.report import write_report  # a study without diagnostics: the report says so, per diagnostic

    md = write_report("diag_bad", tracking_uri=tracking_uri, out_dir=tmp_path / "r", log_to_mlflow=False).read_text()
    assert md.count("Not run for this study") == 4 and not list((tmp_path / "r").rglob("lesion.png"))


def test_diagnose_holds_one_runs_tensors_on_the_device_at_a_time(
        tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every run is checked before anything is logged, but only on "meta" (no memory); each is put on the
    device when its turn comes and released after, so a 50-run study holds one run's tensors, not 50."""
    import resnet_lab.diagnostics.run as diag_run

    path = _trained(tmp_path, tracking_uri, "diag_one_at_a_time")
    jobs, live_at_measure = [], []
    real_prepare, real_measure = diag_run.prepare, diag_run.measure

    def prepare(client: object, run: object, job: diag_run.Job, device: object) -> diag_run.Job:
        jobs.append(job)
        return real_prepare(client, run, job, device)

    def measure(job: diag_run.Job, name: str) -> tuple:
        live = {id(j) for j in jobs if j.model is not None and next(j.model.parameters()).device.type != "meta"}
        live_at_measure.append((job.name, len(live), id(job) in live))
        return real_measure(job, name)

    monkeypatch.setattr(diag_run, "prepare", prepare)
    monkeypatch.setattr(diag_run, "measure", measure)
    assert main(["diagnose", str(path), "--only", "lesion", "--tracking-uri", tracking_uri, "--no-progress"]) == 0
    assert sorted(live_at_measure) == [("plain-8-s0", 1, True), ("resnet-8-s0", 1, True)]
    assert all(j.model is None and not j.inputs for j in jobs)  # released after its run
