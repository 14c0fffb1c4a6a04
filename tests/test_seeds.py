"""Seeds are one more axis of the study grid (issue 13): a multi-seed synthetic study trains
in parallel (``--jobs 2``), a rerun (inline) retrains only what is not FINISHED and adds new
seeds under the same parent run, and the report reads every seed: per-net means over three seeds, paired
intervals over three seeds, the failed attempt listed as left out, never counted."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from analysis.report import write_report
from resnet_lab.cli import main

TRAIN = """\
dataset = "synthetic"
iterations = 10
batch_size = 32
log_every = 5
eval_every = 10
eval_batch_size = 512
checkpoint_every = 5
"""


def _write_study(path: Path, seeds: list[int], ckpt: Path) -> Path:
    path.write_text(f'name = "seeds3"\ndepths = [8]\nseeds = {seeds}\n[train]\n{TRAIN}checkpoint_dir = "{ckpt}"\n'
                    "[cpu]\n")
    return path


def _children(client: MlflowClient) -> list:
    exp = client.get_experiment_by_name("seeds3")
    return client.search_runs([exp.experiment_id], "tags.kind = 'train'")


def test_more_seeds_jobs_resume_and_report(tmp_path: Path, tracking_uri: str, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    client = MlflowClient(tracking_uri)
    path = _write_study(tmp_path / "seeds3.toml", [0, 1], tmp_path / "ckpt")
    args = ["study", str(path), "--jobs", "2", "--no-progress", "--tracking-uri", tracking_uri]
    assert main(args) == 0
    first = {r.info.run_name: r for r in _children(client)}
    assert sorted(first) == ["plain-8-s0", "plain-8-s1", "resnet-8-s0", "resnet-8-s1"]
    parents = {r.data.tags["mlflow.parentRunId"] for r in first.values()}
    assert len(parents) == 1 and all(r.info.status == "FINISHED" for r in first.values())
    assert {r.data.tags["seed"] for r in first.values()} == {"0", "1"}
    capsys.readouterr()

    # one seed's run failed (a dead worker), and the study grows by a seed: only those three train
    failed = first["resnet-8-s1"].info.run_id
    client.set_terminated(failed, "FAILED")
    _write_study(path, [0, 1, 2], tmp_path / "ckpt")
    assert main(args[:2] + args[4:]) == 0  # inline this time (--jobs 1)
    out, err = capsys.readouterr()
    for name in ("plain-8-s0", "plain-8-s1", "resnet-8-s0"):
        assert f"{name} skipped: already finished" in out
    trained = sorted(line.split("] ")[1].split(" ")[0] for line in out.splitlines() if " finished in " in line)
    assert trained == ["plain-8-s2", "resnet-8-s1", "resnet-8-s2"]
    assert "settings changed" in err and "seeds" in err  # the parent keeps its first params, says so
    runs = _children(client)
    assert len(runs) == 7 and {r.data.tags["mlflow.parentRunId"] for r in runs} == parents

    monkeypatch.setattr("analysis.document.FIGURES", {})  # figures with seeds: tests/test_stats.py
    md = write_report("seeds3", tracking_uri=tracking_uri, out_dir=tmp_path / "reports", log_to_mlflow=False)
    res = pd.read_csv(md.parent / "results.csv")
    assert sorted(zip(res["net"], res["seed"])) == [(n, s) for n in ("plain-8", "resnet-8") for s in (0, 1, 2)]
    assert failed not in set(res["run_id"])  # the failed attempt is not a seed's number
    new = next(r for r in runs if r.info.run_name == "resnet-8-s1" and r.info.status == "FINISHED")
    assert res.loc[(res["net"] == "resnet-8") & (res["seed"] == 1), "run_id"].item() == new.info.run_id
    summary = pd.read_csv(md.parent / "summary.csv").set_index("net")
    assert list(summary["n_runs"]) == [3, 3] and list(summary["test_error_n"]) == [3, 3]
    text = md.read_text()
    assert re.search(r"At depth 8, plain-8 .* training error.*\(95 % CI \S+ to \S+, 3 seeds;", text)  # paired, 3 seeds
    assert "Runs left out" in text and failed in text
