"""Depth studies: the study file is validated with errors that name the key, it expands into the
right runs, and running it leaves one parent run with one child per training, skips finished
runs, resumes a killed one exactly, trains runs in parallel, and runs on Ray."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import torchvision
from mlflow import MlflowClient

from resnet_lab import plateau
from resnet_lab import study as study_mod
from resnet_lab.checkpoint import checkpoint_path
from resnet_lab.diagnostics.settings import NAMES as DIAG_NAMES
from resnet_lab.cli import main
from resnet_lab.errors import UserError
from resnet_lab.study import ensure_data, run_study
from resnet_lab.studyfile import load_scales

# Tiny, fast runs: resnet-8 / plain-8 on the synthetic set; a checkpoint every log.
TRAIN = """\
dataset = "synthetic"
iterations = 20
batch_size = 32
log_every = 10
eval_every = 20
eval_batch_size = 512
checkpoint_every = 10
"""


def _study(tmp_path: Path, top: str = "depths = [8]", train: str = "", cpu: str = "", name: str = "t",
           file: str = "study.toml", base: str = TRAIN) -> Path:
    """A study file: ``top`` lines, then [train] (``base`` with ``train``'s keys replacing its own), then [cpu]."""
    lines = {line.split("=")[0].strip(): line for line in (base + "\n" + train).splitlines() if line.strip()}
    path = tmp_path / file
    path.write_text(f'name = "{name}"\n{top}\n[train]\n' + "\n".join(lines.values()) + f"\n[cpu]\n{cpu}\n")
    return path


# ---------------------------------------------------------------- validation

BAD = {  # id: (top, train, cpu, words the one-line error must contain)
    "unknown top key": ("dephts = [8]", "", "", ["dephts", "did you mean depths"]),
    "train key at top": ("depths = [8]\nlr = 0.1", "", "", ["'lr'", "[train] table"]),
    "unknown train key": ("depths = [8]", "lrr = 0.1", "", ["[train]", "'lrr'", "did you mean lr"]),
    "unknown cpu key": ("depths = [8]", "", "iterations = 5", ["[cpu]", "'iterations'", "[cpu.train]"]),
    "wrong type": ("depths = [8]", 'lr = "fast"', "", ["[train]", "lr expects float", "'fast'"]),
    "wrong grid type": ('depths = [8]\nseeds = "0"', "", "", ["seeds must be a list of integers"]),
    "bad depth": ("depths = [8, 21]", "", "", ["depths", "21", "6n+2"]),
    "bad model": ('models = ["resnet-9"]', "", "", ["models", "resnet-9", "6n+2"]),
    "empty models": ("depths = []", "", "", ["model list is empty", "depths", "models"]),
    "empty cpu models": ("depths = [8]", "", "depths = []", ["[cpu]", "model list is empty"]),
    "duplicate depth": ("depths = [8, 8]", "", "", ["depths lists 8 more than once", "duplicate runs"]),
    "duplicate model": ('depths = [8]\nmodels = ["ResNet-8"]', "", "",
                        ["models", "resnet-8 is already in archs x depths", "duplicate runs"]),
    "duplicate seed": ("depths = [8]\nseeds = [0, 0]", "", "", ["seeds lists 0 more than once"]),
    "negative lr": ("depths = [8]", "lr = -0.1", "", ["[train]", "lr must be a positive number", "-0.1"]),
    "negative seed": ("depths = [8]\nseeds = [-1]", "", "", ["seeds must be >= 0", "-1"]),
    "negative depth": ("depths = [-20]", "", "", ["depths must be positive", "-20"]),
    "negative cpu iterations": ("depths = [8]", "", "[cpu.train]\niterations = -5",
                                ["[cpu.train]", "iterations must be a positive integer", "-5"]),
    "set by the study": ("depths = [8]", 'model = "plain-20"', "", ["[train]", "model cannot be set"]),
    "override of no model": ("depths = [8]\n[overrides.resnet-110]\nlr = 0.01", "", "",
                             ["[overrides.resnet-110]", "names no model of this study"]),
    "cpu milestones": ("depths = [8]", "milestones = [10, 15]", "[cpu.train]\niterations = 12",
                       ["[cpu.train]", "milestone 15 is not before the last iteration 12"]),
    "bad fuse": ('depths = [8]\nfuse = "yes"', "", "", ['fuse must be "auto", "on" or "off"', "'yes'"]),
    "bad cpu fuse": ("depths = [8]", "", "fuse = true", ['[cpu] fuse must be', "True"]),
    "override against cpu scale": ("depths = [8]\n[overrides.plain-8]\nwarmup_iterations = 15", "",
                                   "[cpu.train]\niterations = 12",
                                   ["[overrides.plain-8]", "warmup_iterations 15", "cpu scale"]),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_study_files_are_one_user_error_naming_the_key(tmp_path: Path, case: str) -> None:
    top, train, cpu, words = BAD[case]
    path = _study(tmp_path, top, train, cpu)
    with pytest.raises(UserError) as e:
        load_scales(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    for word in words:
        assert word in message, message


def test_missing_cpu_table_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nocpu.toml"
    path.write_text('depths = [8]\n[train]\ndataset = "synthetic"\n')
    with pytest.raises(UserError, match=r"missing \[cpu\] table"):
        load_scales(path)
    with pytest.raises(UserError, match="does not exist"):
        load_scales(tmp_path / "nope.toml")


def test_a_later_table_may_repair_an_earlier_one(tmp_path: Path) -> None:
    """Only the merged config must be valid: a cpu override can undo what breaks the cpu scale."""
    path = _study(tmp_path, "depths = [8]\n[overrides.plain-8]\nwarmup_iterations = 15", "",
                  "[cpu.train]\niterations = 12\n[cpu.overrides.plain-8]\nwarmup_iterations = 5")
    runs = {r.name: r.cfg for r in load_scales(path)["cpu"].runs}
    assert runs["plain-8-s0"].warmup_iterations == 5 and runs["plain-8-s0"].iterations == 12


BAD_AT_RUN_TIME = {  # valid files whose problem shows against the data: found before any store exists
    "train_size over the data": ("train_size = 5000", ["train_size 5000 exceeds the 2048"]),
    "missing data dir": ('dataset = "fashion-mnist"\ndata_dir = "/nonexistent/fm"', ["/nonexistent/fm"]),
}


@pytest.mark.parametrize("case", ["unknown train key", "bad depth", "empty models", "negative lr"])
def test_cli_bad_file_is_one_line_exit_2_and_no_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str], case: str) -> None:
    top, train, cpu, words = BAD[case]
    path = _study(tmp_path, top, train, cpu)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["study", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("resnet-lab: error: ") and words[0] in err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlartifacts").exists()


@pytest.mark.parametrize("case", list(BAD_AT_RUN_TIME), ids=list(BAD_AT_RUN_TIME))
def test_cli_data_problems_are_one_line_exit_2_and_no_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str], case: str) -> None:
    train, words = BAD_AT_RUN_TIME[case]
    path = _study(tmp_path, train=train)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["study", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the CPU-scale banner
    assert last.startswith("resnet-lab: error: ") and all(w in last for w in words), err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "checkpoints").exists()


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found nowhere and not downloadable: one line with the command (installing it is `make data`'s job)."""
    import resnet_lab.data as data

    study = load_scales(_study(tmp_path, train='dataset = "fashion-mnist"'))["cpu"]
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "empty")
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="run 'sudo apt-get install dataset-fashion-mnist'"):
        ensure_data(study)


REPO = Path(__file__).resolve().parent.parent


def _make_data(tmp_path: Path, **variables: str) -> subprocess.CompletedProcess:
    """``make data`` with the given variables, the venv step skipped, and a fake ``sudo`` on the PATH."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "sudo").write_text('#!/bin/sh\n[ "$1" = -n ] && shift\nexec "$@"\n')
    (fake / "sudo").chmod(0o755)
    env = os.environ | {"PATH": f"{fake}:{os.environ['PATH']}"}
    return subprocess.run(["make", "-s", "-C", str(REPO), "-o", "setup", "data",
                           *[f"{k}={v}" for k, v in variables.items()]],
                          capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_data_installs_debian_package_when_it_may_or_says_how(tmp_path: Path) -> None:
    """Fashion-MNIST needed and missing: `make data` installs Debian's package (as root or with
    passwordless sudo), or, with no apt-get to use, says in one line how to get it."""
    calls = tmp_path / "calls"
    apt_get = tmp_path / "apt-get"
    apt_get.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    apt_get.chmod(0o755)
    missing = 'sh -c "exit 3"'
    done = _make_data(tmp_path, FASHION_MNIST_MISSING=missing, APT_GET=str(apt_get))
    assert done.returncode == 0, done.stderr
    assert calls.read_text().splitlines() == ["install -y -q dataset-fashion-mnist"]
    assert f"installing Debian's dataset-fashion-mnist: {apt_get} install" in done.stderr.replace("sudo -n ", "")

    refused = _make_data(tmp_path, FASHION_MNIST_MISSING=missing, APT_GET=str(tmp_path / "no-apt-get"))
    assert refused.returncode == 2
    assert "run 'sudo apt-get install dataset-fashion-mnist'" in refused.stderr.splitlines()[0]

    calls.unlink()
    present = _make_data(tmp_path, FASHION_MNIST_MISSING="true", APT_GET=str(apt_get))
    assert present.returncode == 0 and not calls.exists() and not present.stderr


def test_make_data_asks_for_fashion_mnist_only_when_the_study_needs_it_and_it_is_missing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import runpy

    check = runpy.run_path(str(REPO / "scripts" / "fashion_mnist_missing.py"))
    synthetic = _study(tmp_path, file="synthetic.toml")
    fashion = _study(tmp_path, train='dataset = "fashion-mnist"', file="fashion.toml")
    bad = _study(tmp_path, top="dephts = [8]", file="bad.toml")
    loads: list[str] = []

    def not_here(name: str, **_: object) -> None:
        loads.append(name)
        raise UserError("Fashion-MNIST not found (download failed)")

    check["main"].__globals__["load_dataset"] = not_here
    assert check["main"](str(synthetic)) == 0 and check["main"](str(bad)) == 0 and loads == []
    assert check["main"](str(fashion)) == 3 and loads == ["fashion-mnist"]


# ---------------------------------------------------------------- grid expansion

def test_grid_expands_seed_by_seed_depth_by_depth_with_overrides_and_cpu_scale(tmp_path: Path) -> None:
    path = _study(tmp_path, 'archs = ["residual", "plain"]\ndepths = [20, 8]\nmodels = ["resnet-110"]\n'
                            'seeds = [0, 1]\n[overrides.resnet-110]\nwarmup_iterations = 5',
                  train="iterations = 100\nmilestones = [50, 75]",
                  cpu='depths = [8]\nmodels = []\n[cpu.train]\niterations = 30\nmilestones = [15, 25]\n'
                      '[cpu.overrides.plain-8]\nlr = 0.05')
    scales = load_scales(path)
    full, cpu = scales["full"], scales["cpu"]
    per_seed = ["plain-20", "resnet-20", "plain-8", "resnet-8", "resnet-110"]
    assert [r.name for r in full.runs] == [f"{m}-s{s}" for s in (0, 1) for m in per_seed]
    assert [r.index for r in full.runs] == list(range(1, 11))
    assert all(r.cfg.seed == int(r.name[-1]) and r.cfg.experiment == "t" for r in full.runs)
    assert {r.cfg.model: r.cfg.warmup_iterations for r in full.runs} == \
        {"plain-20": 0, "resnet-20": 0, "plain-8": 0, "resnet-8": 0, "resnet-110": 5}
    assert {(r.cfg.iterations, tuple(r.cfg.milestones)) for r in full.runs} == {(100, (50, 75))}
    assert len({r.config_hash for r in full.runs}) == 10

    assert [r.name for r in cpu.runs] == ["plain-8-s0", "resnet-8-s0", "plain-8-s1", "resnet-8-s1"]
    assert {(r.cfg.model, r.cfg.iterations, tuple(r.cfg.milestones), r.cfg.lr) for r in cpu.runs} == \
        {("plain-8", 30, (15, 25), 0.05), ("resnet-8", 30, (15, 25), 0.1)}
    assert {r.config_hash for r in cpu.runs}.isdisjoint(r.config_hash for r in full.runs)
    params = cpu.params()
    assert params["scale"] == "cpu" and params["train.iterations"] == "30" and params["overrides.plain-8.lr"] == "0.05"
    assert params["archs"] == "resnet,plain" and params["depths"] == "8" and params["seeds"] == "0,1"


def test_epochs_in_the_cpu_scale_replace_iterations(tmp_path: Path) -> None:
    path = _study(tmp_path, cpu="[cpu.train]\nepochs = 2")
    full, cpu = load_scales(path).values()
    assert (full.runs[0].cfg.iterations, full.runs[0].cfg.epochs) == (20, None)
    assert (cpu.runs[0].cfg.iterations, cpu.runs[0].cfg.epochs) == (None, 2)


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.glob("experiments/*.toml")), ids=lambda p: p.name)
def test_shipped_study_files_are_valid(path: Path) -> None:
    scales = load_scales(path)
    assert scales["full"].runs and scales["cpu"].runs
    for scale in scales.values():
        models = {r.cfg.model for r in scale.runs}
        assert {m.replace("resnet", "plain") for m in models if m.startswith("resnet")} & models, \
            f"{path.name} {scale.scale}: no depth with both a plain and a residual net"


def test_shipped_full_scales_train_enough_seeds_for_a_spread() -> None:
    """He et al. give mean +- std over 5 runs: cifar10_paper trains 5 seeds, fashion_mnist 3, so every
    net of a full study has a spread and every plain/resnet pair a paired interval."""
    root = Path(__file__).parent.parent / "experiments"
    for name, seeds in (("cifar10_paper", [0, 1, 2, 3, 4]), ("fashion_mnist", [0, 1, 2])):
        full = load_scales(root / f"{name}.toml")["full"]
        assert full.seeds == seeds
        assert len(full.runs) == len(seeds) * len({r.cfg.model for r in full.runs})


def test_shipped_cpu_scales_train_two_seeds_and_evaluate_six_times() -> None:
    """Issue 12: every CPU scale trains >= 2 seeds (a spread, a paired interval) and the default
    study's runs evaluate test error >= 6 times (curves, not two points), all on the same test images."""
    root = Path(__file__).parent.parent / "experiments"
    for path in sorted(root.glob("*.toml")):
        cpu = load_scales(path)["cpu"]
        assert len(cpu.seeds) >= 2, path.name
    for run in load_scales(root / "fashion_mnist.toml")["cpu"].runs:
        assert run.cfg.iterations // run.cfg.eval_every >= 6 and run.cfg.test_size is not None


def test_the_default_studys_cpu_scale_diagnoses_every_seed_and_judges_every_plateau() -> None:
    """Issue 27: at the default study's CPU scale the four diagnostics run on every seed of every net
    (so each "why" gets a 3-seed interval, paired by seed), and every run logs the plateau's curve
    often enough that the last 20 % of its iterations hold two evaluations (three points for the
    plateau's fitted line, with the one where the window starts)."""
    cpu = load_scales(Path(__file__).parent.parent / "experiments" / "fashion_mnist.toml")["cpu"]
    assert cpu.diagnostics.seeds is None and set(cpu.diagnostics.names) == set(DIAG_NAMES)  # None: every seed
    assert len(cpu.seeds) >= 3 and {r.cfg.seed for r in cpu.runs} == set(cpu.seeds)
    for run in cpu.runs:
        assert run.cfg.plateau_images > 0 and run.cfg.iterations * plateau.WINDOW >= 2 * run.cfg.eval_every


# ---------------------------------------------------------------- running

def _children(client: MlflowClient, experiment: str) -> dict[str, object]:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'train'")
    return {r.info.run_name: r for r in runs}


def test_two_run_study_end_to_end_then_rerun_skips_both(tmp_path: Path, tracking_uri: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = _study(tmp_path, name="e2e", train=f'checkpoint_dir = "{tmp_path / "ckpt"}"')
    first = run_study(path, tracking_uri=tracking_uri, progress=False)
    out, err = capsys.readouterr()
    scale = "full" if torch.cuda.is_available() else "cpu"
    if scale == "cpu":
        assert "no CUDA device here, so this runs the CPU scale" in err and "--scale full" in err
    assert [o.status for o in first.outcomes] == ["FINISHED", "FINISHED"]
    assert "[1/2] plain-8-s0 started on " in out and "(2/2 runs done)" in out

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("e2e")
    parent = client.get_run(first.parent_run_id)
    assert parent.info.run_name == "e2e" and parent.info.status == "FINISHED"
    assert {k: parent.data.tags.get(k) for k in ("kind", "study", "scale", "study_file", "failed_runs")} == \
        {"kind": "study", "study": "e2e", "scale": scale, "study_file": str(path), "failed_runs": "0"}
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "study")] == ["study/study.toml"]
    iterations = load_scales(path)[scale].runs[0].cfg.iterations
    assert parent.data.tags["mlflow.note.content"].startswith(  # what ran, not the study file's prose
        f"Depth study e2e, {scale} scale: 2 nets (plain-8, resnet-8) x 1 seed (0), {iterations} iterations each")
    children = _children(client, "e2e")
    hashes = {r.name: r.config_hash for r in load_scales(path)[scale].runs}
    assert set(children) == {"plain-8-s0", "resnet-8-s0"}
    for name, run in children.items():
        tags = run.data.tags
        assert run.info.status == "FINISHED"
        assert (tags["mlflow.parentRunId"], tags["kind"], tags["study"], tags["scale"], tags["config_hash"]) == \
            (parent.info.run_id, "train", "e2e", scale, hashes[name])
    assert not list((tmp_path / "ckpt").rglob("*.pt"))  # a finished run leaves no checkpoint

    again = run_study(path, tracking_uri=tracking_uri, progress=False)
    out = capsys.readouterr().out
    assert [o.status for o in again.outcomes] == ["SKIPPED", "SKIPPED"] and again.parent_run_id == parent.info.run_id
    assert [o.run_id for o in again.outcomes] == [children[n].info.run_id for n in ("plain-8-s0", "resnet-8-s0")]
    assert "plain-8-s0 skipped: already finished" in out and "(reused)" in out
    assert len(client.search_runs([exp.experiment_id])) == 3  # nothing new: one parent, two children


def test_jobs_2_trains_in_parallel_and_a_failed_run_does_not_stop_the_study(
        tmp_path: Path, tracking_uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = _study(tmp_path, 'depths = [8]\n[overrides.plain-8]\nlr = 1e30', name="jobs",
                  train=f'checkpoint_dir = "{tmp_path / "ckpt"}"')
    code = main(["study", str(path), "--jobs", "2", "--no-progress", "--tracking-uri", tracking_uri])
    out, err = capsys.readouterr()
    assert code == 1 and "1 of 2 runs of study jobs failed: plain-8-s0" in err
    lines = out.splitlines()
    starts = [i for i, line in enumerate(lines) if re.search(r" started on \S+ \(pid \d+\)", line)]
    ends = [i for i, line in enumerate(lines) if " finished in " in line or " FAILED after " in line]
    assert len(starts) == 2 and len(ends) == 2 and max(starts) < min(ends)  # both ran at once
    assert len({lines[i].split("pid ")[1] for i in starts}) == 2
    children = _children(MlflowClient(tracking_uri), "jobs")
    assert children["resnet-8-s0"].info.status == "FINISHED"
    assert children["plain-8-s0"].info.status == "FAILED"
    assert "non-finite training loss" in children["plain-8-s0"].data.tags["failure_reason"]
    assert any("plain-8-s0 failed: diverged" in line for line in lines)  # the summary names the reason


def test_progress_lines_and_an_eta_weighted_by_depth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from resnet_lab import launch

    runs = load_scales(_study(tmp_path, 'archs = ["plain"]\ndepths = [20, 56]\nseeds = [0, 1]'))["cpu"].runs
    names = [r.name for r in runs]
    assert names == ["plain-20-s0", "plain-56-s0", "plain-20-s1", "plain-56-s1"]
    clock = iter([0.0, 0.0, 10.0, 10.0, 12.0])
    monkeypatch.setattr(launch.time, "perf_counter", lambda: next(clock))
    reporter = launch.Reporter(runs, {4}, "t", progress=False, jobs=2)  # plain-56-s1 finished before
    reporter.started([runs[0]], "cpu")  # t = 0, both slots busy
    reporter.started([runs[2]], "cpu")
    reporter.done(runs[0], "[1/4] plain-20-s0 finished")  # t = 10: 10 s per 20 layers
    reporter.started([runs[1]], "cpu")
    reporter.done(runs[2], "[3/4] plain-20-s1 finished")  # t = 12: 11 s per 20 layers
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[1/4] plain-20-s0 started on cpu"
    # plain-20-s1 should be done now; plain-56-s0 waits for a slot and takes 56/20 x 10 s = 28 s.
    assert out[2] == "[1/4] plain-20-s0 finished (2/4 runs done, ETA 00:28)"
    # plain-56-s0 takes 56/20 x 11 s = 30.8 s, 2 s of it done.
    assert out[4] == "[3/4] plain-20-s1 finished (3/4 runs done, ETA 00:28)"


# ---------------------------------------------------------------- SIGKILL and resume

KILL_TRAIN = TRAIN.replace("iterations = 20", "iterations = 60").replace("eval_every = 20", "eval_every = 30") \
    .replace("checkpoint_every = 10", "checkpoint_every = 20")


def _study_cmd(path: Path, cwd: Path) -> subprocess.Popen:
    """``python -m resnet_lab study`` in ``cwd`` on one CPU thread: two of them share two cores
    without oversubscription, and the claim is exact equality on CPU."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env |= {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    with open(cwd / "study.log", "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "resnet_lab", "study", str(path), "--no-progress",
                                 "--tracking-uri", "sqlite:///mlflow.db"], cwd=cwd, env=env, stdout=log,
                                stderr=subprocess.STDOUT)


def _last_step(db: Path, key: str) -> int:
    """The highest stored step of ``key``, read-only straight from the SQLite store, so polling
    cannot race the study process on creating the MLflow schema."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
        (step,) = con.execute("SELECT MAX(step) FROM metrics WHERE key = ?", (key,)).fetchone()
    return -1 if step is None else step


def _kill_past_checkpoint(proc: subprocess.Popen, ckpt: Path, db: Path, log: Path) -> None:
    """SIGKILL ``proc`` once its checkpoint exists and a metric step beyond it is stored, so the
    rerun has both a checkpoint to resume from and logged steps it must not log again."""
    import torch

    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, "the study ended before the kill:\n" + log.read_text()
        assert time.monotonic() < deadline, "no checkpoint within 180 s:\n" + log.read_text()
        if ckpt.exists():
            try:
                at = torch.load(ckpt, weights_only=False)["iteration"]
            except (OSError, EOFError, RuntimeError):
                continue  # replaced or removed while reading
            if _last_step(db, "train/loss") > at:
                break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _histories(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    keys = client.get_run(run_id).data.metrics
    out = {}
    for key in keys:
        points = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        # Throughput is wall-clock: its steps must match, its values cannot.
        out[key] = [(s, 0.0) for s, _ in points] if key.startswith("perf/") else points
    return out


def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_study(tmp_path: Path) -> None:
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    killed.mkdir(), reference.mkdir()
    path = _study(tmp_path, name="kill", base=KILL_TRAIN, train='checkpoint_dir = "ckpt"')
    first = load_scales(path)["cpu"].runs[0]
    ckpt = killed / checkpoint_path(first.cfg)  # relative: ckpt/kill/plain-8-s0-<hash>.pt under the cwd
    db, log = killed / "mlflow.db", killed / "study.log"
    procs: list[subprocess.Popen] = []
    try:
        procs.append(ref := _study_cmd(path, reference))  # the uninterrupted study, alongside
        procs.append(proc := _study_cmd(path, killed))
        _kill_past_checkpoint(proc, ckpt, db, log)
        assert ckpt.exists(), "the kill came after the run finished"
        at = torch.load(ckpt, weights_only=False)["iteration"]
        stored = _last_step(db, "train/loss")
        client = MlflowClient(f"sqlite:///{db}")
        killed_runs = _children(client, "kill")  # both nets if the study trained them fused (--fuse on)
        before = killed_runs["plain-8-s0"]
        assert all(r.info.status == "RUNNING" for r in killed_runs.values())

        procs.append(rerun := _study_cmd(path, killed))
        assert rerun.wait(timeout=300) == 0, log.read_text()
        assert ref.wait(timeout=300) == 0, (reference / "study.log").read_text()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert f"resuming run {before.info.run_id} from its checkpoint at iteration {at}" in log.read_text()

    got = _children(client, "kill")
    ref_client = MlflowClient(f"sqlite:///{reference / 'mlflow.db'}")
    want = _children(ref_client, "kill")
    assert set(got) == set(want) == {"plain-8-s0", "resnet-8-s0"}
    for name, run in killed_runs.items():
        assert got[name].info.run_id == run.info.run_id  # resumed in the same MLflow run
    assert all(r.info.status == "FINISHED" for r in got.values())
    for name in got:
        a, b = _histories(client, got[name].info.run_id), _histories(ref_client, want[name].info.run_id)
        assert set(a) == set(b) and len(a) > 10  # losses, errors, lr, and the probes' per-layer metrics
        assert [s for s, _ in a["train/loss"]] == [10, 20, 30, 40, 50, 60]  # none missing, none twice
        for key in a:
            assert a[key] == b[key], f"{name} {key} (killed at iteration {at}, step {stored} stored)"


# ---------------------------------------------------------------- Ray

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_launcher_with_an_mlflow_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("ray")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen([str(mlflow_cli), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'srv.db'}",
                               "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"], cwd=tmp_path, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True,
                              env=os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job workers
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "mlflow server did not answer within 120 s"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        path = _study(tmp_path, name="ray", train=f'checkpoint_dir = "{tmp_path / "ckpt"}"')
        code = main(["study", str(path), "--launcher", "ray", "--tracking-uri", url, "--no-progress"])
        out = capsys.readouterr().out
        assert code == 0, out
        assert "plain-8-s0 submitted to Ray" in out and "; Ray (" in out
        client = MlflowClient(url)
        children = _children(client, "ray")
        (parent,) = client.search_runs([client.get_experiment_by_name("ray").experiment_id], "tags.kind = 'study'")
        assert set(children) == {"plain-8-s0", "resnet-8-s0"} and parent.info.status == "FINISHED"
        for run in children.values():
            assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
            assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [10, 20]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
