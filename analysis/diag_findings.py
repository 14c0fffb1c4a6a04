"""Sentences for "Why the deep plain nets degrade": each diagnostic's numbers beside the published finding.

Each function reads the per-run ``diag_*`` columns of ``Study.runs`` (one value per run) or a
diagnostic's table, compares plain with ResNet (seed-paired, with a t interval where there are
several seeds: :mod:`analysis.stats`) and states whether the runs agree with the paper as the
issue words it, never assuming they do.
"""

from __future__ import annotations

import math

import pandas as pd

from .findings import interval_text
from .runs import SWEEP, Study, display_name
from .numbers import fmt
from .stats import Interval, mean_sd_n, paired, t_interval

NEAR_BASELINE_POINTS = 2.0  # a mean single-deletion increase below this many points counts as "near baseline"
PUBLISHED = {
    "lesion": "Veit et al. 2016, who found that deleting one block of a ResNet leaves the error near baseline "
              "except at downsampling blocks while a plain net collapses",
    "landscape": "Li et al. 2018, who found the 56-layer net without shortcuts to have a far sharper, more "
                 "chaotic landscape than ResNet-56",
    "curvature": "Yao et al. 2020 (PyHessian), who found that curvature grows with depth without shortcuts",
    "shattering": "Balduzzi et al. 2017, who found that gradient correlation decays much faster with depth "
                  "without shortcuts",
}


def _pairs(runs: pd.DataFrame, column: str) -> list[tuple[int, str, str]]:
    """(depth, plain model, resnet model) for every depth where both nets have ``column``."""
    if column not in runs:
        return []
    have = runs[runs[column].notna()]
    out = []
    for depth, g in have.groupby("depth"):
        p, r = g[g["arch"] == "plain"]["model"].unique(), g[g["arch"] != "plain"]["model"].unique()
        if len(p) and len(r):
            out.append((int(depth), p[0], r[0]))
    return out


def _num(x: float, like: tuple[float, ...] = ()) -> str:
    return fmt(x, like=like)


def _versus(runs: pd.DataFrame, column: str, a: str, b: str, unit: str = "") -> str:
    """'3.10 vs 0.40 (difference +2.70; 95 % CI ..., 3 seeds)' for nets a and b, seed-paired."""
    p = paired(runs, a, b, column)
    if p is None:
        return "n/a"
    d = p.diff
    return (f"{fmt(p.a_mean, like=(p.b_mean,))}{unit} vs {fmt(p.b_mean, like=(p.a_mean,))}{unit} (difference "
            f"{fmt(d.mean, like=(d.low, d.high), sign=True)}; {interval_text(d)})")


def _seed_interval(per_seed: pd.DataFrame) -> Interval:
    """The t interval over seeds of ``plain - residual`` in a frame with those two columns, one row a seed."""
    both = per_seed.dropna()
    return t_interval(both["plain"] - both["residual"]) if len(both) else t_interval([])


def _interval_clause(d: Interval, what: str) -> str:
    """'; plain minus ResNet, seed by seed: +2.9 (95 % CI 1.0 to 4.8, 3 seeds)'."""
    if d.n == 0:
        return ""
    return f"; {what}, plain minus ResNet seed by seed: {fmt(d.mean, like=(d.low, d.high), sign=True)} ({interval_text(d)})"


def _agrees(d: Interval, fallback: bool) -> bool:
    """The seed-paired plain-minus-ResNet difference is positive: with an interval, its lower end."""
    return d.low > 0 if d.has_interval else fallback


def _verdict(agree: bool | None) -> str:
    return {True: "consistent with", False: "unlike", None: "not comparable with"}[agree]


def _agree(p: object) -> bool | None:
    """A seed-paired plain-minus-ResNet difference points the paper's way: positive (with an interval
    excluding 0 where there is one); None without numbers."""
    if p is None or not math.isfinite(p.diff.mean):  # type: ignore[attr-defined]
        return None
    d = p.diff  # type: ignore[attr-defined]
    return d.low > 0 if d.has_interval else d.mean > 0


def lesion_findings(runs: pd.DataFrame, table: pd.DataFrame | None) -> list[str]:
    out = []
    col = "diag_lesion_single_mean_increase"
    for depth, plain, resnet in _pairs(runs, col):
        p = paired(runs, plain, resnet, col)
        worst = ""
        if table is not None:
            single = table[(table["model"] == resnet) & (table["kind"] == "single")]
            if len(single):
                top = single.groupby("block")["error"].mean().idxmax()
                worst = f"; ResNet-{depth}'s worst single deletion is {top}" + \
                        (" (a downsampling block, stage entry)" if top.endswith("block0") and "stage1" not in top else "")
        na = 0 if table is None else table[(table["model"] == plain) & (table["kind"] == "not_applicable")]["block"].nunique()
        near = p is not None and p.b_mean < NEAR_BASELINE_POINTS
        verdict = _verdict(_agree(p) and near if _agree(p) is not None else None)
        out.append(f"Deleting one block raises the test error on average by {_versus(runs, col, plain, resnet, ' points')}"
                   f" for {display_name(plain)} vs {display_name(resnet)} ({na} plain blocks change shape and cannot "
                   f"be deleted){worst}; the ResNet's error {'stays' if near else 'does not stay'} near baseline "
                   f"(mean increase {'below' if near else 'at least'} {NEAR_BASELINE_POINTS:g} points): {verdict} "
                   f"{PUBLISHED['lesion']}.")
    return out


def landscape_findings(runs: pd.DataFrame) -> list[str]:
    col = "diag_landscape_sharpness"
    out = []
    for depth, plain, resnet in _pairs(runs, col):
        p = paired(runs, plain, resnet, col)
        out.append(f"Sharpness (mean loss increase at alpha = ±0.5 along a filter-normalised direction) of "
                   f"{display_name(plain)} vs {display_name(resnet)}: {_versus(runs, col, plain, resnet)}; "
                   f"{_verdict(_agree(p))} {PUBLISHED['landscape']}.")
    return out


def _growth(runs: pd.DataFrame, column: str, arch_is_plain: bool) -> tuple[float, str, pd.Series] | None:
    """(deepest / shallowest mean of ``column``, 'a at depth d1 to b at depth d2', that ratio seed by seed)
    for one architecture."""
    g = runs[(runs["arch"] == "plain") == arch_is_plain]
    if column not in g or g[column].notna().sum() == 0:
        return None
    means = {int(d): mean_sd_n(x[column])[0] for d, x in g.groupby("depth")}
    means = {d: m for d, m in means.items() if math.isfinite(m)}
    if len(means) < 2:
        return None
    lo, hi = min(means), max(means)
    ratio = means[hi] / means[lo] if means[lo] > 0 else math.nan
    by = lambda d: g[g["depth"] == d].set_index("seed")[column]  # noqa: E731
    per_seed = (by(hi) / by(lo)).replace([math.inf, -math.inf], math.nan).dropna()
    return ratio, f"{_num(means[lo], (means[hi],))} at depth {lo} to {_num(means[hi], (means[lo],))} at depth {hi}", per_seed


def curvature_findings(runs: pd.DataFrame) -> list[str]:
    col = "diag_curvature_lambda_max"
    plain, resnet = _growth(runs, col, True), _growth(runs, col, False)
    out = [f"At depth {d}, lambda_max of {display_name(p)} vs {display_name(r)}: {_versus(runs, col, p, r)}."
           for d, p, r in _pairs(runs, col)]
    if out and not (plain and resnet):
        out.append(f"With one depth per architecture the growth with depth cannot be read: "
                   f"{_verdict(None)} {PUBLISHED['curvature']}.")
    if plain and resnet:
        d = _seed_interval(pd.DataFrame({"plain": plain[2], "residual": resnet[2]}))
        agree = plain[0] > 1 and _agrees(d, plain[0] > resnet[0])
        out.append(f"The top Hessian eigenvalue goes from {plain[1]} (×{_num(plain[0])}) for the plain nets and from "
                   f"{resnet[1]} (×{_num(resnet[0])}) for the ResNets{_interval_clause(d, 'growth ratio')}: "
                   f"{_verdict(agree)} {PUBLISHED['curvature']}.")
    return out


def shattering_findings(study: Study) -> list[str]:
    sweep = study.diagnostics.get(SWEEP)
    if sweep is None or sweep.empty:
        return []
    lag1 = sweep[sweep["lag"] == 1]
    rho1 = lag1.groupby(["arch", "depth"])["rho"].mean()
    drops, per_seed = {}, {}
    for arch in ("plain", "residual"):
        if arch in rho1.index.get_level_values(0):
            r = rho1[arch]
            drops[arch] = (float(r.iloc[0] - r.iloc[-1]), f"{_num(r.iloc[0], (r.iloc[-1],))} at depth {r.index[0]} to "
                                                          f"{_num(r.iloc[-1], (r.iloc[0],))} at depth {r.index[-1]}")
            by = lag1[lag1["arch"] == arch].groupby(["seed", "depth"])["rho"].mean().unstack("depth")
            per_seed[arch] = by[r.index[0]] - by[r.index[-1]]  # each seed's fall from the shallowest to the deepest
    if len(drops) < 2:
        return []
    d = _seed_interval(pd.DataFrame(per_seed))
    agree = _agrees(d, drops["plain"][0] > drops["residual"][0])
    seeds = sweep["seed"].nunique()
    return [f"At init, rho(1) falls from {drops['plain'][1]} for the plain nets and from {drops['residual'][1]} for "
            f"the ResNets (depth sweep, mean over {seeds} seed{'s' if seeds > 1 else ''}"
            f"{_interval_clause(d, 'fall') if seeds > 1 else ''}): {_verdict(agree)} {PUBLISHED['shattering']}."]


def diagnostic_findings(study: Study) -> dict[str, list[str]]:
    """Per diagnostic, its sentences (empty when the numbers are not there)."""
    runs = study.runs
    return {"lesion": lesion_findings(runs, study.diagnostics.get("lesion")),
            "landscape": landscape_findings(runs), "curvature": curvature_findings(runs),
            "shattering": shattering_findings(study)}
