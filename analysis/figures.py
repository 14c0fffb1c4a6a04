"""The study's figures, each saved as PNG (200 dpi) and PDF (embedded TrueType fonts).

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas, never
through pyplot, so nothing depends on (or changes) the global backend and figures are freed
as soon as they are saved. Colours are fixed across figures: one colour per *depth* in
``degradation`` (the same depth has the same colour in both panels), one colour per
*architecture* where plain and residual nets are compared (plain = vermillion, ResNet = blue,
Okabe-Ito colour-blind-safe), and in ``layer_responses`` the architecture's hue, darker for
deeper nets. The layout is solved once, for the PNG, and reused for the PDF.

Every function takes a loaded :class:`~analysis.runs.Study` and an output directory and
returns a :class:`FigureResult` with the file paths, a caption computed from the data and
notes on what was left out (a missing net is skipped, never an error).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter, NullLocator

from .runs import Study, display_name, seed_mean

ARCHS = ("plain", "residual")
ARCH_LABEL = {"plain": "plain", "residual": "ResNet"}
ARCH_COLOR = {"plain": "#D55E00", "residual": "#0072B2"}
ARCH_MARKER = {"plain": "o", "residual": "s"}
DPI = 200
STYLE = {
    "font.family": "DejaVu Sans", "font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11,
    "xtick.labelsize": 10, "ytick.labelsize": 10, "legend.fontsize": 10, "legend.title_fontsize": 10,
    "figure.titlesize": 13, "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.6,
    "axes.spines.top": False, "axes.spines.right": False, "lines.linewidth": 1.8, "lines.markersize": 5,
    "legend.frameon": False, "pdf.fonttype": 42, "ps.fonttype": 42, "savefig.dpi": DPI,
    "figure.constrained_layout.h_pad": 0.06, "figure.constrained_layout.w_pad": 0.06,
}
GRAD_X = r"$\|\partial L/\partial x\|$"
GRAD_W = r"$\|\partial L/\partial W\|$"


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


def depth_colors(depths: Sequence[int]) -> dict[int, tuple[float, ...]]:
    """Ordinal colours (viridis, dark = shallow, light = deep), trimmed before the pale yellow end."""
    depths = sorted({int(d) for d in depths})
    cmap = matplotlib.colormaps["viridis"]
    if len(depths) == 1:
        return {depths[0]: cmap(0.3)}
    return {d: cmap(0.85 * i / (len(depths) - 1)) for i, d in enumerate(depths)}


def arch_depth_colors(runs: pd.DataFrame) -> dict[tuple[str, int], tuple[float, ...]]:
    """(arch, depth) -> colour: the architecture's hue (plain orange, ResNet blue), darker = deeper."""
    out = {}
    for arch, cmap in (("plain", "Oranges"), ("residual", "Blues")):
        depths = sorted({int(d) for d in runs.loc[runs["arch"] == arch, "depth"]})
        for i, d in enumerate(depths):
            t = 0.75 if len(depths) == 1 else 0.45 + 0.5 * i / (len(depths) - 1)
            out[(arch, d)] = matplotlib.colormaps[cmap](t)
    return out


def _iter_formatter(max_iter: float) -> FuncFormatter:
    """64000 -> '64k' for long runs; plain integers for short ones."""
    def fmt(x: float, _pos: int) -> str:
        if max_iter >= 5000 and x != 0:
            return f"{x / 1000:g}k"
        return f"{x:g}"
    return FuncFormatter(fmt)


def _milestones(study: Study) -> list[int]:
    """The lr-drop iterations if every run shares them, else []."""
    values = set(study.runs.get("param_milestones", pd.Series(dtype=object)).dropna().astype(str))
    if len(values) != 1:
        return []
    try:
        ms = json.loads(values.pop())
    except (ValueError, TypeError):
        return []
    return [int(m) for m in ms] if isinstance(ms, list) else []


MILESTONE_STYLE = {"color": "0.55", "lw": 0.9, "ls": ":"}


def _mark_milestones(ax: matplotlib.axes.Axes, milestones: list[int]) -> None:
    for m in milestones:
        ax.axvline(m, zorder=0, **MILESTONE_STYLE)


def _milestone_legend(study: Study, milestones: list[int]) -> list[tuple[str, dict]]:
    """The legend entry that names the dotted lr-drop lines, so a pasted figure explains itself."""
    if not milestones:
        return []
    decays = set(study.runs.get("param_lr_decay", pd.Series(dtype=object)).dropna().astype(str))
    try:
        label = f"lr ×{float(decays.pop()):g}" if len(decays) == 1 else "lr drop"
    except ValueError:
        label = "lr drop"
    return [(label, {**MILESTONE_STYLE, "lw": 1.2})]


def _depths(study: Study) -> list[int]:
    """Every depth in the study, one figure row each; a net without its counterpart is drawn
    alone in its row (``missing_pairs`` puts a note in the report)."""
    return sorted(int(d) for d in study.runs["depth"].unique())


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


def _legend_handles(items: Sequence[tuple[str, dict]]) -> list[Line2D]:
    return [Line2D([], [], label=label, **kw) for label, kw in items]


def _save(fig: Figure, out_dir: Path, name: str, title: str, study: Study) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    _finish_log_axes(fig.axes)
    ids = ", ".join(study.runs["run_id"])
    desc = f"study {study.name}; MLflow experiment {study.experiment_id}; runs {ids}"
    paths = {"png": out_dir / f"{name}.png", "pdf": out_dir / f"{name}.pdf"}
    fig.savefig(paths["png"], dpi=DPI, metadata={"Title": title, "Description": desc, "Software": "resnet_lab analysis"})
    fig.set_layout_engine("none")  # the PNG's layout, kept: solving it again for the PDF doubles the time
    fig.savefig(paths["pdf"], metadata={"Title": title, "Subject": desc, "Creator": "resnet_lab analysis"})
    return paths


def _not_drawn(res: FigureResult, why: str) -> FigureResult:
    """The figure is skipped, with a note the report lists ('<figure>: <why>; figure not drawn')."""
    res.notes.append(f"{res.name}: {why}; figure not drawn")
    return res


def _note_panel(ax: matplotlib.axes.Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.35", fontsize=11, wrap=True)


def _seeds_phrase(study: Study) -> str:
    n = study.runs.groupby("model")["run_id"].count()
    if n.min() == n.max():
        return "one seed per net" if n.max() == 1 else f"mean over {n.max()} seeds per net"
    return f"mean over {n.min()}-{n.max()} seeds per net"


def _log_axis(ax: matplotlib.axes.Axes) -> None:
    ax.set_yscale("log")


def _tick_label(x: float) -> str:
    """0.06, 0.2, 1, 20 for ordinary magnitudes; 10^-5 style (mathtext) beyond them."""
    if x <= 0:
        return ""
    if 1e-3 <= x < 1e4:
        return f"{x:g}"
    exp = math.floor(math.log10(x) + 1e-9)
    mant = x / 10 ** exp
    return rf"$10^{{{exp}}}$" if abs(mant - 1) < 1e-6 else rf"${mant:g}\times10^{{{exp}}}$"


def _finish_log_axes(axes: Sequence[matplotlib.axes.Axes]) -> None:
    """Readable log ticks once the data limits are known: 1-2-5 ticks when the range spans
    up to ~2.5 decades, decades only beyond; labels as plain decimals where they are short."""
    for ax in axes:
        if ax.get_yscale() != "log" or not ax.get_visible():
            continue
        lo, hi = ax.get_ylim()
        decades = math.log10(hi / lo) if lo > 0 and hi > lo else 1.0
        if decades < 0.3:  # less than a 2x range: every 1..9 x 10^k
            subs: tuple[float, ...] = tuple(range(1, 10))
        elif decades < 1.0:  # under a decade, 1-2-5 leaves two or three labels
            subs = (1.0, 2.0, 3.0, 5.0, 7.0)
        else:
            subs = (1.0, 2.0, 5.0) if decades <= 2.5 else (1.0,)
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs, numticks=12))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda x, _p: _tick_label(x)))
        # minor ticks only where the labels are decades alone (they also cost ~10 % of the drawing time)
        ax.yaxis.set_minor_locator(LogLocator(base=10, subs=np.arange(2, 10), numticks=12) if subs == (1.0,)
                                   else NullLocator())
        ax.yaxis.set_minor_formatter(NullFormatter())


# --------------------------------------------------------------------------- 1. degradation


def degradation(study: Study, out_dir: Path) -> FigureResult:
    """He et al. Fig. 6: error vs iteration, plain nets left, ResNets right; dashed train, solid test."""
    title = "Training on plain vs residual nets (He et al. Fig. 6 layout)"
    res = FigureResult("degradation", title)
    c = study.curves[study.curves["metric"].isin(["train/error", "test/error"])]
    if c.empty:
        return _not_drawn(res, "no train/test error curves logged")
    mean = seed_mean(c, ["model", "arch", "depth", "metric", "iteration"])
    colors = depth_colors(study.runs["depth"])
    milestones = _milestones(study)
    xmax = float(mean["iteration"].max())
    late = mean[mean["iteration"] >= 0.1 * xmax]["value"]
    top = min(100.0, _nice_ceiling(float(late.max()) * 1.08 if len(late) else 100.0))
    clipped = bool((mean["value"] > top).any())
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(11, 4.4), layout="constrained")
        fig.get_layout_engine().set(wspace=0.08)  # keeps the left panel's last x label off the right panel's first
        axes = fig.subplots(1, 2, sharey=True)
        for ax, arch in zip(axes, ARCHS):
            sub = mean[mean["arch"] == arch]
            ax.set_title("plain-N" if arch == "plain" else "ResNet-N")
            ax.set_xlabel("iteration")
            ax.xaxis.set_major_formatter(_iter_formatter(xmax))
            ax.set_xlim(0, xmax)
            _mark_milestones(ax, milestones)
            if sub.empty:
                _note_panel(ax, f"no {ARCH_LABEL[arch]} runs in this study")
                res.notes.append(f"degradation: no {ARCH_LABEL[arch]} runs, the {ARCH_LABEL[arch]} panel is empty")
                continue
            for depth in sorted(sub["depth"].unique()):
                for metric, ls, lw in (("train/error", "--", 1.3), ("test/error", "-", 2.0)):
                    d = sub[(sub["depth"] == depth) & (sub["metric"] == metric)].sort_values("iteration")
                    if d.empty:
                        res.notes.append(f"degradation: no {metric} curve for {ARCH_LABEL[arch]}-{depth}")
                        continue
                    sparse = metric == "test/error" and len(d) <= 20  # few evaluations: show where they are
                    ax.plot(d["iteration"], d["value"], ls=ls, lw=lw, color=colors[int(depth)],
                            marker="o" if sparse else None, markersize=3.5)
        axes[0].set_ylabel("error (%)")
        axes[0].set_ylim(0, top)
        blank = {"color": "none"}
        handles = _legend_handles([("error", blank), ("train", {"color": "0.3", "ls": "--", "lw": 1.3}),
                                   ("test", {"color": "0.3", "ls": "-", "lw": 2.0}), ("", blank),
                                   ("depth N", blank)]
                                  + [(f"{d}", {"color": colors[d], "lw": 2.5}) for d in sorted(colors)]
                                  + ([("", blank)] + _milestone_legend(study, milestones) if milestones else []))
        legend = fig.legend(handles=handles, loc="outside right upper", handlelength=2.4)
        for text in legend.get_texts():
            if text.get_text() in ("error", "depth N"):
                text.set_fontweight("bold")
        res.paths = _save(fig, out_dir, res.name, title, study)
    parts = [f"Error (%) against iteration; dashed: training error (mean over each logging window), "
             f"solid: test error; one colour per depth, the same in both panels; {_seeds_phrase(study)}."]
    if milestones:
        parts.append(f"Dotted vertical lines: learning-rate drops at iterations {', '.join(map(str, milestones))}.")
    if clipped:
        parts.append(f"The y-axis stops at {top:g} %; the first iterations are above it.")
    res.caption = " ".join(parts)
    return res


def _nice_ceiling(x: float) -> float:
    """Round up to 1, 2, 2.5 or 5 x 10^k."""
    if not math.isfinite(x) or x <= 0:
        return 1.0
    base = 10 ** math.floor(math.log10(x))
    for m in (1, 2, 2.5, 5, 10):
        if m * base >= x:
            return m * base
    return 10 * base


# --------------------------------------------------------------------------- 2. error vs depth


def error_vs_depth(study: Study, out_dir: Path) -> FigureResult:
    """Final train and test error against depth, plain vs residual, error bars = std over seeds."""
    from .runs import aggregate

    title = "Final error against depth"
    res = FigureResult("error_vs_depth", title)
    agg = aggregate(study.runs)
    panels = [(m, lbl) for m, lbl in (("train_error", "training error"), ("test_error", "test error"))
              if f"{m}_mean" in agg and agg[f"{m}_mean"].notna().any()]
    if not panels:
        return _not_drawn(res, "no final errors")
    depths = sorted(int(d) for d in agg["depth"].unique())
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(4.4 * len(panels) + 0.6, 4.2), layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True))  # train and test on one scale
        pad = max(2.0, 0.06 * (max(depths) - min(depths)))
        top = 0.0
        for ax, (metric, label) in zip(axes, panels):
            for arch, side in zip(ARCHS, (-1, 1)):
                g = agg[agg["arch"] == arch].sort_values("depth")
                g = g[g[f"{metric}_mean"].notna()]
                if g.empty:
                    continue
                err = g[f"{metric}_std"].fillna(0.0)
                # plain a little left of its depth, ResNet a little right: equal values stay visible
                ax.errorbar(g["depth"].astype(float) + side * 0.25 * pad, g[f"{metric}_mean"], yerr=err,
                            color=ARCH_COLOR[arch], marker=ARCH_MARKER[arch], capsize=4, elinewidth=1.2,
                            markersize=7, lw=1.8)
                top = max(top, float((g[f"{metric}_mean"] + err).max()))
            ax.set_title(label)
            ax.set_xlabel("depth (layers)")
            ax.set_xticks(depths)
            ax.set_xlim(min(depths) - pad, max(depths) + pad)
        axes[0].set_ylabel("error (%)")
        axes[0].set_ylim(0, top * 1.12 if top > 0 else 1.0)
        items = [(ARCH_LABEL[a], {"color": ARCH_COLOR[a], "marker": ARCH_MARKER[a], "markersize": 7})
                 for a in ARCHS if (agg["arch"] == a).any()]
        if (agg["n_seeds"] <= 1).all():
            items.append(("one seed per net: no error bars", {"color": "none"}))
        fig.legend(handles=_legend_handles(items), loc="outside upper center", ncols=len(items))
        res.paths = _save(fig, out_dir, res.name, title, study)
    single = agg["n_seeds"] <= 1
    bars = ("error bars: ±1 standard deviation over seeds" if not single.all()
            else "one seed per net, so no error bars")
    if single.any() and not single.all():
        bars += f" (none for {', '.join(display_name(m) for m in agg.loc[single, 'model'])}: one seed)"
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
    out = pd.concat([df[df["iteration"] == first].assign(moment="init"),
                     df[(df["iteration"] == last) & (last > first)].assign(moment="end")], ignore_index=True)
    return out


def grad_flow(study: Study, out_dir: Path) -> FigureResult:
    """||dL/dx|| at each block input (and the head input) against block index, init and end."""
    title = "Gradient flow: norm of dL/dx at each block input"
    res = FigureResult("grad_flow", title)
    flow = study.grad_flow
    if flow.empty:
        return _not_drawn(res, "no gradient-flow probes in this study")
    m = _moments(flow)
    mean = seed_mean(m, ["model", "arch", "depth", "moment", "layer_index", "layer"])
    depths = sorted(int(d) for d in mean["depth"].unique())
    moments = [x for x in ("init", "end") if (mean["moment"] == x).any()]
    end_iters = sorted(set(m.loc[m["moment"] == "end", "iteration"]))
    row_label = {"init": "at init (iteration 0)",
                 "end": f"end of training (iteration {end_iters[-1]:,})" if len(end_iters) == 1 else "end of training"}
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(max(5.5, 3.1 * len(depths) + 1.2), 2.9 * len(moments) + 0.9), layout="constrained")
        axes = np.atleast_2d(fig.subplots(len(moments), len(depths), sharey=True, squeeze=False))
        for i, moment in enumerate(moments):
            for j, depth in enumerate(depths):
                ax = axes[i, j]
                sub = mean[(mean["moment"] == moment) & (mean["depth"] == depth)]
                for arch in ARCHS:
                    d = sub[sub["arch"] == arch].sort_values("layer_index")
                    if d.empty:
                        continue
                    ax.plot(d["layer_index"], d["value"], color=ARCH_COLOR[arch], marker=ARCH_MARKER[arch],
                            markersize=3.5 if len(d) > 20 else 5)
                n_blocks = int(sub["layer_index"].max()) if len(sub) else 0
                ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
                ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _p, n=n_blocks: "head" if x == n else f"{x:g}"))
                ax.set_xlim(-0.5, n_blocks + 0.5)
                _log_axis(ax)
                if i == 0:
                    ax.set_title(f"depth {depth}")
                if j == 0:
                    ax.set_ylabel(f"{GRAD_X}\n{row_label[moment]}")
        fig.supxlabel("block index (input → head)", fontsize=STYLE["axes.labelsize"])
        for ax in axes.flat:
            n = ax.get_xlim()[1] - 0.5
            # a block tick closer than 12 % of the axis to the wide "head" label would run into it
            ticks = [t for t in ax.get_xticks() if 0 <= t and (n - t) / (n + 1) >= 0.12] + [n]
            ax.set_xticks(ticks)
        fig.legend(handles=_legend_handles([(ARCH_LABEL[a], {"color": ARCH_COLOR[a], "marker": ARCH_MARKER[a]})
                                            for a in ARCHS if (mean["arch"] == a).any()]),
                   loc="outside upper center", ncols=2)
        res.paths = _save(fig, out_dir, res.name, title, study)
    res.caption = (f"Norm of the loss gradient with respect to each block's input on a fixed test batch "
                   f"(BN in training mode), against block index (0 = first block, 'head' = the last block's "
                   f"output, which feeds the classifier); log scale; {_seeds_phrase(study)}. Columns: depth; "
                   f"rows: {' and '.join(row_label[x] for x in moments)}.")
    return res


# --------------------------------------------------------------------------- 4./5. weight-gradient norms


def _main_path(df: pd.DataFrame) -> pd.DataFrame:
    """Weight layers on the main path (stem, block convs, fc; no projection shortcuts), re-indexed 0.."""
    w = df[(df["group"] == "weight") & ~df["layer"].str.contains("shortcut", regex=False)].copy()
    order = (w[["run_id", "layer_index", "layer"]].drop_duplicates().sort_values(["run_id", "layer_index"]))
    order["position"] = order.groupby("run_id").cumcount()
    return w.merge(order[["run_id", "layer", "position"]], on=["run_id", "layer"])


def _lr_at(study: Study, iteration: int) -> float | None:
    lr = study.curves[(study.curves["metric"] == "lr") & (study.curves["iteration"] >= max(iteration, 1))]
    return float(lr.sort_values("iteration")["value"].iloc[0]) if len(lr) else None


def grad_norms_by_layer(study: Study, out_dir: Path) -> FigureResult:
    """Weight-gradient norm per layer against layer index at init, first evaluation and end."""
    title = "Weight-gradient norm per layer"
    res = FigureResult("grad_norms_by_layer", title)
    g = study.grad_norms
    if g.empty:
        return _not_drawn(res, "no gradient-norm probes in this study")
    w = _main_path(g)
    points = sorted(set(w["iteration"]))
    chosen = [points[0]] + ([points[1]] if len(points) > 2 else []) + ([points[-1]] if len(points) > 1 else [])
    names = ["init"] + (["first evaluation"] if len(points) > 2 else []) + (["end"] if len(points) > 1 else [])
    depths = _depths(study)
    mean = seed_mean(w[w["iteration"].isin(chosen)], ["model", "arch", "depth", "iteration", "position", "layer"])
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(3.6 * len(chosen) + 1.0, 2.5 * len(depths) + 1.0), layout="constrained")
        axes = fig.subplots(len(depths), len(chosen), sharey=True, squeeze=False)
        for i, depth in enumerate(depths):
            for j, (it, name) in enumerate(zip(chosen, names)):
                ax = axes[i, j]
                sub = mean[(mean["depth"] == depth) & (mean["iteration"] == it)]
                for arch in ARCHS:
                    d = sub[sub["arch"] == arch].sort_values("position")
                    if len(d):
                        ax.plot(d["position"], d["value"], color=ARCH_COLOR[arch], marker=ARCH_MARKER[arch],
                                markersize=3.5 if len(d) > 20 else 5)
                _log_axis(ax)
                ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
                if i == 0:
                    lr = _lr_at(study, it)
                    lr_s = f", lr {lr:g}" if lr is not None and it > 0 else ""
                    ax.set_title(f"{name}\n(iteration {it:,}{lr_s})")
                if j == 0:
                    ax.set_ylabel(f"depth {depth}\n{GRAD_W}")
        fig.supxlabel("layer index (0 = first conv, last = fc)", fontsize=STYLE["axes.labelsize"])
        fig.legend(handles=_legend_handles([(ARCH_LABEL[a], {"color": ARCH_COLOR[a], "marker": ARCH_MARKER[a]})
                                            for a in ARCHS if (mean["arch"] == a).any()]),
                   loc="outside upper center", ncols=2)
        res.paths = _save(fig, out_dir, res.name, title, study)
    res.caption = ("L2 norm of each conv/fc weight gradient against layer index (main path only; projection "
                   "shortcuts left out), log scale. At init: the first mini-batch; later points: mean over the "
                   f"iterations of the logging window before the point; {_seeds_phrase(study)}. Rows: depth.")
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


def grad_norms_over_training(study: Study, out_dir: Path) -> FigureResult:
    """First, middle and last conv layer's weight-gradient norm against iteration."""
    title = "Weight-gradient norm over training: first, middle and last conv layer"
    res = FigureResult("grad_norms_over_training", title)
    s = study.grad_norm_series
    if s.empty:
        return _not_drawn(res, "no gradient-norm probes in this study")
    w = _main_path(s)
    depths = _depths(study)
    milestones = _milestones(study)
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
                _log_axis(ax)
                _mark_milestones(ax, milestones)
                if j >= len(picks):
                    ax.set_visible(False)
                    continue
                label, pos = picks[j]
                sub = seed_mean(wd[wd["position"] == pos], ["model", "arch", "layer", "iteration"])
                for arch in ARCHS:
                    d = sub[sub["arch"] == arch].sort_values("iteration")
                    if len(d):
                        ax.plot(d["iteration"], d["value"], color=ARCH_COLOR[arch], lw=1.4)
                layer = sub["layer"].iloc[0] if len(sub) else "?"
                ax.set_title(f"{label}: {layer}" if i == 0 else layer, fontsize=11 if i == 0 else 10)
                if i == len(depths) - 1:
                    ax.xaxis.set_major_formatter(_iter_formatter(xmax))
                if j == 0:
                    ax.set_ylabel(f"depth {depth}\n{GRAD_W}")
        axes[0, 0].set_xlim(0, xmax)
        fig.supxlabel("iteration", fontsize=STYLE["axes.labelsize"])
        items = [(ARCH_LABEL[a], {"color": ARCH_COLOR[a]}) for a in ARCHS if (w["arch"] == a).any()]
        items += _milestone_legend(study, milestones)
        fig.legend(handles=_legend_handles(items), loc="outside upper center", ncols=len(items))
        res.paths = _save(fig, out_dir, res.name, title, study)
    counts = s.groupby("run_id")["n_iterations"].max()
    binning = ("every iteration" if counts.max() <= 1
               else f"averaged over bins of up to {int(counts.max())} iterations")
    parts = [f"L2 norm of the weight gradient of the first, middle and last conv layer of the main path "
             f"against iteration ({binning}), log scale; {_seeds_phrase(study)}. Rows: depth."]
    if milestones:
        parts.append(f"Dotted vertical lines: learning-rate drops at {', '.join(map(str, milestones))}.")
    res.caption = " ".join(parts)
    return res


# --------------------------------------------------------------------------- 6. layer responses


def _moment_of(end: pd.DataFrame) -> str:
    its = sorted(set(end["iteration"]))
    return f"iteration {its[0]:,}" if len(its) == 1 else "each run's last probe point"


def layer_responses(study: Study, out_dir: Path) -> FigureResult:
    """He et al. Fig. 7: std of each 3x3 conv's BN output, in layer order and sorted."""
    title = "Layer responses (He et al. Fig. 7 layout)"
    res = FigureResult("layer_responses", title)
    r = study.responses
    if r.empty:
        return _not_drawn(res, "no layer-response probes in this study")
    last = r.groupby("run_id")["iteration"].transform("max")
    end = r[r["iteration"] == last]
    mean = seed_mean(end, ["model", "arch", "depth", "layer_index"])
    colors = arch_depth_colors(study.runs)
    order = study.runs.drop_duplicates("model")[["model", "arch", "depth"]]
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(9.5, 7.0), layout="constrained")
        top, bottom = fig.subplots(2, 1)
        handles = []
        for row in order.itertuples():
            d = mean[mean["model"] == row.model].sort_values("layer_index")
            if d.empty:
                continue
            style = {"color": colors[(row.arch, int(row.depth))], "ls": "--" if row.arch == "plain" else "-",
                     "lw": 1.5 if row.arch == "plain" else 1.9,
                     "zorder": 3 if row.arch == "plain" else 2}  # dashed on top: solid shows through its gaps
            top.plot(d["layer_index"], d["value"], **style)
            bottom.plot(np.arange(len(d)), np.sort(d["value"].to_numpy())[::-1], **style)
            handles.append(Line2D([], [], label=display_name(row.model), **style))
        top.set_title(f"std of each 3×3 conv's output after BN, end of training ({_moment_of(end)})")
        top.set_xlabel("layer index (original order; 0 = first conv)")
        bottom.set_xlabel("layer index (sorted by magnitude)")
        for ax in (top, bottom):
            ax.set_ylabel("std of layer response")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlim(left=-0.5)
            ax.set_ylim(bottom=0)
        fig.legend(handles=handles, loc="outside right upper")
        res.paths = _save(fig, out_dir, res.name, title, study)
    at = _moment_of(end)
    res.caption = (f"Standard deviation of each 3×3 conv layer's output after BN, before the ReLU and the "
                   f"shortcut addition (for ResNets, the response of the residual function), on a fixed test "
                   f"subset at the end of training ({at}); top: in layer order, bottom: sorted descending; "
                   f"dashed orange: plain nets, solid blue: ResNets, darker = deeper; {_seeds_phrase(study)}.")
    return res


FIGURES: dict[str, Callable[[Study, Path], FigureResult]] = {
    "degradation": degradation,
    "error_vs_depth": error_vs_depth,
    "grad_flow": grad_flow,
    "grad_norms_by_layer": grad_norms_by_layer,
    "grad_norms_over_training": grad_norms_over_training,
    "layer_responses": layer_responses,
}


def make_figures(study: Study, out_dir: Path, names: Sequence[str] | None = None) -> list[FigureResult]:
    """Draw the figures (all by default) into ``out_dir``; notes of left-out nets are deduplicated
    across figures only by the report, each result keeps its own."""
    return [FIGURES[n](study, Path(out_dir)) for n in (names or FIGURES)]
