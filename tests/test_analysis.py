"""The analysis package on a small real MLflow store: loading, figures, report, findings, CLI.

One module-scoped study (parent run + five tiny synthetic trainings: plain-8, plain-14,
resnet-8 with two seeds, resnet-14) is built once; everything else reads it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from analysis import findings
from analysis.document import build_report
from analysis.figures import FIGURES, FigureResult, draw_figures
from analysis.numbers import fmt, pm
from analysis.report import add_parser, study_name, write_report
from analysis.runs import CURVE_KEYS, aggregate, load_study, reduce_grad_norms
from resnet_lab.config import TrainConfig
from resnet_lab.errors import UserError
from resnet_lab.train import train

STUDY = "analysis_study"
NETS = [("plain-8", 0), ("plain-14", 0), ("resnet-8", 0), ("resnet-8", 1), ("resnet-14", 0)]


@pytest.fixture(scope="module")
def store(tracking_uri: str) -> dict:
    """A study as the study runner lays it out: one parent run, one child run per training."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(STUDY)
    exp_id = exp.experiment_id if exp else client.create_experiment(STUDY)
    parent = client.create_run(exp_id, run_name=STUDY, tags={"kind": "study", "study": STUDY, "scale": "cpu",
                                                             "study_file": f"experiments/{STUDY}.toml"})
    pid = parent.info.run_id
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CI box is shared; one thread avoids oversubscription
    try:
        results = {}
        for model, seed in NETS:
            cfg = TrainConfig(model=model, dataset="synthetic", iterations=20, log_every=10, eval_every=10,
                              eval_batch_size=256, batch_size=32, seed=seed, tracking_uri=tracking_uri,
                              experiment=STUDY, progress=False, checkpoint_every=0)
            r = train(cfg, parent_run_id=pid, extra_tags={"kind": "train", "study": STUDY, "scale": "cpu"})
            assert r.status == "FINISHED"
            results[(model, seed)] = r.run_id
    finally:
        torch.set_num_threads(threads)
    client.log_text(pid, 'name = "analysis_study"\nmodels = ["plain-8", "plain-14", "resnet-8", "resnet-14"]\n',
                    f"study/{STUDY}.toml")
    client.log_param(pid, "seeds", "[0]")
    client.set_terminated(pid, "FINISHED")
    return {"uri": tracking_uri, "parent": pid, "runs": results}


@pytest.fixture(scope="module")
def study(store: dict):
    return load_study(STUDY, store["uri"])


@pytest.fixture(scope="module")
def report(store: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reports")
    return write_report(STUDY, tracking_uri=store["uri"], out_dir=out)


# --------------------------------------------------------------------------- loading


def test_runs_table_matches_mlflow(store: dict, study) -> None:
    client = MlflowClient(store["uri"])
    assert sorted(zip(study.runs["model"], study.runs["seed"])) == sorted(NETS)
    for row in study.runs.itertuples():
        m = client.get_run(row.run_id).data.metrics
        assert row.train_error == m["train/error"] and row.test_error == m["test/error"]
        assert row.run_id == store["runs"][(row.model, row.seed)]
        assert row.arch == ("plain" if row.model.startswith("plain") else "residual")
        assert row.depth == int(row.model.split("-")[1]) and row.scale == "cpu"
    assert study.parent.run_id == store["parent"] and "models" in study.parent.study_text


def test_curves_are_full_histories(store: dict, study) -> None:
    client = MlflowClient(store["uri"])
    rid = store["runs"][("resnet-14", 0)]
    for key in ("train/error", "test/error", "lr"):
        hist = sorted((m.step, m.value) for m in client.get_metric_history(rid, key))
        got = study.curves[(study.curves["run_id"] == rid) & (study.curves["metric"] == key)]
        assert list(zip(got["iteration"], got["value"])) == hist
    assert set(study.curves["metric"]) <= set(CURVE_KEYS)
    assert not study.curves["metric"].str.startswith("grad").any()


def test_curves_are_read_in_bulk_not_per_run(store: dict, study, monkeypatch: pytest.MonkeyPatch) -> None:
    def per_run_read(*_a, **_k):
        raise AssertionError("get_metric_history called: curves must come from one bulk read per key")

    monkeypatch.setattr(MlflowClient, "get_metric_history", per_run_read)
    again = load_study(STUDY, store["uri"], probes=False)
    pd.testing.assert_frame_equal(again.curves, study.curves)


def test_probe_tables_come_from_artifacts(study) -> None:
    n_runs = len(study.runs)
    for name in ("grad_flow", "responses", "grad_norms", "grad_norm_series"):
        df = getattr(study, name)
        assert df["run_id"].nunique() == n_runs, name
        assert {"model", "arch", "depth", "seed", "layer", "layer_index", "iteration", "value"} <= set(df.columns)
    # flow and responses at init, each evaluation and the end
    assert sorted(study.grad_flow["iteration"].unique()) == [0, 10, 20]
    assert set(study.grad_norms["group"]) == {"weight", "bn"}


def test_aggregate_mean_and_std_over_seeds(store: dict, study) -> None:
    client = MlflowClient(store["uri"])
    agg = aggregate(study.runs).set_index("model")
    vals = [client.get_run(store["runs"][("resnet-8", s)]).data.metrics["test/error"] for s in (0, 1)]
    assert agg.loc["resnet-8", "n_seeds"] == 2
    assert agg.loc["resnet-8", "test_error_mean"] == pytest.approx(np.mean(vals))
    assert agg.loc["resnet-8", "test_error_std"] == pytest.approx(np.std(vals, ddof=1))
    assert math.isnan(agg.loc["plain-8", "test_error_std"]) and agg.loc["plain-8", "n_seeds"] == 1
    assert list(agg.index) == ["plain-8", "plain-14", "resnet-8", "resnet-14"]


def test_grad_norm_reduction_windows(tmp_path: Path) -> None:
    iters = np.arange(25)
    layers = ["stem.conv", "fc", "stem.bn"]
    df = pd.DataFrame({"iteration": np.repeat(iters, 3), "layer": pd.Categorical(np.tile(layers, 25)),
                       "layer_index": np.tile([0, 1, 0], 25), "group": pd.Categorical(np.tile(["weight", "weight", "bn"], 25)),
                       "value": np.repeat(iters.astype(float), 3) + np.tile([0.0, 100.0, 200.0], 25)})
    df.to_parquet(tmp_path / "g.parquet", index=False)
    snaps, series = reduce_grad_norms(tmp_path / "g.parquet", points=[0, 10, 25], window=10, max_points=5)
    stem = snaps[snaps["layer"] == "stem.conv"].set_index("iteration")
    assert stem.loc[0, "value"] == 0 and stem.loc[10, "value"] == pytest.approx(4.5)  # mean of 0..9
    assert stem.loc[25, "value"] == pytest.approx(19.5) and stem.loc[25, "n_iterations"] == 10  # 15..24
    fc = series[series["layer"] == "fc"]
    assert len(fc) == 5 and fc["value"].tolist() == pytest.approx([102, 107, 112, 117, 122])
    # rows in any order (not the layout Probes writes) reduce to the same numbers
    df.sample(frac=1.0, random_state=0).to_parquet(tmp_path / "shuffled.parquet", index=False)
    snaps2, series2 = reduce_grad_norms(tmp_path / "shuffled.parquet", points=[0, 10, 25], window=10, max_points=5)
    for a, b in ((snaps, snaps2), (series, series2)):
        key = ["iteration", "layer", "group"]
        a, b = (x.sort_values(key).reset_index(drop=True) for x in (a, b))
        pd.testing.assert_frame_equal(a, b)


# --------------------------------------------------------------------------- figures and report


def test_every_figure_is_written_as_png_and_pdf(report: Path) -> None:
    fig_dir = report.parent / "figures"
    for name in FIGURES:
        for ext in ("png", "pdf"):
            path = fig_dir / f"{name}.{ext}"
            assert path.is_file() and path.stat().st_size > 1000, path
    from PIL import Image

    with Image.open(fig_dir / "degradation.png") as im:
        assert im.info["dpi"][0] >= 150


def test_figures_drawn_in_forked_workers_equal_those_drawn_in_process(study, tmp_path: Path) -> None:
    """Parallel drawing changes where a figure is drawn, never what: same results, same PNG bytes."""
    names = ["degradation", "grad_flow", "layer_responses"]
    drawers = {n: FIGURES[n] for n in names}
    one = draw_figures(study, tmp_path / "one", drawers, jobs=1)
    two = draw_figures(study, tmp_path / "two", drawers, jobs=2)
    assert [f.name for f in two] == names and all(f.made for f in two)
    for a, b in zip(one, two):
        assert (a.title, a.caption, a.notes) == (b.title, b.caption, b.notes)
        assert a.paths["png"].read_bytes() == b.paths["png"].read_bytes(), a.name

    def where(_study, _out):
        return FigureResult("where", "where", notes=[str(os.getpid())])

    (drawn,) = draw_figures(study, tmp_path / "pid", {"where": where}, jobs=2)  # one figure: drawn in-process
    assert drawn.notes == [str(os.getpid())]
    pids = {f.notes[0] for f in draw_figures(study, tmp_path / "pid", {"a": where, "b": where}, jobs=2)}
    assert str(os.getpid()) not in pids  # two: in worker processes

    def broken(_study, _out):
        raise ValueError("a figure that cannot be drawn")

    with pytest.raises(ValueError, match="a figure that cannot be drawn"):  # a worker's error is the caller's
        draw_figures(study, tmp_path / "err", {"degradation": FIGURES["degradation"], "broken": broken}, jobs=2)


def test_report_table_equals_run_metrics(store: dict, report: Path) -> None:
    client = MlflowClient(store["uri"])
    text = report.read_text()
    for (model, seed), rid in store["runs"].items():
        assert rid[:8] in text and rid in text  # short id in the results table, full id in the runs table
    m = {s: client.get_run(store["runs"][("resnet-8", s)]).data.metrics for s in (0, 1)}
    te = [m[s]["test/error"] for s in (0, 1)]
    assert pm(np.mean(te), np.std(te, ddof=1), 2) in text
    plain14 = client.get_run(store["runs"][("plain-14", 0)]).data.metrics
    rid14 = store["runs"][("plain-14", 0)]
    row = next(line for line in text.splitlines() if line.startswith("| plain-14") and f"`{rid14[:8]}`" in line)
    assert f"| {fmt(plain14['train/error'])} | {fmt(plain14['test/error'])} |" in row
    html = (report.parent / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(FIGURES) and "src=\"figures/" not in html


def test_report_is_logged_to_the_parent_run(store: dict, report: Path) -> None:
    client = MlflowClient(store["uri"])
    names = {a.path for a in client.list_artifacts(store["parent"], "report")}
    assert {"report/report.md", "report/report.html", "report/figures"} <= names
    figs = {a.path for a in client.list_artifacts(store["parent"], "report/figures")}
    assert "report/figures/degradation.pdf" in figs


def test_report_gives_the_parent_run_headline_numbers_and_a_description(store: dict, report: Path, study) -> None:
    """After the report, the parent run's row carries numbers (the plain depth gap on training error,
    each net's mean final test error) and its description says what ran and what the report found."""
    parent = MlflowClient(store["uri"]).get_run(store["parent"])
    m, runs = parent.data.metrics, study.runs
    for model, g in runs.groupby("model"):
        assert m[f"study/mean_test_error/{model}"] == pytest.approx(g["test_error"].mean())
    plain8, plain14 = (runs.loc[runs["model"] == n, "train_error"].iloc[0] for n in ("plain-8", "plain-14"))
    assert m["study/plain_deep_minus_shallow_train_error"] == pytest.approx(plain14 - plain8)
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith(f"Depth study {STUDY}, cpu scale: 4 nets (plain-8, plain-14, resnet-8, resnet-14) x 2 "
                           "seeds (0, 1), 20 iterations each, on synthetic.")
    bullets = [line for line in note.splitlines() if line.startswith("- ")]
    assert bullets and all(b in report.read_text() for b in bullets)  # the report's summary sentences


def _unlabelled(sentence: str) -> str:
    """A summary sentence without the plateau labels the report adds to nets that did not reach it."""
    return re.sub(r" \(not at its plateau( in seeds? [\d, ]+)?\)", "", sentence)


def test_summary_is_computed_from_the_numbers(study, tmp_path: Path) -> None:
    agg = aggregate(study.runs).set_index("model")
    a, b = agg.loc["plain-14", "train_error_mean"], agg.loc["plain-8", "train_error_mean"]
    word = "worse" if a > b else "better"
    rep = build_report(study, tmp_path / "r1", figures=[])
    rep.summary = [_unlabelled(s) for s in rep.summary]
    # plain-14 and plain-8 share one seed: the difference, worded as one seed (issue 13)
    ab, ba = f"{fmt(a, like=[b])} % vs {fmt(b, like=[a])} %", f"{fmt(b, like=[a])} % vs {fmt(a, like=[b])} %"
    assert any(s.startswith(f"plain-14 trains {word} than plain-8 by {fmt(abs(a - b))} points (one seed, no interval; "
                            f"training error {ab})") for s in rep.summary)
    # flip the ordering in the loaded runs: the sentence must flip with it
    runs = study.runs.copy()
    i14, i8 = runs.index[runs["model"] == "plain-14"][0], runs.index[runs["model"] == "plain-8"][0]
    runs.loc[i14, "train_error"], runs.loc[i8, "train_error"] = b, a
    flipped = dataclasses.replace(study, runs=runs)
    rep2 = build_report(flipped, tmp_path / "r2", figures=[])
    rep2.summary = [_unlabelled(s) for s in rep2.summary]
    other = "better" if word == "worse" else "worse"
    assert any(s.startswith(f"plain-14 trains {other} than plain-8 by {fmt(abs(a - b))} points (one seed, no interval; "
                            f"training error {ba})") for s in rep2.summary)
    assert ba in rep2.markdown.read_text()


def _runs(rows: list[tuple[str, int, float, float]]) -> pd.DataFrame:
    return pd.DataFrame([{"run_id": f"r{i}", "run_name": f"{m}-s{s}", "model": m, "arch": "plain" if m.startswith("plain") else "residual",
                          "depth": int(m.split("-")[1]), "seed": s, "train_error": tr, "test_error": te}
                         for i, (m, s, tr, te) in enumerate(rows)])


def test_findings_flip_with_the_data() -> None:
    deg = findings.depth_findings(_runs([("plain-20", 0, 2.3, 8.0), ("plain-56", 0, 4.1, 9.0)]))
    assert deg[0].startswith("plain-56 trains worse than plain-20 by 1.80 points (one seed, no interval; "
                             "training error 4.10 % vs 2.30 %)")
    assert "degradation problem" in deg[0]
    no_deg = findings.depth_findings(_runs([("plain-20", 0, 4.1, 8.0), ("plain-56", 0, 2.3, 9.0)]))
    assert no_deg[0].startswith("plain-56 trains better than plain-20 by 1.80 points (one seed, no interval; "
                                "training error 2.30 % vs 4.10 %)")
    assert "no degradation" in no_deg[0]
    seeds = _runs([("resnet-56", 0, 1.0, 7.0), ("resnet-56", 1, 1.2, 7.2), ("plain-56", 0, 4.0, 10.0),
                   ("plain-56", 1, 4.4, 10.4)])
    (rvp,) = findings.residual_vs_plain(seeds)  # plain-56 minus ResNet-56, seed by seed: 3.0, 3.2
    assert rvp.startswith("At depth 56, plain-56 trains worse than ResNet-56 by 3.10 points (95 % CI 1.83 to 4.37, "
                          "2 seeds; training error 4.20 % vs 1.10 %)")
    # seed by seed +0.5 and -0.4: the interval holds 0, so no direction is stated
    close = _runs([("resnet-56", 0, 4.0, 7.0), ("resnet-56", 1, 4.4, 7.2), ("plain-56", 0, 4.5, 10.0),
                   ("plain-56", 1, 4.0, 10.4)])
    assert findings.residual_vs_plain(close)[0].startswith(
        "At depth 56, plain-56 and ResNet-56 show no clear difference in training error: +0.05 points (95 % CI ")
    assert findings.depth_findings(_runs([("plain-20", 0, 2.0, 8.0)])) == []


def _curves(train: dict[tuple[str, int], list[float]], steps: list[int]) -> pd.DataFrame:
    """train/error and test/error at ``steps`` for each (model, seed)."""
    rows = [{"model": m, "seed": s, "iteration": it, "metric": key, "value": v}
            for (m, s), values in train.items() for it, v in zip(steps, values)
            for key in ("train/error", "test/error")]
    return pd.DataFrame(rows)


def test_curve_degradation_counts_the_seeds_where_it_holds_after_the_first_drop() -> None:
    """Deepest plain above shallowest plain at every evaluation after the first lr drop (225): the
    points at 200 and 225 describe windows before the drop and do not count."""
    runs = _runs([("plain-20", 0, 20, 0), ("plain-56", 0, 30, 0), ("plain-20", 1, 20, 0), ("plain-56", 1, 30, 0)])
    runs["param_milestones"] = "[225, 265]"
    steps = [200, 225, 250, 300]
    held = _curves({("plain-20", 0): [30, 30, 25, 20], ("plain-56", 0): [20, 20, 35, 30],
                    ("plain-20", 1): [30, 30, 25, 20], ("plain-56", 1): [20, 40, 26, 21]}, steps)
    (line,) = findings.curve_degradation(runs, held)
    assert "in 2 of 2 seeds." in line and "iteration 225" in line
    broken = _curves({("plain-20", 0): [30, 30, 25, 20], ("plain-56", 0): [20, 20, 35, 30],
                      ("plain-20", 1): [30, 30, 25, 20], ("plain-56", 1): [40, 40, 25, 19]}, steps)
    (line,) = findings.curve_degradation(runs, broken)
    assert line.endswith("in 1 of 2 seeds (seed 1: not above at iterations 250, 300).")
    assert findings.curve_degradation(runs.assign(param_milestones=None), held) == []


def _fig6_runs(deep_plain: list[float]) -> pd.DataFrame:
    """plain/ResNet 8 and 32, three seeds, the default CPU scale's params; plain-32's training errors given."""
    rows = []
    for seed in range(3):
        rows += [("plain-8", seed, 10.0 + seed, 12.0), ("resnet-8", seed, 10.5 + seed, 12.0),
                 ("resnet-32", seed, 9.0 + seed, 11.0), ("plain-32", seed, deep_plain[seed], 20.0)]
    return _runs(rows).assign(param_dataset="fashion-mnist", param_iterations="350", param_batch_size="32",
                              param_train_size="10000", param_test_size="1000", param_val_size="0", param_lr="0.05",
                              param_momentum="0.9", param_weight_decay="0.0001", param_lr_decay="0.1",
                              param_milestones="[260, 310]", param_augment="True", shortcut="A")


def test_cpu_banner_lists_every_departure_and_says_what_the_summary_says() -> None:
    runs = _fig6_runs([20.0, 22.0, 23.0])  # plain-32 above plain-8 and ResNet-32 in every seed
    assert findings.scale_banner(runs, "full") is None
    banner = findings.scale_banner(runs, "cpu")
    assert banner.departures == [
        "Data: Fashion-MNIST (1×28×28), not CIFAR-10 (3×32×32).",
        "Training set: a fixed 10,000-image subset, not 45,000 images.",
        "Validation split: none, not 5,000 images held out of training.",
        "Test error on a fixed 1,000-image subset of the test set (the same images for every run), not all 10,000 images.",
        "Length: 350 iterations (1.12 passes over the training set), not 64,000 (about 182 passes).",
        "Batch size 32, not 128.",
        "Learning rate 0.05, not 0.1.",
        "lr drops at iterations 260 (74 %) and 310 (89 %), not at 32,000 (50 %) and 48,000 (75 %) of training.",
        "Depths 8 and 32, not 20, 32, 44, 56 and 110."]
    assert "in 9 ways" in banner.intro
    assert banner.verdict == ("All 3 of He et al. Fig. 6's training facts hold for plain-8, plain-32, ResNet-8 and "
                              "ResNet-32 in these runs.")
    assert banner.verdict in findings.summarize(runs, pd.DataFrame(), pd.DataFrame())
    # plain-32 no longer clearly above ResNet-32 (seed 1 below it): the banner names the failing fact, as the
    # summary does, and gives no advice the summary contradicts (issue 24, item 8)
    mixed = _fig6_runs([20.0, 9.5, 23.0])
    banner = findings.scale_banner(mixed, "cpu")
    summary = findings.summarize(mixed, pd.DataFrame(), pd.DataFrame())
    assert banner.verdict == ("He et al. Fig. 6's training facts for plain-8, plain-32, ResNet-8 and ResNet-32: "
                              "degradation and shortcut do not hold; deep ResNet holds (see the Summary).")
    assert banner.verdict in summary
    shortcut = next(s for s in summary if s.startswith("He et al. Fig. 6 in every seed (shortcut)"))
    assert "is above ResNet-32's in 2 of 3 seeds" in shortcut and "not above in seed 1" in shortcut
    assert "compare plain and residual at the same depth" not in " ".join([banner.intro, *banner.departures,
                                                                           banner.verdict])


def test_fig6_checks_say_per_seed_which_fact_fails() -> None:
    holds = findings.fig6_checks(_fig6_runs([20.0, 22.0, 23.0]))
    assert [c.name for c in holds] == ["degradation", "shortcut", "deep ResNet"] and all(c.holds for c in holds)
    deg = holds[0].sentence
    assert deg.startswith("plain-32's final training error is above plain-8's in 3 of 3 seeds (seed 0: 20.0 % vs "
                          "10.0 %; seed 1: 22.0 % vs 11.0 %; seed 2: 23.0 % vs 12.0 %); difference +10.7 points (95 % CI ")
    assert deg.endswith(": holds.")
    assert holds[2].sentence.startswith("ResNet-32's final training error is at most about ResNet-8's")
    # a deep ResNet clearly worse than the shallow one: the third fact fails, and says so
    worse = _fig6_runs([20.0, 22.0, 23.0])
    worse.loc[worse["model"] == "resnet-32", "train_error"] = [15.0, 16.2, 17.1]
    (*_, deep_res) = findings.fig6_checks(worse)
    assert deep_res.holds is False and deep_res.sentence.endswith("does not hold, it is clearly above.")
    assert findings.fig6_checks(_runs([("plain-8", 0, 1.0, 1.0), ("resnet-8", 0, 1.0, 1.0)])) == []


def test_one_seed_is_said_once_not_in_every_sentence() -> None:
    single = _runs([("plain-20", 0, 2.3, 8.0), ("plain-56", 0, 4.1, 9.0), ("resnet-56", 0, 1.0, 7.0)])
    empty = pd.DataFrame()
    lines = findings.summarize(single, empty, empty)
    assert lines[0].startswith("Every net was trained with one seed")
    assert not any("spread" in line for line in lines[1:])
    assert all("(one seed, no interval;" in line for line in lines[1:])  # issue 13: each difference says so
    mixed = _runs([("plain-56", 0, 4.0, 10.0), ("plain-56", 1, 4.4, 10.4), ("resnet-56", 0, 1.0, 7.0)])
    lines = findings.summarize(mixed, empty, empty)
    assert not lines[0].startswith("Every net")
    assert "(one seed, no interval;" in lines[0]  # paired by seed: only seed 0 has both nets
    # one seed on both sides of a comparison, but not everywhere: the sentence itself says so
    lines = findings.summarize(_runs([("plain-20", 0, 2.3, 8.0), ("plain-56", 0, 4.1, 9.0), ("resnet-56", 0, 1.0, 7.0),
                                      ("resnet-56", 1, 1.2, 7.1)]), empty, empty)
    assert lines[0].startswith("plain-56 trains worse than plain-20") and "one seed, no interval" in lines[0]


def test_gradient_flow_finding_flips() -> None:
    def flow(first_plain: float, first_res: float) -> pd.DataFrame:
        rows = []
        for rid, model, first in (("p", "plain-56", first_plain), ("r", "resnet-56", first_res)):
            for it in (0, 100):
                rows += [{"run_id": rid, "model": model, "arch": "plain" if rid == "p" else "residual", "depth": 56,
                          "seed": 0, "iteration": it, "layer": "stage1.block0", "layer_index": 0, "value": first},
                         {"run_id": rid, "model": model, "arch": "plain" if rid == "p" else "residual", "depth": 56,
                          "seed": 0, "iteration": it, "layer": "head/input", "layer_index": 27, "value": 1.0}]
        return pd.DataFrame(rows)

    (s,) = findings.gradient_flow_findings(findings.flow_ratios(flow(30.0, 2.0)))
    assert "it grows 30.0× in plain-56 and grows 2.00× in ResNet-56" in s
    assert s.endswith("closer to 1 (the gradient reaches the input more evenly) in ResNet-56 at init and at the end "
                      "of training.")
    (s,) = findings.gradient_flow_findings(findings.flow_ratios(flow(1.5, 0.1)))
    assert "grows 1.50× in plain-56 and shrinks to 0.100× in ResNet-56" in s
    assert s.endswith("in plain-56 at init and at the end of training.")

    def flow_moving(init: tuple[float, float], end: tuple[float, float]) -> pd.DataFrame:
        df = flow(1.0, 1.0)
        for (it, rid), v in {(0, "p"): init[0], (0, "r"): init[1], (100, "p"): end[0], (100, "r"): end[1]}.items():
            df.loc[(df["iteration"] == it) & (df["run_id"] == rid) & (df["layer_index"] == 0), "value"] = v
        return df

    (s,) = findings.gradient_flow_findings(findings.flow_ratios(flow_moving((7770.4, 39.2), (0.85, 1.23))))
    assert "grows 7,770× in plain-56 and grows 39.2× in ResNet-56" in s
    assert s.endswith("more evenly) at init in ResNet-56, but at the end of training in plain-56.")


def test_weight_gradient_finding_follows_the_ratio() -> None:
    def series(first_plain: float) -> pd.DataFrame:
        rows = []
        for rid, arch, first in (("p", "plain", first_plain), ("r", "residual", 0.8)):
            model = f"{'plain' if arch == 'plain' else 'resnet'}-20"
            for it in (0, 50, 100):
                for layer, idx, value in (("stem.conv", 0, first), ("stage3.block2.conv2", 18, 1.0), ("fc", 19, 9.0)):
                    rows.append({"run_id": rid, "model": model, "arch": arch, "depth": 20, "seed": 0, "iteration": it,
                                 "layer": layer, "layer_index": idx, "group": "weight", "value": value})
        return pd.DataFrame(rows)

    (s,) = findings.weight_grad_findings(findings.weight_grad_ratios(series(0.5)))
    assert "is 0.500× in plain-20 and 0.800× in ResNet-20" in s and "does not vanish" in s
    (s,) = findings.weight_grad_findings(findings.weight_grad_ratios(series(0.01)))
    assert "is 0.0100× in plain-20" in s and "weight gradients do shrink towards the input" in s


def test_partial_study_still_draws_figures_with_a_note(study, tmp_path: Path) -> None:
    plain_only = study.select(lambda r: r["arch"] == "plain")
    rep = build_report(plain_only, tmp_path / "partial")
    assert all(f.made for f in rep.figures)
    assert any("no ResNet runs" in n for n in rep.notes)
    assert any("plain-14 has no ResNet counterpart" in n for n in rep.notes)
    assert "## Notes" in rep.markdown.read_text()


def _empty_study(uri: str) -> str:
    """Experiment ``analysis_empty``: a study parent run and no training runs."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("analysis_empty")
    if exp is not None:
        return exp.experiment_id
    exp_id = client.create_experiment("analysis_empty")
    client.create_run(exp_id, run_name="analysis_empty", tags={"kind": "study", "study": "analysis_empty"})
    return exp_id


def test_no_runs_and_missing_experiment_are_user_errors(store: dict) -> None:
    _empty_study(store["uri"])
    with pytest.raises(UserError, match=r"no training runs in experiment 'analysis_empty' in tracking store sqlite:///") as e:
        load_study("analysis_empty", store["uri"])
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"no MLflow experiment 'nope' in tracking store sqlite:///.*analysis_study"):
        write_report("nope", tracking_uri=store["uri"], log_to_mlflow=False)


def test_cli_no_runs_exits_2_with_one_line_and_writes_nothing(store: dict, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from resnet_lab.cli import main

    client = MlflowClient(store["uri"])
    exp_id = _empty_study(store["uri"])
    n_runs = len(client.search_runs([exp_id]))
    out = tmp_path / "out"
    assert main(["report", "analysis_empty", "--tracking-uri", store["uri"], "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("resnet-lab: error: no training runs in experiment 'analysis_empty'") and err.count("\n") == 1
    assert not out.exists() and len(client.search_runs([exp_id])) == n_runs
    # a store that does not exist is not created by asking for its report
    missing = tmp_path / "nowhere" / "mlflow.db"
    assert main(["report", STUDY, "--tracking-uri", f"sqlite:///{missing}", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("resnet-lab: error: no MLflow tracking store at sqlite:///") and err.count("\n") == 1
    assert not missing.parent.exists() and not out.exists()
    # an --out that cannot be a folder (below a regular file)
    (tmp_path / "a-file").write_text("")
    assert main(["report", STUDY, "--tracking-uri", store["uri"], "--out", str(tmp_path / "a-file" / "o")]) == 2
    err = capsys.readouterr().err
    assert f"cannot create the report folder {tmp_path / 'a-file' / 'o' / STUDY}" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_cli_report_command(store: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("analysis.document.FIGURES", {})  # drawn and checked above; skip the time
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    toml = tmp_path / f"{STUDY}.toml"
    toml.write_text("")
    args = parser.parse_args(["report", str(toml), "--tracking-uri", store["uri"], "--out", str(tmp_path / "o"),
                              "--no-mlflow"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == str(tmp_path / "o" / STUDY / "report.md") and Path(printed).is_file()
    assert parser.parse_args(["report"]).study == "fashion_mnist"
    assert study_name("cifar10_paper") == "cifar10_paper"
    named = tmp_path / "some_file.toml"
    named.write_text('name = "cifar10_paper"\n')
    assert study_name(str(named)) == "cifar10_paper"  # the file's name key, as the study runner uses it
    with pytest.raises(UserError, match="not found"):
        study_name(str(tmp_path / "missing.toml"))


# --------------------------------------------------------------------------- issue 24/25/27: links, plateau, errors


def _fake_study(runs: pd.DataFrame, uri: str = "sqlite:////tmp/none/mlflow.db", **kw) -> "Study":
    from analysis.runs import Study

    empty = pd.DataFrame()
    return Study(name="fake", tracking_uri=uri, experiment_id="7", parent=None, runs=runs, curves=empty,
                 grad_norms=empty, grad_norm_series=empty, grad_flow=empty, responses=empty, **kw)


def test_every_sentence_links_to_its_runs_and_names_a_net_off_its_plateau() -> None:
    from analysis.document import annotate, ui_base

    runs = _fig6_runs([20.0, 22.0, 23.0]).assign(plateau=1.0)
    runs.loc[(runs["model"] == "plain-32") & runs["seed"].isin([1, 2]), "plateau"] = 0.0
    study = _fake_study(runs)
    assert ui_base("sqlite:////tmp/x/mlflow.db") == "http://127.0.0.1:5000"  # a local store: `resnet-lab ui`'s address
    assert ui_base("http://user:pw@host:5001/") == "http://host:5001" and ui_base("databricks") is None
    summary = findings.summarize(runs, pd.DataFrame(), pd.DataFrame())
    linked = annotate(summary, study)
    for s in linked:  # every sentence names nets, so every one links to their runs
        assert " runs](http://127.0.0.1:5000/#/compare-runs?runs=%5B%22" in s and s.endswith("%5D))."), s
    deg = next(s for s in linked if "(degradation)" in s)
    ids = runs.loc[runs["model"].isin(["plain-32", "plain-8"]), "run_id"]
    assert "the 6 runs" in deg and all(f"%22{rid}%22" in deg for rid in ids)
    # plain-32 did not reach its plateau in seeds 1 and 2: said at its first mention in every sentence using it
    for s in linked[1:]:  # (the plateau sentence itself says it seed by seed)
        if "plain-32" in s:
            assert re.search(r"plain-32('s)? \(not at its plateau in seeds 1, 2\)", s) and s.count("not at its plateau") == 1, s
    (plateau,) = findings.plateau_findings(runs)
    assert plateau.endswith("reached in 10 of 12 runs (plain-8 reached in seeds 0, 1, 2; ResNet-8 reached in seeds "
                            "0, 1, 2; ResNet-32 reached in seeds 0, 1, 2; plain-32 reached in seed 0, not reached in "
                            "seeds 1, 2).")
    # a store the UI cannot show: sentences stay as they are, no dead links
    bare = annotate(summary, _fake_study(runs, uri="databricks"))
    assert not any("](http" in s for s in bare) and [_unlabelled(s) for s in bare] == summary


def test_results_csv_columns_say_why_a_cell_is_empty() -> None:
    from analysis.tables import results_frame, summary_frame

    runs = _runs([("plain-8", 0, 10.0, 12.0), ("plain-8", 1, 11.0, 12.5), ("resnet-8", 0, 9.0, 11.0)]).assign(
        val_error=math.nan, duration_s=[61.234, 75.0, 59.9], plateau=[1.0, 0.0, math.nan], scale="cpu",
        shortcut=["none", "none", "A"], diag_lesion_x=[1.5, math.nan, math.nan])
    lesion = pd.DataFrame({"run_id": ["r0"], "x": [1.0]})
    study = _fake_study(runs, diagnostics={"lesion": lesion, "landscape": lesion, "curvature": lesion,
                                           "shattering": lesion})
    res = results_frame(study)
    assert "val_error" not in res  # empty in every row
    assert list(res["minutes"]) == [1.02, 1.25, 1.0]
    assert list(res["plateau"][:2]) == ["reached", "not reached"] and res["plateau"][2].startswith("not measured (")
    assert list(res["diagnosed"]) == [
        "lesion, landscape, curvature, shattering",
        "no: diagnosed on other seeds of this net only (the study's diagnostics 'seeds' setting, or 'resnet-lab "
        "diagnose STUDY_FILE' not run to the end)",
        "no: not run (run 'resnet-lab diagnose STUDY_FILE')"]
    assert res["diag_lesion_x"].isna().tolist() == [False, True, True]
    summary = summary_frame(study).set_index("net")
    assert summary.loc["plain-8", "plateau_reached"] == "1 of 2" and summary.loc["resnet-8", "plateau_reached"] == "not measured"
    assert "train_error_sd" in summary  # plain-8 has two seeds
    assert "diag_lesion_x_sd" not in summary and "diag_lesion_x_mean" in summary  # one value per net: no sd column
    assert not summary.isna().all().any()


def test_draw_degradation_marks_the_lr_drops_by_itself(study) -> None:
    from matplotlib.lines import Line2D

    from analysis.figures import draw_degradation, lr_drops

    def drops(fig) -> set[float]:
        return {ln.get_xdata()[0] for ln in fig.axes[0].get_lines()
                if isinstance(ln, Line2D) and ln.get_linestyle() == ":" and len(set(ln.get_xdata())) == 1}

    its = 20
    default = [int(its * 0.5), int(its * 0.75)]  # the runs' milestones: 50 % and 75 % of the run
    c = study.curves[study.curves["depth"] == 8]
    assert lr_drops(c) == (default, 0.1)  # the schedule rides along with the frame
    assert drops(draw_degradation(c)) == set(default)
    bare = c.copy()
    bare.attrs = {}  # a frame without the attached schedule: read off its lr curve (logged every 10 iterations)
    assert lr_drops(bare)[0] == [20]
    assert drops(draw_degradation(bare, milestones=[])) == set()


def test_diagnostics_drawers_import_from_analysis_figures() -> None:
    from analysis import diag_figures
    from analysis.figures import draw_curvature, draw_landscape, draw_lesion, draw_shattering

    assert (draw_lesion, draw_landscape, draw_curvature, draw_shattering) == (
        diag_figures.draw_lesion, diag_figures.draw_landscape, diag_figures.draw_curvature, diag_figures.draw_shattering)


def test_a_damaged_probe_file_names_the_run_and_the_report_is_written(store: dict, study, tmp_path: Path) -> None:
    """Issue 25, 4.1: grad_norms.parquet cut to half its size costs that run's gradient-norm figures, not the report."""
    rid = store["runs"][("plain-14", 0)]
    art = Path(MlflowClient(store["uri"]).get_run(rid).info.artifact_uri.removeprefix("file://")) / "probes"
    path = art / "grad_norms.parquet"
    whole = path.read_bytes()
    try:
        path.write_bytes(whole[: len(whole) // 2])
        md = write_report(STUDY, tracking_uri=store["uri"], out_dir=tmp_path, log_to_mlflow=False)
        text = md.read_text()
        assert f"could not read probes/grad_norms.parquet of run plain-14-s0 ({rid[:8]})" in text
        assert (md.parent / "report.html").is_file() and (md.parent / "figures" / "degradation.png").is_file()
        again = load_study(STUDY, store["uri"])
        assert rid not in set(again.grad_norms["run_id"]) and rid in set(again.grad_flow["run_id"])
    finally:
        path.write_bytes(whole)


def test_report_scale_unknown_or_without_runs_is_one_line(store: dict, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 25, 4.3: `--scale gpu` is refused as `diagnose` refuses it; `--scale full` on a store with only
    CPU-scale runs says which scales the store holds. From Python, the message names the argument."""
    from resnet_lab.cli import main

    out = tmp_path / "o"
    assert main(["report", STUDY, "--tracking-uri", store["uri"], "--out", str(out), "--scale", "gpu"]) == 2
    err = capsys.readouterr().err
    assert err == "resnet-lab: error: --scale must be cpu or full, got 'gpu'\n"
    assert main(["report", STUDY, "--tracking-uri", store["uri"], "--out", str(out), "--scale", "full"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"resnet-lab: error: no full-scale training runs in experiment '{STUDY}'") and \
        err.count("\n") == 1
    assert "it holds cpu-scale runs (5): pass --scale cpu, or run the study at full scale first" in err
    assert not out.exists()
    with pytest.raises(UserError, match=r"^`scale` must be cpu or full, got 'gpu'$"):
        write_report(STUDY, tracking_uri=store["uri"], out_dir=out, scale="gpu")
    with pytest.raises(UserError, match="pass `tracking_uri`") as e:
        load_study(STUDY, f"sqlite:///{tmp_path / 'none.db'}")
    assert "--tracking-uri" not in str(e.value)


def test_report_header_names_the_ui_address_and_the_parent_links_the_report(store: dict, report: Path) -> None:
    text = report.read_text()
    assert "Links to runs open the MLflow UI at http://127.0.0.1:5000" in text
    rid = store["runs"][("plain-8", 0)]
    assert f"[plain-8-s0](http://127.0.0.1:5000/#/experiments/" in text and f"/runs/{rid}?workflowType" in text
    note = MlflowClient(store["uri"]).get_run(store["parent"]).data.tags["mlflow.note.content"]
    assert note.endswith(f"/runs/{store['parent']}/artifacts/report/report.html).")
    assert "](http://127.0.0.1:5000/#/compare-runs?runs=" in note  # the summary sentences, linked
