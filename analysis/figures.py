"""The study's figures: tidy frame in, figure out; each saved as PNG (200 dpi) and PDF.

Every figure has two functions. ``draw_<name>(frame, ...)`` takes the tidy frame of
:class:`~analysis.runs.Study` it shows (``curves``, ``runs``, ``grad_flow``, ``grad_norms``,
``grad_norm_series``, ``responses``) and returns a ``matplotlib.figure.Figure``, so a notebook
redraws it from ``load_study(...)`` (or a filtered frame) in one line. ``<name>(study, out_dir)``
draws it for the report, saves it and returns a :class:`FigureResult` with the paths, a caption
computed from the data and notes on what was left out (a missing net is skipped, never an error).

Lines are means over seeds drawn by seaborn (:func:`analysis.style.band`) with a ±1 sd band
(error bars in ``error_vs_depth``) wherever a net has more than one seed. Colours are fixed
across figures (:mod:`analysis.style`): one colour per *depth* in ``degradation`` (the same depth
has the same colour in both panels), one per *architecture* where plain and residual nets are
compared (Okabe-Ito vermillion and blue), and in ``layer_responses`` the architecture's hue,
darker for deeper nets.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from .runs import Study, display_name, seed_mean, shared_milestones, shared_param
from .stats import net_order
from .style import (ARCH_COLOR, ARCH_LABEL, ARCH_MARKER, ARCHS, STYLE, arch_depth_colors, band, band_handle,
                    depth_colors, legend_handles, save_figure, seed_points)

GRAD_X = r"$\|\partial L/\partial x\|$"
GRAD_W = r"$\|\partial L/\partial W\|$"
MILESTONE_STYLE = {"color": "0.55", "lw": 0.9, "ls": ":"}


@dataclass
class FigureResult:
    name: str
    title: str
    caption: str = ""
    paths: dict[str, Path] = field(default_factory=dict)  # "png" / "pdf" -> file
    notes: list[str] = field(default_factory=list)

    @property
    def made(self) -> bool:
        return bool(self.paths)


# --------------------------------------------------------------------------- helpers


def _iter_formatter(max_iter: float) -> FuncFormatter:
    """64000 -> '64k' for long runs; plain integers for short ones."""
    def fmt(x: float, _pos: int) -> str:
        if max_iter >= 5000 and x != 0:
            return f"{x / 1000:g}k"
        return f"{x:g}"
    return FuncFormatter(fmt)


def _lr_decay(study: Study) -> float | None:
    try:
        return float(shared_param(study.runs, "lr_decay") or "nan")
    except ValueError:
        return None


def _mark_milestones(ax: Axes, milestones: Sequence[int]) -> None:
    for m in milestones:
        ax.axvline(m, zorder=0, **MILESTONE_STYLE)


def _milestone_legend(milestones: Sequence[int], lr_decay: float | None) -> list[tuple[str, dict]]:
    """The legend entry that names the dotted lr-drop lines, so a pasted figure explains itself."""
    if not milestones:
        return []
    label = f"lr ×{lr_decay:g}" if lr_decay is not None and math.isfinite(lr_decay) else "lr drop"
    return [(label, {**MILESTONE_STYLE, "lw": 1.2})]


def _nets(frame: pd.DataFrame) -> pd.DataFrame:
    """The nets in a tidy frame, one row each (model, arch, depth), in the report's order."""
    return net_order(frame.drop_duplicates("model")[["model", "arch", "depth"]])


def missing_pairs(study: Study) -> list[str]:
    """One note per net whose counterpart (same depth, other architecture) is not in the study."""
    notes = []
    by = study.runs.groupby("depth")["arch"].agg(set)
    for d, archs in by.items():
        for arch in ARCHS:
            other = "residual" if arch == "plain" else "plain"
            if arch in archs and other not in archs:
                notes.append(f"{ARCH_LABEL[arch]}-{d} has no {ARCH_LABEL[other]} counterpart at depth {d}: "
                             f"it is shown unpaired")
    return notes


def _save(fig: Figure, out_dir: Path, res: FigureResult, study: Study) -> None:
    desc = f"study {study.name}; MLflow experiment {study.experiment_id}; runs {', '.join(study.runs['run_id'])}"
    res.paths = save_figure(fig, out_dir, res.name, res.title, desc)


def _not_drawn(res: FigureResult, why: str) -> FigureResult:
    """The figure is skipped, with a note the report lists ('<figure>: <why>; figure not drawn')."""
    res.notes.append(f"{res.name}: {why}; figure not drawn")
    return res


def _note_panel(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.35", fontsize=11, wrap=True)


def _seeds_phrase(frame: pd.DataFrame, what: str = "band") -> str:
    """'one seed per net' or 'mean over 3 seeds per net, <what>: ±1 sd over seeds', from the runs in ``frame``."""
    n = frame.groupby("model")["run_id"].nunique()
    if n.max() <= 1:
        return "one seed per net"
    seeds = f"{n.max()}" if n.min() == n.max() else f"{n.min()}-{n.max()}"
    one = f" (none for {', '.join(display_name(m) for m in n[n <= 1].index)}: one seed)" if n.min() <= 1 else ""
    return f"mean over {seeds} seeds per net, {what}: ±1 sample standard deviation over seeds{one}"


def _spread_legend(frame: pd.DataFrame) -> list:
    return [band_handle()] if frame.groupby("model")["run_id"].nunique().max() > 1 else []


def _nice_ceiling(x: float) -> float:
    """Round up to 1, 2, 2.5 or 5 x 10^k."""
    if not math.isfinite(x) or x <= 0:
        return 1.0
    base = 10 ** math.floor(math.log10(x))
    for m in (1, 2, 2.5, 5, 10):
        if m * base >= x:
            return m * base
    return 10 * base


def _arch_legend(fig: Figure, frame: pd.DataFrame, *, markers: bool = True, extra: Sequence = ()) -> None:
    items = [(ARCH_LABEL[a], {"color": ARCH_COLOR[a], **({"marker": ARCH_MARKER[a]} if markers else {})})
             for a in ARCHS if (frame["arch"] == a).any()]
    handles = legend_handles(items) + list(extra)
    fig.legend(handles=handles, loc="outside upper center", ncols=len(handles))


# --------------------------------------------------------------------------- 1. degradation


def _degradation_top(curves: pd.DataFrame) -> float:
    """The y-limit: the seed means after the first 10 % of training, rounded up (the first
    iterations of a deep net sit near 90 % error and would flatten everything else)."""
    mean = seed_mean(curves, ["model", "metric", "iteration"])
    late = mean[mean["iteration"] >= 0.1 * float(mean["iteration"].max())]["value"]
    return min(100.0, _nice_ceiling(float(late.max()) * 1.08 if len(late) else 100.0))


def lr_drops(curves: pd.DataFrame) -> tuple[list[int], float | None]:
    """(lr-drop iterations, drop factor) of the runs in ``curves``: the study's schedule that
    ``load_study`` attaches to the frame (``curves.attrs``), else read off its ``lr`` curve (each
    drop at the first logged point after it, so within one logging window); ([], None) if neither."""
    if curves.attrs.get("milestones"):
        return list(curves.attrs["milestones"]), curves.attrs.get("lr_decay")
    lr = curves[curves["metric"] == "lr"] if "metric" in curves else curves.iloc[0:0]
    drops, factors = None, set()
    for _rid, g in lr.groupby("run_id"):
        v = g.sort_values("iteration")
        prev, cur = v["value"].to_numpy()[:-1], v["value"].to_numpy()[1:]
        at = cur < prev * (1 - 1e-6)
        its = set(v["iteration"].to_numpy()[1:][at].tolist())
        factors |= {round(float(c / p), 6) for c, p in zip(cur[at], prev[at])}
        drops = its if drops is None else drops & its
    return sorted(int(i) for i in drops or ()), factors.pop() if len(factors) == 1 else None


def draw_degradation(curves: pd.DataFrame, *, milestones: Sequence[int] | None = None, lr_decay: float | None = None,
                     notes: list[str] | None = None) -> Figure:
    """He et al. Fig. 6 from ``Study.curves``: error vs iteration, plain nets left, ResNets right;
    dashed train, solid test; mean over seeds with a ±1 sd band. The lr drops are marked from
    ``milestones``, by default from the frame itself (:func:`lr_drops`)."""
    notes = notes if notes is not None else []
    if milestones is None:
        milestones, found = lr_drops(curves)
        lr_decay = lr_decay if lr_decay is not None else found
    c = curves[curves["metric"].isin(["train/error", "test/error"])]
    colors = depth_colors(c["depth"])
    xmax = float(c["iteration"].max())
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(11, 4.4), layout="constrained")
        fig.get_layout_engine().set(wspace=0.08)  # keeps the left panel's last x label off the right panel's first
        axes = fig.subplots(1, 2, sharey=True)
        for ax, arch in zip(axes, ARCHS):
            sub = c[c["arch"] == arch]
            ax.set_title("plain-N" if arch == "plain" else "ResNet-N")
            ax.set_xlabel("iteration")
            ax.xaxis.set_major_formatter(_iter_formatter(xmax))
            _mark_milestones(ax, milestones)
            if sub.empty:
                _note_panel(ax, f"no {ARCH_LABEL[arch]} runs in this study")
                notes.append(f"degradation: no {ARCH_LABEL[arch]} runs, the {ARCH_LABEL[arch]} panel is empty")
                continue
            for depth in sorted(sub["depth"].unique()):
                for metric, ls, lw, alpha in (("train/error", "--", 1.3, 0.1), ("test/error", "-", 2.0, 0.22)):
                    d = sub[(sub["depth"] == depth) & (sub["metric"] == metric)]
                    if d.empty:
                        notes.append(f"degradation: no {metric} curve for {ARCH_LABEL[arch]}-{depth}")
                        continue
                    sparse = metric == "test/error" and d["iteration"].nunique() <= 20  # few evaluations: mark them
                    band(ax, d, "iteration", color=colors[int(depth)], ls=ls, lw=lw, alpha=alpha,
                         marker="o" if sparse else None, markersize=3.5, markeredgewidth=0)
            ax.set_xlim(0, xmax)
            ax.set_ylabel("")
        axes[0].set_ylabel("error (%)")
        axes[0].set_ylim(0, _degradation_top(c))
        blank = {"color": "none"}
        handles = legend_handles([("error", blank), ("train", {"color": "0.3", "ls": "--", "lw": 1.3}),
                                  ("test", {"color": "0.3", "ls": "-", "lw": 2.0}), ("", blank), ("depth N", blank)]
                                 + [(f"{d}", {"color": colors[d], "lw": 2.5}) for d in sorted(colors)]
                                 + ([("", blank)] + _milestone_legend(milestones, lr_decay) if milestones else []))
        spread = _spread_legend(c)
        legend = fig.legend(handles=handles + (legend_handles([("", blank)]) + spread if spread else []),
                            loc="outside right upper", handlelength=2.4)
        for text in legend.get_texts():
            if text.get_text() in ("error", "depth N"):
                text.set_fontweight("bold")
    return fig


def degradation(study: Study, out_dir: Path) -> FigureResult:
    title = "Training on plain vs residual nets (He et al. Fig. 6 layout)"
    res = FigureResult("degradation", title)
    c = study.curves[study.curves["metric"].isin(["train/error", "test/error"])]
    if c.empty:
        return _not_drawn(res, "no train/test error curves logged")
    milestones = shared_milestones(study.runs)
    _save(draw_degradation(c, milestones=milestones, lr_decay=_lr_decay(study), notes=res.notes), out_dir, res, study)
    top = _degradation_top(c)
    parts = [f"Error (%) against iteration; dashed: training error (mean over each logging window), "
             f"solid: test error; one colour per depth, the same in both panels; {_seeds_phrase(c)}."]
    if milestones:
        parts.append(f"Dotted vertical lines: learning-rate drops at iterations {', '.join(map(str, milestones))}.")
    if (seed_mean(c, ["model", "metric", "iteration"])["value"] > top).any():
        parts.append(f"The y-axis stops at {top:g} %; the first iterations are above it.")
    res.caption = " ".join(parts)
    return res


# --------------------------------------------------------------------------- 2. error vs depth


ERROR_PANELS = (("train_error", "training error"), ("test_error", "test error"))


def draw_error_vs_depth(runs: pd.DataFrame) -> Figure:
    """Final train and test error against depth from ``Study.runs``: plain vs residual, mean over
    seeds with ±1 sd error bars, each seed a small point beside its mean."""
    panels = [(m, lbl) for m, lbl in ERROR_PANELS if m in runs and runs[m].notna().any()]
    depths = sorted(int(d) for d in runs["depth"].unique())
    pad = max(2.0, 0.06 * (max(depths) - min(depths)))
    spread = runs.groupby("model")["run_id"].nunique().max() > 1
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(4.4 * len(panels) + 0.6, 4.2), layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True, squeeze=False)[0])  # one scale
        top = 0.0
        for ax, (metric, label) in zip(axes, panels):
            for arch, side in zip(ARCHS, (-1, 1)):
                g = runs[(runs["arch"] == arch) & runs[metric].notna()]
                if g.empty:
                    continue
                # plain a little left of its depth, ResNet a little right, each seed further out
                g = g.assign(x=g["depth"].astype(float) + side * 0.25 * pad,
                             x_seed=g["depth"].astype(float) + side * 0.55 * pad)
                band(ax, g, "x", metric, bars=True, color=ARCH_COLOR[arch], marker=ARCH_MARKER[arch],
                     markersize=7, lw=1.8)
                if spread:
                    seed_points(ax, g, "x_seed", metric, ARCH_COLOR[arch], ARCH_MARKER[arch])
                top = max(top, float(g[metric].max()))
            ax.set_title(label)
            ax.set_xlabel("depth (layers)")
            ax.set_ylabel("")
            ax.set_xticks(depths)
            ax.set_xlim(min(depths) - pad, max(depths) + pad)
        axes[0].set_ylabel("error (%)")
        axes[0].set_ylim(0, top * 1.12 if top > 0 else 1.0)
        items = [(ARCH_LABEL[a], {"color": ARCH_COLOR[a], "marker": ARCH_MARKER[a], "markersize": 7})
                 for a in ARCHS if (runs["arch"] == a).any()]
        if spread:
            items.append(("each seed", {"color": "0.45", "marker": "o", "ls": "none", "markersize": 4, "alpha": 0.6}))
        else:
            items.append(("one seed per net: no error bars", {"color": "none"}))
        fig.legend(handles=legend_handles(items), loc="outside upper center", ncols=len(items))
    return fig


def error_vs_depth(study: Study, out_dir: Path) -> FigureResult:
    title = "Final error against depth"
    res = FigureResult("error_vs_depth", title)
    runs = study.runs
    if not any(m in runs and runs[m].notna().any() for m, _ in ERROR_PANELS):
        return _not_drawn(res, "no final errors")
    _save(draw_error_vs_depth(runs), out_dir, res, study)
    n = runs.groupby("model")["run_id"].nunique()
    if n.max() <= 1:
        bars = "one seed per net, so no error bars"
    else:
        bars = ("error bars: ±1 sample standard deviation over seeds; small points: the individual seeds"
                + (f" (no bars for {', '.join(display_name(m) for m in n[n <= 1].index)}: one seed)"
                   if n.min() <= 1 else ""))
    res.caption = (f"Final training error (mean over the last logging window) and final test error against depth; "
                   f"markers: mean over seeds; {bars}.")
    return res


# --------------------------------------------------------------------------- 3. gradient flow


def _moments(df: pd.DataFrame) -> pd.DataFrame:
    """Tag each run's first probe point 'init' and its last 'end' (rows in between are dropped)."""
    if df.empty:
        return df.assign(moment=[])
    first = df.groupby("run_id")["iteration"].transform("min")
    last = df.groupby("run_id")["iteration"].transform("max")
    return pd.concat([df[df["iteration"] == first].assign(moment="init"),
                      df[(df["iteration"] == last) & (last > first)].assign(moment="end")], ignore_index=True)


def _flow_row_labels(m: pd.DataFrame) -> dict[str, str]:
    end_iters = sorted(set(m.loc[m["moment"] == "end", "iteration"]))
    return {"init": "at init (iteration 0)",
            "end": f"end of training (iteration {end_iters[-1]:,})" if len(end_iters) == 1 else "end of training"}


def draw_grad_flow(grad_flow: pd.DataFrame) -> Figure:
    """||dL/dx|| at each block input (and the head input) against block index, from
    ``Study.grad_flow``: columns = depth, rows = init and end; mean over seeds, ±1 sd band."""
    m = _moments(grad_flow)
    depths = sorted(int(d) for d in m["depth"].unique())
    moments = [x for x in ("init", "end") if (m["moment"] == x).any()]
    row_label = _flow_row_labels(m)
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(max(5.5, 3.1 * len(depths) + 1.2), 2.9 * len(moments) + 0.9), layout="constrained")
        axes = fig.subplots(len(moments), len(depths), sharey=True, squeeze=False)
        for i, moment in enumerate(moments):
            for j, depth in enumerate(depths):
                ax = axes[i, j]
                ax.set_yscale("log")
                sub = m[(m["moment"] == moment) & (m["depth"] == depth)]
                for arch in ARCHS:
                    d = sub[sub["arch"] == arch]
                    if len(d):
                        band(ax, d, "layer_index", color=ARCH_COLOR[arch], marker=ARCH_MARKER[arch],
                             markersize=3.5 if d["layer_index"].nunique() > 20 else 5, markeredgewidth=0)
                n_blocks = int(sub["layer_index"].max()) if len(sub) else 0
                ax.set_xlabel("")
                ax.set_ylabel(f"{GRAD_X}\n{row_label[moment]}" if j == 0 else "")
                ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
                ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _p, n=n_blocks: "head" if x == n else f"{x:g}"))
                ax.set_xlim(-0.5, n_blocks + 0.5)
                if i == 0:
                    ax.set_title(f"depth {depth}")
        fig.supxlabel("block index (input → head)", fontsize=STYLE["axes.labelsize"])
        for ax in axes.flat:
            n = ax.get_xlim()[1] - 0.5
            # a block tick closer than 12 % of the axis to the wide "head" label would run into it
            ax.set_xticks([t for t in ax.get_xticks() if 0 <= t and (n - t) / (n + 1) >= 0.12] + [n])
        _arch_legend(fig, m, extra=_spread_legend(m))
    return fig


def grad_flow(study: Study, out_dir: Path) -> FigureResult:
    title = "Gradient flow: norm of dL/dx at each block input"
    res = FigureResult("grad_flow", title)
    if study.grad_flow.empty:
        return _not_drawn(res, "no gradient-flow probes in this study")
    _save(draw_grad_flow(study.grad_flow), out_dir, res, study)
    m = _moments(study.grad_flow)
    labels = _flow_row_labels(m)
    rows = " and ".join(labels[x] for x in ("init", "end") if (m["moment"] == x).any())
    res.caption = (f"Norm of the loss gradient with respect to each block's input on a fixed test batch "
                   f"(BN in training mode), against block index (0 = first block, 'head' = the last block's "
                   f"output, which feeds the classifier); log scale; {_seeds_phrase(study.grad_flow)}. "
                   f"Columns: depth; rows: {rows}.")
    return res


# --------------------------------------------------------------------------- 4./5. weight-gradient norms


def _main_path(df: pd.DataFrame) -> pd.DataFrame:
    """Weight layers on the main path (stem, block convs, fc; no projection shortcuts), re-indexed 0.."""
    w = df[(df["group"] == "weight") & ~df["layer"].str.contains("shortcut", regex=False)].copy()
    order = (w[["run_id", "layer_index", "layer"]].drop_duplicates().sort_values(["run_id", "layer_index"]))
    order["position"] = order.groupby("run_id").cumcount()
    return w.merge(order[["run_id", "layer", "position"]], on=["run_id", "layer"])


def _lr_at(curves: pd.DataFrame | None, iteration: int) -> float | None:
    if curves is None:
        return None
    lr = curves[(curves["metric"] == "lr") & (curves["iteration"] >= max(iteration, 1))]
    return float(lr.sort_values("iteration")["value"].iloc[0]) if len(lr) else None


def _by_layer_points(w: pd.DataFrame) -> list[tuple[int, str]]:
    """(iteration, name) of the columns: init, the first evaluation, the end."""
    points = sorted(set(w["iteration"]))
    named = [(points[0], "init")] + ([(points[1], "first evaluation")] if len(points) > 2 else [])
    return named + ([(points[-1], "end")] if len(points) > 1 else [])


def draw_grad_norms_by_layer(grad_norms: pd.DataFrame, curves: pd.DataFrame | None = None) -> Figure:
    """Weight-gradient norm per layer against layer index at init, first evaluation and end, from
    ``Study.grad_norms`` (``curves``, optional, puts the lr in the column titles); rows = depth."""
    w = _main_path(grad_norms)
    chosen = _by_layer_points(w)
    depths = sorted(int(d) for d in w["depth"].unique())
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(3.6 * len(chosen) + 1.0, 2.5 * len(depths) + 1.0), layout="constrained")
        axes = fig.subplots(len(depths), len(chosen), sharey=True, squeeze=False)
        for i, depth in enumerate(depths):
            for j, (it, name) in enumerate(chosen):
                ax = axes[i, j]
                ax.set_yscale("log")
                sub = w[(w["depth"] == depth) & (w["iteration"] == it)]
                for arch in ARCHS:
                    d = sub[sub["arch"] == arch]
                    if len(d):
                        band(ax, d, "position", color=ARCH_COLOR[arch], marker=ARCH_MARKER[arch],
                             markersize=3.5 if d["position"].nunique() > 20 else 5, markeredgewidth=0)
                ax.set_xlabel("")
                ax.set_ylabel(f"depth {depth}\n{GRAD_W}" if j == 0 else "")
                ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
                if i == 0:
                    lr = _lr_at(curves, it)
                    lr_s = f", lr {lr:g}" if lr is not None and it > 0 else ""
                    ax.set_title(f"{name}\n(iteration {it:,}{lr_s})")
        fig.supxlabel("layer index (0 = first conv, last = fc)", fontsize=STYLE["axes.labelsize"])
        _arch_legend(fig, w, extra=_spread_legend(w))
    return fig


def grad_norms_by_layer(study: Study, out_dir: Path) -> FigureResult:
    title = "Weight-gradient norm per layer"
    res = FigureResult("grad_norms_by_layer", title)
    if study.grad_norms.empty:
        return _not_drawn(res, "no gradient-norm probes in this study")
    _save(draw_grad_norms_by_layer(study.grad_norms, study.curves), out_dir, res, study)
    res.caption = ("L2 norm of each conv/fc weight gradient against layer index (main path only; projection "
                   "shortcuts left out), log scale. At init: the first mini-batch; later points: mean over the "
                   f"iterations of the logging window before the point; {_seeds_phrase(study.grad_norms)}. "
                   "Rows: depth.")
    return res


def _pick_layers(w: pd.DataFrame) -> list[tuple[str, int]]:
    """(label, position) of the first, middle and last conv on the main path (fc excluded)."""
    convs = sorted(set(w.loc[w["layer"] != "fc", "position"]))
    if not convs:
        return []
    picks = [("first conv layer", convs[0]), ("middle conv layer", convs[len(convs) // 2]),
             ("last conv layer", convs[-1])]
    seen, out = set(), []
    for label, p in picks:
        if p not in seen:
            seen.add(p)
            out.append((label, p))
    return out


def draw_grad_norms_over_training(grad_norm_series: pd.DataFrame, *, milestones: Sequence[int] = (),
                                  lr_decay: float | None = None) -> Figure:
    """First, middle and last conv layer's weight-gradient norm against iteration, from
    ``Study.grad_norm_series``; rows = depth; mean over seeds with a ±1 sd band."""
    w = _main_path(grad_norm_series)
    depths = sorted(int(d) for d in w["depth"].unique())
    xmax = float(w["iteration"].max())
    ncols = 3
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(3.8 * ncols + 0.8, 2.5 * len(depths) + 1.0), layout="constrained")
        axes = fig.subplots(len(depths), ncols, sharey=True, sharex=True, squeeze=False)
        for i, depth in enumerate(depths):
            wd = w[w["depth"] == depth]
            picks = _pick_layers(wd)
            for j in range(ncols):
                ax = axes[i, j]
                ax.set_yscale("log")
                _mark_milestones(ax, milestones)
                if j >= len(picks):
                    ax.set_visible(False)
                    continue
                label, pos = picks[j]
                sub = wd[wd["position"] == pos]
                for arch in ARCHS:
                    d = sub[sub["arch"] == arch]
                    if len(d):
                        band(ax, d, "iteration", color=ARCH_COLOR[arch], lw=1.4)
                layer = sub["layer"].iloc[0] if len(sub) else "?"
                ax.set_title(f"{label}: {layer}" if i == 0 else layer, fontsize=11 if i == 0 else 10)
                ax.set_xlabel("")
                ax.set_ylabel(f"depth {depth}\n{GRAD_W}" if j == 0 else "")
                if i == len(depths) - 1:
                    ax.xaxis.set_major_formatter(_iter_formatter(xmax))
        axes[0, 0].set_xlim(0, xmax)
        fig.supxlabel("iteration", fontsize=STYLE["axes.labelsize"])
        _arch_legend(fig, w, markers=False,
                     extra=legend_handles(_milestone_legend(milestones, lr_decay)) + _spread_legend(w))
    return fig


def grad_norms_over_training(study: Study, out_dir: Path) -> FigureResult:
    title = "Weight-gradient norm over training: first, middle and last conv layer"
    res = FigureResult("grad_norms_over_training", title)
    s = study.grad_norm_series
    if s.empty:
        return _not_drawn(res, "no gradient-norm probes in this study")
    milestones = shared_milestones(study.runs)
    _save(draw_grad_norms_over_training(s, milestones=milestones, lr_decay=_lr_decay(study)), out_dir, res, study)
    counts = s.groupby("run_id")["n_iterations"].max()
    binning = ("each measured iteration" if counts.max() <= 1
               else f"averaged over bins of up to {int(counts.max())} iterations")
    parts = [f"L2 norm of the weight gradient of the first, middle and last conv layer of the main path "
             f"against iteration ({binning}), log scale; {_seeds_phrase(s)}. Rows: depth."]
    if s["run_id"].nunique() > s["model"].nunique():
        parts.append("Where the mean minus one sd is at or below 0 the log axis cannot show the band, and none is drawn.")
    if milestones:
        parts.append(f"Dotted vertical lines: learning-rate drops at {', '.join(map(str, milestones))}.")
    res.caption = " ".join(parts)
    return res


# --------------------------------------------------------------------------- 6. layer responses


def _at_end(responses: pd.DataFrame) -> pd.DataFrame:
    """Each run's last probe point, with ``rank``: the layer's place when the run's responses
    are sorted descending (He et al. Fig. 7 bottom)."""
    last = responses.groupby("run_id")["iteration"].transform("max")
    end = responses[responses["iteration"] == last].copy()
    end["rank"] = end.groupby("run_id")["value"].rank(method="first", ascending=False).astype(int) - 1
    return end


def _moment_of(end: pd.DataFrame) -> str:
    its = sorted(set(end["iteration"]))
    return f"iteration {its[0]:,}" if len(its) == 1 else "each run's last probe point"


def draw_layer_responses(responses: pd.DataFrame) -> Figure:
    """He et al. Fig. 7 from ``Study.responses``: std of each 3x3 conv's BN output at the end of
    training, in layer order (top) and sorted (bottom); mean over seeds with a ±1 sd band."""
    end = _at_end(responses)
    nets = _nets(end)
    colors = arch_depth_colors(nets)
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(9.5, 7.0), layout="constrained")
        top, bottom = fig.subplots(2, 1)
        handles = []
        for row in nets.itertuples():
            d = end[end["model"] == row.model]
            style = {"color": colors[(row.arch, int(row.depth))], "ls": "--" if row.arch == "plain" else "-",
                     "lw": 1.5 if row.arch == "plain" else 1.9,
                     "zorder": 3 if row.arch == "plain" else 2}  # dashed on top: solid shows through its gaps
            band(top, d, "layer_index", **style)
            band(bottom, d, "rank", **style)
            handles += legend_handles([(display_name(row.model), style)])
        top.set_title(f"std of each 3×3 conv's output after BN, end of training ({_moment_of(end)})")
        top.set_xlabel("layer index (original order; 0 = first conv)")
        bottom.set_xlabel("layer index (sorted by magnitude)")
        for ax in (top, bottom):
            ax.set_ylabel("std of layer response")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlim(left=-0.5)
            ax.set_ylim(bottom=0)
        fig.legend(handles=handles + _spread_legend(end), loc="outside right upper")
    return fig


def layer_responses(study: Study, out_dir: Path) -> FigureResult:
    title = "Layer responses (He et al. Fig. 7 layout)"
    res = FigureResult("layer_responses", title)
    r = study.responses
    if r.empty:
        return _not_drawn(res, "no layer-response probes in this study")
    _save(draw_layer_responses(r), out_dir, res, study)
    res.caption = (f"Standard deviation of each 3×3 conv layer's output after BN, before the ReLU and the "
                   f"shortcut addition (for ResNets, the response of the residual function), on a fixed test "
                   f"subset at the end of training ({_moment_of(_at_end(r))}); top: in layer order, bottom: each "
                   f"run's layers sorted descending; dashed orange: plain nets, solid blue: ResNets, darker = deeper; "
                   f"{_seeds_phrase(r)}.")
    return res


FIGURES: dict[str, Callable[[Study, Path], FigureResult]] = {
    "degradation": degradation,
    "error_vs_depth": error_vs_depth,
    "grad_flow": grad_flow,
    "grad_norms_by_layer": grad_norms_by_layer,
    "grad_norms_over_training": grad_norms_over_training,
    "layer_responses": layer_responses,
}


Drawer = Callable[[Study, Path], FigureResult]
_TASK: tuple[Study, Path, Mapping[str, Drawer]] | None = None  # what forked workers draw from


def figure_jobs() -> int:
    """Processes to draw figures in: the cores this process may use; 1 (in-process) where the
    start method is not fork (macOS, Windows: a spawned worker would unpickle the whole study)."""
    if sys.platform != "linux" or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    return len(os.sched_getaffinity(0))


def draw_figures(study: Study, out_dir: Path, drawers: Mapping[str, Drawer],
                 jobs: int | None = None) -> list[FigureResult]:
    """Each drawer's figure (e.g. ``FIGURES``), in the mapping's order; notes of left-out nets are
    deduplicated across figures only by the report, each result keeps its own. Matplotlib draws
    on one core and a report's figures are independent, so with several cores each figure is
    drawn in a forked worker process, which inherits the loaded study instead of receiving a copy
    (a 9-run full-scale report's figures: docs/benchmarks.md). ``jobs``: processes (default
    :func:`figure_jobs`)."""
    global _TASK
    out_dir = Path(out_dir)
    jobs = min(figure_jobs() if jobs is None else jobs, len(drawers))
    if jobs <= 1:
        return [draw(study, out_dir) for draw in drawers.values()]
    _TASK = (study, out_dir, drawers)
    try:
        # fork: every worker starts here, before the pool's own thread, with _TASK set
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            return list(pool.map(_draw_one, drawers))
    finally:
        _TASK = None


def _draw_one(name: str) -> FigureResult:
    assert _TASK is not None, "draw_figures sets the task before it forks"
    study, out_dir, drawers = _TASK
    return drawers[name](study, out_dir)


_DIAG_DRAWERS = ("draw_lesion", "draw_landscape", "draw_curvature", "draw_shattering")


def __getattr__(name: str) -> object:
    """The diagnostics' ``draw_*`` (:mod:`analysis.diag_figures`) from here too, so a notebook finds
    every figure in one module; looked up on first use, as diag_figures itself imports this module."""
    if name in _DIAG_DRAWERS:
        from . import diag_figures

        return getattr(diag_figures, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
