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
from .stats import mean_sd_n, paired

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


def _num(x: float, digits: int = 2) -> str:
    return "n/a" if not math.isfinite(x) else (f"{x:.{digits}g}" if abs(x) >= 1e4 or abs(x) < 1e-2 else f"{x:.{digits}f}")


def _versus(runs: pd.DataFrame, column: str, a: str, b: str, unit: str = "") -> str:
    """'3.10 vs 0.40 (difference +2.70, 95 % CI ..., 3 seeds)' for nets a and b, seed-paired."""
    p = paired(runs, a, b, column)
    if p is None:
        return "n/a"
    return f"{_num(p.a_mean)}{unit} vs {_num(p.b_mean)}{unit} (difference {p.diff.mean:+.2f}; {interval_text(p.diff)})"


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


def _growth(runs: pd.DataFrame, column: str, arch_is_plain: bool) -> tuple[float, str] | None:
    """(deepest / shallowest mean of ``column``, 'a at depth d1 -> b at depth d2') for one architecture."""
    g = runs[(runs["arch"] == "plain") == arch_is_plain]
    if column not in g or g[column].notna().sum() == 0:
        return None
    means = {int(d): mean_sd_n(x[column])[0] for d, x in g.groupby("depth")}
    means = {d: m for d, m in means.items() if math.isfinite(m)}
    if len(means) < 2:
        return None
    lo, hi = min(means), max(means)
    ratio = means[hi] / means[lo] if means[lo] > 0 else math.nan
    return ratio, f"{_num(means[lo])} at depth {lo} to {_num(means[hi])} at depth {hi}"


def curvature_findings(runs: pd.DataFrame) -> list[str]:
    col = "diag_curvature_lambda_max"
    plain, resnet = _growth(runs, col, True), _growth(runs, col, False)
    out = [f"At depth {d}, lambda_max of {display_name(p)} vs {display_name(r)}: {_versus(runs, col, p, r)}."
           for d, p, r in _pairs(runs, col)]
    if out and not (plain and resnet):
        out.append(f"With one depth per architecture the growth with depth cannot be read: "
                   f"{_verdict(None)} {PUBLISHED['curvature']}.")
    if plain and resnet:
        agree = plain[0] > 1 and plain[0] > resnet[0]
        out.append(f"The top Hessian eigenvalue goes from {plain[1]} (x{_num(plain[0])}) for the plain nets and from "
                   f"{resnet[1]} (x{_num(resnet[0])}) for the ResNets: {_verdict(agree)} {PUBLISHED['curvature']}.")
    return out


def shattering_findings(study: Study) -> list[str]:
    sweep = study.diagnostics.get(SWEEP)
    if sweep is None or sweep.empty:
        return []
    rho1 = sweep[sweep["lag"] == 1].groupby(["arch", "depth"])["rho"].mean()
    drops = {}
    for arch in ("plain", "residual"):
        if arch in rho1.index.get_level_values(0):
            r = rho1[arch]
            drops[arch] = (float(r.iloc[0] - r.iloc[-1]), f"{r.iloc[0]:.2f} at depth {r.index[0]} to "
                                                          f"{r.iloc[-1]:.2f} at depth {r.index[-1]}")
    if len(drops) < 2:
        return []
    agree = drops["plain"][0] > drops["residual"][0]
    seeds = sweep["seed"].nunique()
    return [f"At init, rho(1) falls from {drops['plain'][1]} for the plain nets and from {drops['residual'][1]} for "
            f"the ResNets (depth sweep, mean over {seeds} seed{'s' if seeds > 1 else ''}): {_verdict(agree)} "
            f"{PUBLISHED['shattering']}."]


def diagnostic_findings(study: Study) -> dict[str, list[str]]:
    """Per diagnostic, its sentences (empty when the numbers are not there)."""
    runs = study.runs
    return {"lesion": lesion_findings(runs, study.diagnostics.get("lesion")),
            "landscape": landscape_findings(runs), "curvature": curvature_findings(runs),
            "shattering": shattering_findings(study)}
