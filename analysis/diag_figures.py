"""The figures of "Why the deep plain nets degrade": the four diagnostics (issue 16), PNG + PDF.

Like :mod:`analysis.figures`: ``draw_<name>(table)`` takes the diagnostic's tidy table from
``Study.diagnostics`` and returns a Figure; ``<name>(study, out_dir)`` saves it with a caption,
or says why it was not drawn (a diagnostic not run is a note, never an error). Plain vs
residual in the fixed Okabe-Ito colours of :mod:`analysis.style`; means over seeds (and
subsets, draws) with ±1 sd where there are several.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .figures import FigureResult, _not_drawn, _save
from .runs import SWEEP, Study
from .style import ARCH_COLOR, ARCH_LABEL, ARCH_MARKER, ARCHS, STYLE, arch_depth_colors, band, legend_handles

BLOCK_RE = re.compile(r"stage(\d+)\.block(\d+)")


def _depths(table: pd.DataFrame) -> list[int]:
    return sorted(int(d) for d in table["depth"].unique())


def _arch_legend(fig: Figure, archs: set[str], extra: list[tuple[str, dict]] = ()) -> None:  # type: ignore[assignment]
    items = [(ARCH_LABEL[a], {"color": ARCH_COLOR[a], "marker": ARCH_MARKER[a]}) for a in ARCHS if a in archs]
    items += list(extra)
    ncols = len(items) if fig.get_figwidth() > 2.6 * len(items) else 2
    fig.legend(handles=legend_handles(items), loc="outside upper center", ncols=ncols)


def _missing(study: Study, name: str) -> list[str]:
    """Nets of the study without diagnostic ``name`` (not run yet)."""
    have = set(study.diagnostics[name]["run_id"]) if name in study.diagnostics else set()
    return [r.run_name for r in study.runs.itertuples() if r.run_id not in have]


def _made(study: Study, out_dir: Path, res: FigureResult, fig: Figure, name: str) -> FigureResult:
    _save(fig, out_dir, res, study)
    missing = _missing(study, name)
    model_of = dict(zip(study.runs["run_name"], study.runs["model"]))
    have = {m for n, m in model_of.items() if n not in missing}  # nets diagnosed on some seed
    by_setting = [n for n in missing if model_of[n] in have]
    absent = [n for n in missing if model_of[n] not in have]
    if by_setting:  # the same words for every diagnostic, so the report's notes say it once
        res.notes.append(f"The diagnostics ran on some seeds of each net only, as the study's diagnostics `seeds` "
                         f"setting asks (the CPU scale: the first seed); without them: {', '.join(by_setting)}")
    if absent:
        res.notes.append(f"{name}: not run for {', '.join(absent)} (run 'resnet-lab diagnose STUDY_FILE'); "
                         "left out of the figure")
    return res


# --------------------------------------------------------------------------- lesion (Veit et al. 2016)


def block_position(name: str) -> int:
    """'stage2.block3' -> a sortable position (stage-major)."""
    m = BLOCK_RE.search(name)
    return int(m.group(1)) * 1000 + int(m.group(2)) if m else 0


def draw_lesion(table: pd.DataFrame) -> Figure:
    """Top row: test error with one block deleted against the block's position (baseline dashed, blocks
    a plain net cannot delete marked x). Bottom row: error against the number k of deleted blocks."""
    depths = _depths(table)
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(max(7.0, 4.2 * len(depths) + 0.6), 7.4), layout="constrained")
        axes = fig.subplots(2, len(depths), squeeze=False)
        for col, depth in enumerate(depths):
            t = table[table["depth"] == depth]
            order = sorted(t.loc[t["kind"].isin(["single", "not_applicable"]), "block"].unique(), key=block_position)
            pos = {b: i + 1 for i, b in enumerate(order)}
            top, bottom = axes[0, col], axes[1, col]
            for arch in ARCHS:
                a = t[t["arch"] == arch]
                if a.empty:
                    continue
                color = ARCH_COLOR[arch]
                single = a[a["kind"] == "single"].assign(position=lambda d: d["block"].map(pos))
                band(top, single, "position", "error", color=color, marker=ARCH_MARKER[arch], markersize=4, lw=1.4)
                top.axhline(a.loc[a["kind"] == "baseline", "error"].mean(), color=color, ls="--", lw=1.0)
                na = a[a["kind"] == "not_applicable"]
                top.plot(na["block"].map(pos), np.zeros(len(na)), "x", color=color, ms=7, ls="none")
                kb = a[a["kind"].isin(["single", "k_blocks"])]
                kb = kb[(kb["kind"] == "k_blocks") | (kb["k"] == 1)]
                band(bottom, kb, "k", "error", color=color, marker=ARCH_MARKER[arch], markersize=4, lw=1.4)
                bottom.axhline(a.loc[a["kind"] == "baseline", "error"].mean(), color=color, ls="--", lw=1.0)
            top.set(title=f"depth {depth}", xlabel="deleted block (position)", ylabel="test error (%)")
            bottom.set(xlabel="blocks deleted (k)", ylabel="test error (%)")
            k_max = int(t["k"].max()) if t["k"].notna().any() else 1
            for ax, last in ((top, len(order)), (bottom, max(k_max, 1))):  # whole blocks: integer ticks, room at the ends
                if last <= 8:
                    ax.set_xticks(range(1, last + 1))  # MaxNLocator falls back to fractions below two integers
                else:
                    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.set_xlim(0.5, last + 0.5)
        _arch_legend(fig, set(table["arch"]), [("no block deleted", {"color": "0.3", "ls": "--"}),
                                               ("cannot be deleted (changes shape)",
                                                {"color": "0.3", "marker": "x", "ls": "none"})])
    return fig


def lesion(study: Study, out_dir: Path) -> FigureResult:
    res = FigureResult("lesion", "Lesion: test error with blocks deleted")
    if "lesion" not in study.diagnostics:
        return _not_drawn(res, "no run has the lesion diagnostic (run 'resnet-lab diagnose STUDY_FILE')")
    t = study.diagnostics["lesion"]
    res.caption = ("Veit et al. 2016's lesion study, BN in eval mode on a fixed test subset: top, the test error "
                   "with one block replaced by its shortcut (ResNet: ReLU(shortcut(x)); plain: the identity, only "
                   "where the block keeps its shape; x: blocks that change shape, not applicable), dashed: nothing "
                   "deleted; bottom, the error with k blocks deleted, mean over "
                   f"{int(t['draw'].max()) + 1} random draw(s) per k" + _over_seeds(t) + ".")
    return _made(study, out_dir, res, draw_lesion(t), "lesion")


def _over_seeds(t: pd.DataFrame) -> str:
    n = t.groupby("model")["run_id"].nunique().max()
    return f" and {n} seeds (band: ±1 sd)" if n > 1 else " (one seed per net)"


# --------------------------------------------------------------------------- landscape (Li et al. 2018)


def draw_landscape(table: pd.DataFrame) -> Figure:
    """Rows: 2D loss contours of plain, of ResNet (first seed of each net, shared log colour scale),
    the 1D slice and the init-to-final path; columns: depth."""
    depths = _depths(table)
    grid = table[table["kind"] == "grid"]
    first = table.groupby("model")["seed"].transform("min") == table["seed"]
    pos = grid.loc[first[grid.index], "loss"]
    pos = pos[pos > 0]
    norm = LogNorm(float(pos.min()), float(pos.max())) if len(pos) else None
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(3.6 * len(depths) + 0.8, 12.5), layout="constrained")
        axes = fig.subplots(4, len(depths), squeeze=False)
        mappable = None
        for col, depth in enumerate(depths):
            for row, arch in enumerate(ARCHS):
                ax = axes[row, col]
                g = grid[(grid["depth"] == depth) & (grid["arch"] == arch) & first[grid.index]]
                ax.set(title=f"{ARCH_LABEL[arch]}-{depth}", xlabel="direction 1", ylabel="direction 2")
                if g.empty or norm is None:
                    ax.set_axis_off()
                    continue
                z = g.pivot_table(index="y", columns="x", values="loss")
                levels = np.geomspace(norm.vmin, norm.vmax, 14)
                mappable = ax.contourf(z.columns, z.index, z.clip(lower=norm.vmin).values, levels=levels, norm=norm,
                                       cmap="viridis")
                ax.plot(0, 0, "w+", ms=8)
            for row, kind, xlabel in ((2, "line", "alpha (filter-normalised direction)"),
                                      (3, "path", "t (0 = init, 1 = trained)")):
                ax = axes[row, col]
                for arch in ARCHS:
                    g = table[(table["depth"] == depth) & (table["arch"] == arch) & (table["kind"] == kind)]
                    if len(g):
                        band(ax, g, "x", "loss", color=ARCH_COLOR[arch], lw=1.5)
                ax.set(xlabel=xlabel, ylabel="loss (training subset)", yscale="log")
        if mappable is not None:
            fig.colorbar(mappable, ax=axes[:2, :].ravel().tolist(), label="loss (log scale)", shrink=0.8)
        _arch_legend(fig, set(table["arch"]))
    return fig


def landscape(study: Study, out_dir: Path) -> FigureResult:
    res = FigureResult("landscape", "Loss landscape: filter-normalised slices and the init-to-final path")
    if "landscape" not in study.diagnostics:
        return _not_drawn(res, "no run has the landscape diagnostic (run 'resnet-lab diagnose STUDY_FILE')")
    t = study.diagnostics["landscape"]
    res.caption = ("Li et al. 2018's filter-normalised random directions around the trained weights (BN and biases "
                   "not moved, BN in eval mode with the trained running statistics), loss on a fixed unaugmented "
                   "training subset: rows 1-2, the 2D slice of each net (first seed; + the trained weights; one "
                   "log colour scale for all); row 3, the 1D slice; row 4, the straight path from the initial (t = 0) "
                   "to the final weights (t = 1), every parameter interpolated and BN's running statistics "
                   "re-estimated from the subset at each point (neither end's statistics fit the weights in "
                   "between), so t = 1 is close to, not equal to, the slices' centre" + _over_seeds(t) + ".")
    return _made(study, out_dir, res, draw_landscape(t), "landscape")


# --------------------------------------------------------------------------- curvature (PyHessian's method)


def draw_curvature(table: pd.DataFrame) -> Figure:
    """lambda_max and trace of the Hessian against depth, log scale: mean over subsets and seeds, ±1 sd bars."""
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(9.4, 4.2), layout="constrained")
        axes = fig.subplots(1, 2)
        for ax, col, label in zip(axes, ("lambda_max", "trace"), ("top eigenvalue $\\lambda_{max}$", "trace")):
            for arch in ARCHS:
                g = table[(table["arch"] == arch) & (table[col] > 0)]
                if len(g):
                    band(ax, g.assign(depth=g["depth"].astype(float)), "depth", col, bars=True,
                         color=ARCH_COLOR[arch], marker=ARCH_MARKER[arch], markersize=7, lw=1.8)
            ax.set(title=f"Hessian {label}", xlabel="depth (layers)", ylabel=label, yscale="log")
            ax.set_xticks(_depths(table))
        _arch_legend(fig, set(table["arch"]))
    return fig


def curvature(study: Study, out_dir: Path) -> FigureResult:
    res = FigureResult("curvature", "Curvature: Hessian top eigenvalue and trace against depth")
    if "curvature" not in study.diagnostics:
        return _not_drawn(res, "no run has the curvature diagnostic (run 'resnet-lab diagnose STUDY_FILE')")
    t = study.diagnostics["curvature"]
    dropped = int((t[["lambda_max", "trace"]] <= 0).any(axis=1).sum())
    res.caption = ("Hessian of the mean cross-entropy over fixed unaugmented training images w.r.t. all weights, BN "
                   "in eval mode (PyHessian's method, Yao et al. 2020): top eigenvalue by power iteration on "
                   "Hessian-vector products, trace by Hutchinson's estimator; mean over "
                   f"{int(t['subset'].max()) + 1} disjoint subsets" + _over_seeds(t).replace("band", "bars")
                   + ", error bars ±1 sd over subsets and seeds; log scale"
                   + (f" ({dropped} non-positive estimates not shown)" if dropped else "") + ".")
    return _made(study, out_dir, res, draw_curvature(t), "curvature")


# --------------------------------------------------------------------------- shattering (Balduzzi et al. 2017)


def sweep_or_runs(study: Study) -> pd.DataFrame:
    """rho(lag) at init per (arch, depth, seed): the parent's depth sweep, else the runs' own init tables."""
    if SWEEP in study.diagnostics:
        return study.diagnostics[SWEEP]
    t = study.diagnostics.get("shattering")
    return t[t["moment"] == "init"] if t is not None else pd.DataFrame()


def draw_shattering(init: pd.DataFrame, runs_table: pd.DataFrame | None = None) -> Figure:
    """Left: rho against lag at init, a line per (arch, depth). Right: rho(1) against depth at init
    (mean over seeds), and the trained runs' rho(1) at the end (hollow markers)."""
    nets = init.drop_duplicates(["arch", "depth"])[["arch", "depth"]]
    colors = arch_depth_colors(nets)
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(10.0, 4.4), layout="constrained")
        left, right = fig.subplots(1, 2)
        for (arch, depth), g in init.groupby(["arch", "depth"]):
            band(left, g, "lag", "rho", color=colors[(arch, int(depth))], lw=1.3,
                 ls="-" if arch == "residual" else "--")
        left.set(title="at init: correlation against lag", xlabel="lag (points on the line)", ylabel="rho(lag)")
        left.xaxis.set_major_locator(MaxNLocator(integer=True))
        for arch in ARCHS:
            g = init[(init["arch"] == arch) & (init["lag"] == 1)]
            if len(g):
                band(right, g.assign(depth=g["depth"].astype(float)), "depth", "rho", bars=True,
                     color=ARCH_COLOR[arch], marker=ARCH_MARKER[arch], markersize=7, lw=1.8)
            if runs_table is not None:
                end = runs_table[(runs_table["arch"] == arch) & (runs_table["moment"] == "final") &
                                 (runs_table["lag"] == 1)]
                right.plot(end["depth"], end["rho"], ARCH_MARKER[arch], mfc="none", color=ARCH_COLOR[arch], ms=9)
        right.set(title="rho(1) against depth", xlabel="depth (layers)", ylabel="rho(1)")
        right.set_xticks(sorted(int(d) for d in init["depth"].unique()))
        _arch_legend(fig, set(init["arch"]), [("trained (end)", {"color": "0.3", "marker": "o", "mfc": "none",
                                                                 "ls": "none"})])
    return fig


def shattering(study: Study, out_dir: Path) -> FigureResult:
    res = FigureResult("shattering", "Shattered gradients: input-gradient correlation along a line")
    init = sweep_or_runs(study)
    if init.empty:
        return _not_drawn(res, "no shattering diagnostic and no depth sweep (run 'resnet-lab diagnose STUDY_FILE')")
    src = "the depth sweep of freshly built nets (logged to the study's parent run)" if SWEEP in study.diagnostics \
        else "the study's runs at their logged initial weights (no depth sweep logged)"
    res.caption = ("Balduzzi et al. 2017: the gradient of the logit of image a's class w.r.t. the input, at evenly "
                   "spaced points on the line from test image a to test image b; rho(lag) is the mean cosine "
                   "similarity of gradients lag points apart (1: smooth, 0: shattered). BN in eval mode with running "
                   f"statistics from one fixed batch of training images. At init: {src}, dashed plain, solid ResNet, "
                   "darker deeper; ±1 sd over seeds where there are several. Hollow markers: the trained runs.")
    fig = draw_shattering(init, study.diagnostics.get("shattering"))
    return _made(study, out_dir, res, fig, "shattering")


DIAG_FIGURES: dict[str, Callable[[Study, Path], FigureResult]] = {
    "lesion": lesion, "landscape": landscape, "curvature": curvature, "shattering": shattering}
