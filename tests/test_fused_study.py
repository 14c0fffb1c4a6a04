"""Fused studies (issue 26): the runs of a study that share a shape train as one fused model, and
each run comes out as the unfused study makes it.

Four nets (plain-8 and resnet-8, seeds 0 and 1) on the synthetic set, on the CPU in fp32 (bf16 and
CUDA sum in other orders), 16 iterations, through the real loop (``resnet-lab study``) with
``--fuse on`` and ``--fuse off``. Per net and step, the logged metrics, the per-layer gradient
norms (the probes' table) and the final weights agree within the tolerances below: the fused and the unfused
net add the same numbers in another order (grouped vs single convolutions), so they are equal up
to float rounding grown over the steps (the tolerances below say how close that is, and why). The
same comparison fails for a swapped seed or a missing shortcut (shown below); a BatchNorm statistic
shared across the nets is caught by tests/test_fused.py at the model level.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

import resnet_lab.train as train_mod
from resnet_lab.checkpoint import checkpoint_path
from resnet_lab.cli import main
from resnet_lab.studyfile import load_scales

TRAIN = """\
dataset = "synthetic"
iterations = 16
batch_size = 32
log_every = 4
eval_every = 8
eval_batch_size = 512
checkpoint_every = 8
precision = "fp32"
compile = false
"""
NETS = ("plain-8-s0", "resnet-8-s0", "plain-8-s1", "resnet-8-s1")
# How close "the same training" is in fp32. Fused and unfused convolutions add the same products in
# another order, and the rounding grows over the steps, most in the plain nets (ill-conditioned, the
# lab's subject) and in the gradients of BatchNorm biases (sums that nearly cancel). Measured here
# over 16 steps, the largest fused-vs-unfused differences were 1e-4 in the training losses, 5e-3 in
# a test loss (through BatchNorm's running statistics), 5.5e-2 (median
# 3e-3) in a per-layer gradient norm and 1.8e-3 in the whole weight vector; training the unfused
# net in another memory layout alone moves them as much (9e-2 in a gradient norm). A swapped seed
# or a missing shortcut: >= 0.27 in the weights, a median >= 0.1 in the gradient norms.
LOSS_REL = 1e-3  # training losses and lr
EVAL_LOSS_REL = 2e-2  # evaluated losses (test, validation, the plateau's fixed training images)
ERROR_POINTS = 1.6  # error rates: two images of a 128-image training window
PROBE_REL = 0.1  # any one probe value (per-layer gradient norm, gradient flow, response std), per step
PROBE_MEDIAN_REL = 1e-2  # the median over all layers and steps of a run
WEIGHTS_REL = 1e-2  # the whole final weight vector, relative L2


def _study(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(f'name = "{name}"\ndepths = [8]\nseeds = [0, 1]\n[train]\n{TRAIN}'
                    f'checkpoint_dir = "{tmp_path / "ckpt"}"\n[cpu]\n')
    return path


def _run_study(path: Path, uri: str, *extra: str) -> int:
    return main(["study", str(path), "--scale", "cpu", "--no-progress", "--tracking-uri", uri, *extra])


def _children(client: MlflowClient, study: str) -> list[Any]:
    exp = client.get_experiment_by_name(study)
    return client.search_runs([exp.experiment_id], "tags.kind = 'train'")


def _record(client: MlflowClient, run: Any, tmp_path: Path) -> dict[str, Any]:
    """What a run holds: tags, every metric's history (throughput: its steps only), the per-layer
    gradient norms and the initial and final weights."""
    run_id = run.info.run_id
    folder = tmp_path / run_id
    histories = {}
    for key in run.data.metrics:
        points = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        histories[key] = [(s, 0.0) for s, _ in points] if key.startswith("perf/") else points
    return {"run_id": run_id, "status": run.info.status, "tags": run.data.tags, "metrics": histories,
            "grad_norms": pd.read_parquet(client.download_artifacts(run_id, "probes/grad_norms.parquet", str(folder))),
            "weights": torch.load(client.download_artifacts(run_id, "model/state_dict.pt", str(folder)), weights_only=True),
            "init": torch.load(client.download_artifacts(run_id, "model/init_state_dict.pt", str(folder)),
                               weights_only=True)}


def _records(client: MlflowClient, study: str, tmp_path: Path) -> dict[str, dict[str, Any]]:
    return {r.info.run_name: _record(client, r, tmp_path) for r in _children(client, study)
            if r.info.status == "FINISHED"}


def _rel(x: float, y: float) -> float:
    return abs(x - y) / max(abs(y), 1e-12)


def _differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Where two runs are not the same training (``LOSS_REL`` and the other tolerances above):
    metric (key, step), gradient norms, weights; an empty list when they agree everywhere. The
    same keys, steps and layers are asserted, not compared."""
    out = []
    assert a["metrics"].keys() == b["metrics"].keys()
    for key in a["metrics"]:
        assert [s for s, _ in a["metrics"][key]] == [s for s, _ in b["metrics"][key]], key  # same steps, each once
        for (step, x), (_, y) in zip(a["metrics"][key], b["metrics"][key]):
            tolerance = PROBE_REL if key.startswith("z_probes/") else \
                EVAL_LOSS_REL if key.endswith("/loss") and key != "train/loss" else LOSS_REL
            far = abs(x - y) > ERROR_POINTS if key.endswith("error") else _rel(x, y) > tolerance
            out += [f"{key} at {step}: {x} vs {y}"] if far else []
    ga, gb = a["grad_norms"], b["grad_norms"]
    assert ga[["iteration", "layer"]].astype(str).equals(gb[["iteration", "layer"]].astype(str))
    rel = (ga["value"] - gb["value"]).abs() / gb["value"].abs().clip(lower=1e-12)
    out += [f"grad norm {r.layer} at {r.iteration}: {r.value}" for r in ga[rel > PROBE_REL].itertuples()]
    out += [f"grad norms: median difference {rel.median():.2e}"] if rel.median() > PROBE_MEDIAN_REL else []
    assert a["weights"].keys() == b["weights"].keys()
    wa, wb = (torch.cat([w[k].double().flatten() for k in sorted(w) if w[k].is_floating_point()])
              for w in (a["weights"], b["weights"]))
    out += [f"weights: relative L2 difference {(wa - wb).norm() / wb.norm():.2e}"] if \
        (wa - wb).norm() > WEIGHTS_REL * wb.norm() else []
    return out


@pytest.fixture(scope="module")
def studies(tracking_uri: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, dict[str, Any]]]:
    """The same study trained fused (``--fuse on``) and unfused (``--fuse off``), on the CPU."""
    tmp = tmp_path_factory.mktemp("fused-study")
    client = MlflowClient(tracking_uri)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: False)  # the claim is about fp32 on the CPU
        assert _run_study(_study(tmp, "fused-on"), tracking_uri, "--fuse", "on") == 0
        assert _run_study(_study(tmp, "fused-off"), tracking_uri, "--fuse", "off") == 0
    return {"on": _records(client, "fused-on", tmp), "off": _records(client, "fused-off", tmp)}


def test_a_fused_study_trains_the_same_runs_as_an_unfused_one(studies: dict[str, dict[str, dict[str, Any]]]) -> None:
    fused, alone = studies["on"], studies["off"]
    assert set(fused) == set(alone) == set(NETS)
    for name in NETS:
        assert fused[name]["tags"]["fused_nets"] == "4" and alone[name]["tags"]["fused_nets"] == "1"  # --fuse off
        assert fused[name]["tags"]["config_hash"] == alone[name]["tags"]["config_hash"]
        assert len(fused[name]["metrics"]) > 10 and {"train/loss", "test/error", "final/train_error"} <= \
            fused[name]["metrics"].keys()
        assert all(torch.equal(v, alone[name]["init"][k]) for k, v in fused[name]["init"].items())  # same seed, same net
        assert _differences(fused[name], alone[name]) == [], name
    # the nets did learn (not a comparison of untrained weights): the residual nets' loss fell
    assert fused["resnet-8-s0"]["metrics"]["train/loss"][-1][1] < fused["resnet-8-s0"]["metrics"]["train/loss"][0][1]


def test_the_tolerance_catches_a_swapped_seed_and_a_missing_shortcut(
        studies: dict[str, dict[str, dict[str, Any]]]) -> None:
    fused, alone = studies["on"], studies["off"]
    swapped_seed = _differences(fused["plain-8-s0"], alone["plain-8-s1"])
    missing_shortcut = _differences(fused["resnet-8-s0"], alone["plain-8-s0"])
    for found in (swapped_seed, missing_shortcut):
        assert any(d.startswith("train/loss") for d in found) and any(d.startswith("weights") for d in found)
        assert any(d.startswith("grad norms: median") for d in found)


def test_a_fused_group_killed_after_a_checkpoint_resumes_exactly_and_trains_no_run_twice(
        tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        studies: dict[str, dict[str, dict[str, Any]]]) -> None:
    """The group crashes at iteration 11 (checkpoints at 8). One net's checkpoint is then lost: on
    the rerun the three others resume together from 8, in their own runs, and the fourth, standing
    at 0, trains afresh alone (groups are formed by where each net stands)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = _study(tmp_path, "fused-kill")
    real, fired = train_mod.lr_at, []

    def lr_at(cfg: Any, it: int) -> float:
        if it == 11 and not fired:
            fired.append(it)
            raise RuntimeError("simulated crash")
        return real(cfg, it)

    monkeypatch.setattr(train_mod, "lr_at", lr_at)
    assert _run_study(path, tracking_uri, "--fuse", "on") == 1
    client = MlflowClient(tracking_uri)
    first = {r.info.run_name: r for r in _children(client, "fused-kill")}
    assert sorted(first) == sorted(NETS) and all(r.info.status == "FAILED" for r in first.values())
    runs = {r.name: r for r in load_scales(path)["cpu"].runs}
    assert all(torch.load(checkpoint_path(runs[n].cfg), weights_only=True)["iteration"] == 8 for n in NETS)
    checkpoint_path(runs["plain-8-s1"].cfg).unlink()
    capsys.readouterr()

    assert _run_study(path, tracking_uri, "--fuse", "on") == 0
    out = capsys.readouterr().out
    for name in ("plain-8-s0", "resnet-8-s0", "resnet-8-s1"):
        line = next(line for line in out.splitlines() if re.search(rf"\] {name} started on", line))
        assert f"resuming run {first[name].info.run_id} from its checkpoint at iteration 8" in line
        assert "fused with" in line and "plain-8-s1" not in line.split("fused with")[1].split(";")[0]
    assert re.search(r"\] plain-8-s1 started on cpu$", out, re.M)  # alone, afresh

    after = _records(client, "fused-kill", tmp_path)
    reference = studies["on"]
    for name in ("plain-8-s0", "resnet-8-s0", "resnet-8-s1"):
        assert after[name]["run_id"] == first[name].info.run_id  # resumed in its own run, not trained again
        assert after[name]["metrics"] == reference[name]["metrics"], name  # every step once, the same values
        assert all(torch.equal(v, reference[name]["weights"][k]) for k, v in after[name]["weights"].items())
    assert after["plain-8-s1"]["run_id"] != first["plain-8-s1"].info.run_id
    assert _differences(after["plain-8-s1"], studies["off"]["plain-8-s1"]) == []  # trained alone, as unfused
    assert len(_children(client, "fused-kill")) == 5  # the lost run's FAILED attempt stays, as any failed run
    assert not list((tmp_path / "ckpt").rglob("*.pt"))  # every finished run removed its checkpoint
