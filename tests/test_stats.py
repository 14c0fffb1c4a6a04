"""Every finding against its noise: paired t intervals, the sentences built on them, the seed
bands in the figures and the tables to paste.

The numeric claims are checked against hand computations on given numbers; the figures and
tables against a small real MLflow store (plain-8 and resnet-8, three seeds each, synthetic
data, 20 iterations), built once for the module.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.collections import LineCollection, PathCollection, PolyCollection
from mlflow import MlflowClient

from analysis import findings, stats
from analysis.anchors import Anchor
from analysis.numbers import pm
from analysis.figures import draw_degradation, draw_error_vs_depth, draw_grad_flow, draw_layer_responses
from analysis.report import write_report
from analysis.runs import load_study
from analysis.tables import latex_table, results_frame
from resnet_lab.config import TrainConfig
from resnet_lab.train import train

STUDY = "stats_study"
NETS = ["plain-8", "resnet-8"]
SEEDS = [0, 1, 2]
T_975 = {1: 12.706204736174698, 2: 4.302652729749464}  # t_{0.975} quantile for 1 and 2 df (printed t tables)


def _runs(rows: list[tuple[str, int, float, float]]) -> pd.DataFrame:
    """A runs frame (as ``load_study`` gives) from (model, seed, train_error, test_error)."""
    return pd.DataFrame([{"run_id": f"r{i}", "run_name": f"{m}-s{s}", "model": m,
                          "arch": "plain" if m.startswith("plain") else "residual", "depth": int(m.split("-")[1]),
                          "seed": s, "train_error": tr, "test_error": te} for i, (m, s, tr, te) in enumerate(rows)])


# --------------------------------------------------------------------------- statistics on given numbers


def test_t_interval_equals_a_hand_computation() -> None:
    d = [4.0, 4.5, 3.8]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)  # sample sd, n - 1 in the denominator
    half = T_975[2] * sd / math.sqrt(3)
    got = stats.t_interval(d)
    assert (got.mean, got.sd, got.n) == (pytest.approx(mean), pytest.approx(sd), 3)
    assert (got.low, got.high) == (pytest.approx(mean - half), pytest.approx(mean + half))
    two = stats.t_interval([1.0, 2.0])  # sd 0.7071, half = 12.706 * 0.7071 / 1.4142 = 6.353
    assert (two.low, two.high) == (pytest.approx(1.5 - T_975[1] / 2), pytest.approx(1.5 + T_975[1] / 2))
    one = stats.t_interval([3.0])
    assert one.n == 1 and one.mean == 3.0 and not one.has_interval and not one.clear
    assert stats.t_interval([1.0, float("nan"), 2.0]).n == 2  # a missing number is not a zero


def test_paired_differences_match_by_seed() -> None:
    runs = _runs([("plain-20", 0, 2.0, 8.0), ("plain-20", 1, 2.5, 8.1), ("plain-20", 2, 9.0, 9.0),
                  ("plain-56", 1, 4.0, 9.0), ("plain-56", 2, 9.9, 9.5), ("plain-56", 3, 5.0, 9.9),
                  ("resnet-20", 0, 1.0, 7.0), ("resnet-20", 1, 1.4, 7.1), ("resnet-20", 2, 1.1, 7.3)])
    p = stats.paired(runs, "plain-56", "plain-20", "train_error")
    assert p.seeds == (1, 2) and p.diff.n == 2  # seed 0 and seed 3 have no partner
    assert p.diff.mean == pytest.approx(((4.0 - 2.5) + (9.9 - 9.0)) / 2)
    assert (p.a_mean, p.b_mean) == (pytest.approx(6.95), pytest.approx(5.75))
    table = stats.paired_differences(runs, ["train_error"])
    assert [(k, a, b) for k, a, b in table[["kind", "a", "b"]].itertuples(index=False)] == [
        ("plain-resnet", "plain-20", "resnet-20"), ("deep-shallow", "plain-56", "plain-20")]
    row = table.iloc[0]
    diffs = np.array([2.0 - 1.0, 2.5 - 1.4, 9.0 - 1.1])
    half = T_975[2] * diffs.std(ddof=1) / math.sqrt(3)
    assert (row["n"], row["low"], row["high"]) == (3, pytest.approx(diffs.mean() - half), pytest.approx(diffs.mean() + half))
    assert stats.paired(runs, "plain-56", "resnet-20", "train_error").seeds == (1, 2)
    assert stats.paired(runs.assign(seed=[0, 1, 2, 5, 6, 7, 0, 1, 2]), "plain-56", "plain-20", "train_error") is None


def test_per_net_mean_sd_n_of_any_number() -> None:
    runs = _runs([("plain-20", s, 2.0 + s, 8.0) for s in range(3)] + [("resnet-20", 0, 1.0, 7.0)])
    runs["diag_anything"] = [0.5, 1.5, 4.0, 2.0]
    nets = stats.per_net(runs).set_index("model")
    assert stats.numbers_of(runs) == ["train_error", "test_error", "diag_anything"]
    assert (nets.loc["plain-20", "train_error_mean"], nets.loc["plain-20", "train_error_sd"]) == (3.0, 1.0)
    assert nets.loc["plain-20", "diag_anything_sd"] == pytest.approx(np.std([0.5, 1.5, 4.0], ddof=1))
    assert nets.loc["resnet-20", "diag_anything_n"] == 1 and math.isnan(nets.loc["resnet-20", "diag_anything_sd"])


def test_the_ci_sentence_is_right_and_flips_with_the_data() -> None:
    # plain-56 minus plain-20 per seed: 4.0, 4.5, 3.8 (the interval of the hand computation above)
    base = [("plain-20", 0, 2.0, 8.0), ("plain-20", 1, 2.5, 8.2), ("plain-20", 2, 2.2, 8.1)]
    deg = base + [("plain-56", 0, 6.0, 9.0), ("plain-56", 1, 7.0, 9.0), ("plain-56", 2, 6.0, 9.3)]
    half = T_975[2] * np.std([4.0, 4.5, 3.8], ddof=1) / math.sqrt(3)
    (s,) = findings.depth_findings(_runs(deg))
    assert s.startswith(f"plain-56 trains worse than plain-20 by 4.10 points (95 % CI {4.1 - half:.2f} to "
                        f"{4.1 + half:.2f}, 3 seeds; training error 6.33 % vs 2.23 %)")
    assert "consistent with the degradation problem" in s
    # test errors 9.0 - 8.0, 9.0 - 8.2, 9.3 - 8.1: 1.0, 0.8, 1.2 -> clear, worse
    assert "; on the test set plain-56 is worse by 1.00 points (95 % CI " in s
    # the same means with seed-to-seed swings the interval cannot exclude 0 in: no direction
    noisy = base + [("plain-56", 0, 0.5, 9.0), ("plain-56", 1, 12.0, 9.0), ("plain-56", 2, 6.0, 9.3)]
    (s,) = findings.depth_findings(_runs(noisy))
    assert s.startswith("plain-56 and plain-20 show no clear difference in training error: +3.9 points (95 % CI -9.7 "
                        "to 17.6, 3 seeds")  # one number of decimals for the difference and its interval
    assert "worse" not in s.split(";")[0] and "degradation" not in s
    better = base + [("plain-56", 0, 1.0, 9.0), ("plain-56", 1, 1.4, 9.0), ("plain-56", 2, 1.1, 9.3)]
    (s,) = findings.depth_findings(_runs(better))
    # per seed -1.0, -1.1, -1.1: "better by" 1.07 with the interval from the same side, both ends positive
    assert s.startswith("plain-56 trains better than plain-20 by 1.07 points (95 % CI 0.92 to 1.21, 3 seeds; "
                        "training error 1.17 % vs 2.23 %)") and "no degradation" in s
    one = [("plain-20", 0, 2.0, 8.0), ("plain-56", 0, 6.0, 9.0)]
    (s,) = findings.depth_findings(_runs(one))
    assert s.startswith("plain-56 trains worse than plain-20 by 4.00 points (one seed, no interval; "
                        "training error 6.00 % vs 2.00 %)")
    # no "-0.00": a difference that rounds to zero is printed unsigned
    tiny = [("plain-20", 0, 2.0, 8.0), ("plain-56", 0, 2.0, 8.0001)]
    assert "-0.00" not in findings.depth_findings(_runs(tiny))[0]


def test_plain_minus_resnet_at_each_depth() -> None:
    runs = _runs([("resnet-56", 0, 1.0, 7.0), ("resnet-56", 1, 1.2, 7.2), ("plain-56", 0, 4.0, 10.0),
                  ("plain-56", 1, 4.4, 10.3)])
    (s,) = findings.residual_vs_plain(runs)
    half = T_975[1] * np.std([3.0, 3.2], ddof=1) / math.sqrt(2)
    assert s.startswith(f"At depth 56, plain-56 trains worse than ResNet-56 by 3.10 points (95 % CI "
                        f"{3.1 - half:.2f} to {3.1 + half:.2f}, 2 seeds; training error 4.20 % vs 1.10 %)")
    assert "; on the test set plain-56 is worse by 3.05 points" in s


def test_anchor_inside_or_outside_two_sd() -> None:
    anchor = Anchor(label="paper", source="a paper", test_error={"resnet-20": 8.75, "resnet-56": 6.97})
    runs = _runs([("resnet-20", s, 1.0, v) for s, v in enumerate([8.6, 8.9, 9.1])]
                 + [("resnet-56", s, 1.0, v) for s, v in enumerate([7.9, 8.0, 8.1])])
    (s,) = findings.anchor_findings(runs, anchor)
    sd20, sd56 = np.std([8.6, 8.9, 9.1], ddof=1), 0.1
    assert f"ResNet-20 test error 8.87 ± {sd20:.2f} % over 3 seeds vs 8.75 %: inside mean ± 2 sd" in s
    assert f"ResNet-56 test error 8.00 ± {sd56:.2f} % over 3 seeds vs 6.97 %: outside mean ± 2 sd (7.80 to 8.20)" in s
    (s,) = findings.anchor_findings(runs[runs["seed"] == 0], anchor)
    assert "ResNet-20 test error 8.60 % (one seed: no sd) vs 8.75 % (-0.15 points)" in s


# --------------------------------------------------------------------------- a real three-seed store


@pytest.fixture(scope="module")
def store(tracking_uri: str) -> dict:
    """plain-8 and resnet-8 with three seeds each, under a study parent run; every run also logs
    one ``diag/`` number (as a diagnostics module would) to check it reaches the tables."""
    client = MlflowClient(tracking_uri)
    exp_id = client.create_experiment(STUDY)
    pid = client.create_run(exp_id, run_name=STUDY, tags={"kind": "study", "study": STUDY, "scale": "cpu"}).info.run_id
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CI box is shared
    runs = {}
    try:
        for seed in SEEDS:
            for model in NETS:
                cfg = TrainConfig(model=model, dataset="synthetic", iterations=20, log_every=10, eval_every=10,
                                  eval_batch_size=256, batch_size=32, seed=seed, tracking_uri=tracking_uri,
                                  experiment=STUDY, progress=False, checkpoint_every=0)
                r = train(cfg, parent_run_id=pid, extra_tags={"kind": "train", "study": STUDY, "scale": "cpu"})
                assert r.status == "FINISHED"
                client.log_metric(r.run_id, "diag/example_ratio", 0.5 + seed + (model == "plain-8"))
                runs[(model, seed)] = r.run_id
    finally:
        torch.set_num_threads(threads)
    client.set_terminated(pid, "FINISHED")
    return {"uri": tracking_uri, "parent": pid, "runs": runs}


@pytest.fixture(scope="module")
def study(store: dict):
    return load_study(STUDY, store["uri"])


@pytest.fixture(scope="module")
def report(store: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_report(STUDY, tracking_uri=store["uri"], out_dir=tmp_path_factory.mktemp("reports"))


def _band_limits(coll: PolyCollection) -> dict[float, tuple[float, float]]:
    """x -> (lowest, highest) y of a fill_between band's outline."""
    v = coll.get_paths()[0].vertices
    out: dict[float, list[float]] = {}
    for x, y in v:
        out.setdefault(round(float(x), 6), []).append(float(y))
    return {x: (min(ys), max(ys)) for x, ys in out.items()}


def _mean_sd(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    return df.groupby(by)["value"].agg(mean="mean", sd=lambda v: v.std(ddof=1), n="count").reset_index()


def _assert_band(ax, want: pd.DataFrame, x: str, index: int = 0) -> None:
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    got = _band_limits(bands[index])
    for row in want.itertuples():
        lo, hi = got[round(float(getattr(row, x)), 6)]
        assert (lo, hi) == (pytest.approx(row.mean - row.sd), pytest.approx(row.mean + row.sd)), row


def test_degradation_band_is_mean_plus_minus_sd_over_seeds(study) -> None:
    fig = draw_degradation(study.curves)
    want = _mean_sd(study.curves[study.curves["metric"] == "test/error"], ["model", "iteration"])
    assert set(want["n"]) == {3}
    for ax, model in zip(fig.axes[:2], NETS):  # plain panel, then ResNet panel: train band, then test band
        _assert_band(ax, want[want["model"] == model], "iteration", index=1)
        line = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-" and len(ln.get_xdata()) > 1][0]
        assert list(line.get_ydata()) == pytest.approx(list(want.loc[want["model"] == model, "mean"]))


def test_error_vs_depth_bars_are_sd_and_seeds_are_points(study) -> None:
    fig = draw_error_vs_depth(study.runs)
    ax = fig.axes[1]  # test error
    for arch, model in zip(("plain", "residual"), NETS):
        vals = study.runs.loc[study.runs["model"] == model, "test_error"]
        mean, sd = vals.mean(), vals.std(ddof=1)
        segs = [s for c in ax.collections if isinstance(c, LineCollection) for s in c.get_segments()]
        assert any(s[0][1] == pytest.approx(mean - sd) and s[1][1] == pytest.approx(mean + sd) for s in segs), model
        points = [c.get_offsets()[:, 1] for c in ax.collections if isinstance(c, PathCollection)]
        assert any(sorted(p) == pytest.approx(sorted(vals)) for p in points), model


def test_probe_figures_draw_bands_over_seeds(study) -> None:
    fig = draw_grad_flow(study.grad_flow)
    init = study.grad_flow[study.grad_flow["iteration"] == 0]
    want = _mean_sd(init, ["model", "layer_index"])
    for i, model in enumerate(NETS):  # init row; plain band first, then ResNet's
        _assert_band(fig.axes[0], want[want["model"] == model], "layer_index", index=i)
    fig = draw_layer_responses(study.responses)
    end = study.responses[study.responses["iteration"] == study.responses["iteration"].max()]
    want = _mean_sd(end, ["model", "layer_index"])
    _assert_band(fig.axes[0], want[want["model"] == "resnet-8"], "layer_index", index=1)


def test_every_figure_says_its_spread(report: Path) -> None:
    text = report.read_text()
    assert text.count("mean over 3 seeds per net") >= 4
    assert "error bars: ±1 sample standard deviation over seeds; small points: the individual seeds" in text


def test_results_csv_equals_the_runs_metrics(store: dict, report: Path) -> None:
    client = MlflowClient(store["uri"])
    res = pd.read_csv(report.parent / "results.csv")
    # val_error is left out: no run has a validation split, and a column without a value says nothing
    assert list(res.columns[:14]) == ["study", "scale", "net", "arch", "depth", "shortcut", "seed", "train_error",
                                      "test_error", "plateau", "iterations", "minutes", "run_id", "diagnosed"]
    assert not res.isna().all().any()
    assert len(res) == 6 and sorted(zip(res["net"], res["seed"])) == sorted(store["runs"])
    for row in res.itertuples():
        run = client.get_run(row.run_id)
        m = run.data.metrics
        assert row.run_id == store["runs"][(row.net, row.seed)] and row.study == STUDY and row.scale == "cpu"
        assert (row.train_error, row.test_error, row.diag_example_ratio) == \
            (m["train/error"], m["test/error"], m["diag/example_ratio"])
        assert row.iterations == 20 and row.shortcut == run.data.tags["shortcut"]
        assert row.minutes == round((run.info.end_time - run.info.start_time) / 60000, 2)
        assert row.plateau == {1.0: "reached", 0.0: "not reached"}[m["final/plateau"]]
        assert row.diagnosed == "no: not run (run 'resnet-lab diagnose STUDY_FILE')"
    summary = pd.read_csv(report.parent / "summary.csv").set_index("net")
    for model in NETS:
        vals = res.loc[res["net"] == model, "test_error"]
        assert summary.loc[model, "test_error_mean"] == pytest.approx(vals.mean())
        assert summary.loc[model, "test_error_sd"] == pytest.approx(vals.std(ddof=1))
        assert summary.loc[model, "test_error_n"] == 3 and summary.loc[model, "n_runs"] == 3
        assert summary.loc[model, "diag_example_ratio_mean"] == pytest.approx(res.loc[vals.index, "diag_example_ratio"].mean())


def test_tables_are_logged_with_the_report(store: dict, report: Path) -> None:
    names = {a.path for a in MlflowClient(store["uri"]).list_artifacts(store["parent"], "report")}
    assert {"report/results.csv", "report/summary.csv", "report/table.tex"} <= names


def _check_latex_structure(tex: str) -> list[list[str]]:
    """The table's rows as cells, after checking what LaTeX would reject: balanced environments and
    braces, every row as many cells as the column spec, booktabs rules in order."""
    assert tex.count("\\begin{table}") == tex.count("\\end{table}") == 1
    assert tex.count("\\begin{tabular}") == tex.count("\\end{tabular}") == 1
    unescaped = re.sub(r"\\[{}%&$_#]", "", tex)
    body = "\n".join(line.split("%")[0] for line in unescaped.splitlines())  # comments out
    assert body.count("{") == body.count("}") and body.count("$") % 2 == 0
    spec = re.search(r"\\begin\{tabular\}\{([lrc]+)\}", tex).group(1)
    rules = [m.group(1) for m in re.finditer(r"\\(toprule|midrule|bottomrule)", tex)]
    assert rules[0] == "toprule" and rules[-1] == "bottomrule" and "midrule" in rules
    rows = []
    for line in tex.split("\\toprule")[1].split("\\bottomrule")[0].splitlines():
        line = line.strip()
        if line and not line.startswith("\\midrule"):
            assert line.endswith(r"\\"), line
            cells = [c.strip() for c in re.split(r"(?<!\\)&", line[:-2])]
            assert len(cells) == len(spec), line
            rows.append(cells)
    return rows


def test_latex_table_parses_and_compiles(study, report: Path, tmp_path: Path) -> None:
    tex = (report.parent / "table.tex").read_text()
    rows = _check_latex_structure(tex)
    assert rows[0][:4] == ["Net", "$n$", r"Train error (\%)", r"Test error (\%)"]
    vals = study.runs.loc[study.runs["model"] == "resnet-8", "test_error"]
    assert rows[2][:2] == ["ResNet-8", "3"] and rows[2][3] == f"${pm(vals.mean(), vals.std(ddof=1), 3)}$".replace("±", "\\pm")
    anchor = Anchor(label="He et al. Table 6", source="He et al. (2016) Table 6 & 7, 100% honest_source",
                    test_error={"resnet-8": 9.9})
    with_anchor = latex_table(study, anchor)
    rows = _check_latex_structure(with_anchor)
    assert rows[0][-1] == r"He et al. Table 6 test error (\%)" and rows[2][-1] == "$9.90$" and rows[1][-1] == "--"
    if shutil.which("pdflatex") is None:
        return  # the structure above is what a compile would reject; compiled where LaTeX is installed
    doc = tmp_path / "doc.tex"
    (tmp_path / "table.tex").write_text(with_anchor)
    doc.write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n\\input{table.tex}\n"
                   "\\end{document}\n")
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and (tmp_path / "doc.pdf").stat().st_size > 1000, done.stdout[-2000:]


def test_results_frame_has_a_row_per_run_in_report_order(study) -> None:
    res = results_frame(study)
    assert list(res["net"]) == ["plain-8"] * 3 + ["resnet-8"] * 3 and list(res["seed"]) == SEEDS * 2


def test_report_sentences_use_the_paired_interval(study, report: Path) -> None:
    p = stats.paired(study.runs, "plain-8", "resnet-8", "train_error")
    text = report.read_text()
    assert p.diff.n == 3 and findings.interval_text(p.diff, flip=p.diff.clear and p.diff.mean < 0) in text
    assert "At depth 8, plain-8 " in text and "Every net was trained with one seed" not in text


def test_every_diagnostic_sentence_carries_the_seed_paired_interval() -> None:
    """Issue 27: with every seed diagnosed, the curvature's growth with depth and the shattering's fall
    carry a 3-seed interval of plain minus ResNet, paired by seed, and the verdict reads that interval."""
    from analysis import diag_findings
    from analysis.runs import SWEEP, Study

    rows = []
    for seed in SEEDS:
        for model, lam in (("plain-8", 10.0), ("plain-32", 40.0 + 5 * seed), ("resnet-8", 10.0), ("resnet-32", 12.0)):
            rows.append((model, seed, 1.0, 1.0, lam))
    runs = _runs([r[:4] for r in rows]).assign(diag_curvature_lambda_max=[r[4] for r in rows])
    out = diag_findings.curvature_findings(runs)
    growth = out[-1]
    # plain growth per seed 4.0, 4.5, 5.0; ResNet 1.2 each: differences 2.8, 3.3, 3.8
    half = T_975[2] * np.std([2.8, 3.3, 3.8], ddof=1) / math.sqrt(3)
    assert (f"growth ratio, plain minus ResNet seed by seed: +3.30 (95 % CI {3.3 - half:.2f} to {3.3 + half:.2f}, "
            "3 seeds): consistent with") in growth
    assert all("95 % CI" in s for s in out)  # the per-depth lambda_max sentences too
    sweep = pd.DataFrame([{"arch": arch, "depth": d, "seed": seed, "lag": 1,
                           "rho": 0.9 - (0.02 if arch == "residual" else 0.2 + 0.05 * seed) * (d > 8)}
                          for arch in ("plain", "residual") for d in (8, 32) for seed in SEEDS])
    empty = pd.DataFrame()
    study = Study(name="s", tracking_uri="sqlite:///x.db", experiment_id="1", parent=None, runs=runs, curves=empty,
                  grad_norms=empty, grad_norm_series=empty, grad_flow=empty, responses=empty,
                  diagnostics={SWEEP: sweep})
    (s,) = diag_findings.shattering_findings(study)
    # falls per seed: plain 0.20, 0.25, 0.30; ResNet 0.02: differences 0.18, 0.23, 0.28
    half = T_975[2] * np.std([0.18, 0.23, 0.28], ddof=1) / math.sqrt(3)
    assert f"fall, plain minus ResNet seed by seed: +0.230 (95 % CI {0.23 - half:.3f} to {0.23 + half:.3f}, 3 seeds)" in s
    assert s.endswith(f"consistent with {diag_findings.PUBLISHED['shattering']}.")
