"""The look every figure shares: palette, rc style, the seed band, log ticks and saving.

One place for it so the diagnostics' figures (and a notebook) draw like the report's:
``with matplotlib.rc_context(STYLE)``, colours from ``ARCH_COLOR`` (Okabe-Ito, colour-blind
safe: plain = vermillion, ResNet = blue), :func:`band` for a mean over seeds with its spread,
:func:`save_figure` for the PNG + PDF pair. Figures are ``matplotlib.figure.Figure`` objects on
the Agg canvas, never pyplot, so nothing depends on (or changes) the global backend.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

# Okabe & Ito (2008), "Color Universal Design": distinguishable under every common colour-vision deficiency.
OKABE_ITO = {"orange": "#E69F00", "sky blue": "#56B4E9", "bluish green": "#009E73", "yellow": "#F0E442",
             "blue": "#0072B2", "vermillion": "#D55E00", "reddish purple": "#CC79A7", "black": "#000000"}
ARCHS = ("plain", "residual")
ARCH_LABEL = {"plain": "plain", "residual": "ResNet"}
ARCH_COLOR = {"plain": OKABE_ITO["vermillion"], "residual": OKABE_ITO["blue"]}
ARCH_MARKER = {"plain": "o", "residual": "s"}
BAND_ALPHA = 0.2
DPI = 200
STYLE = {
    "font.family": "DejaVu Sans", "font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11,
    "xtick.labelsize": 10, "ytick.labelsize": 10, "legend.fontsize": 10, "legend.title_fontsize": 10,
    "figure.titlesize": 13, "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.6,
    "axes.spines.top": False, "axes.spines.right": False, "lines.linewidth": 1.8, "lines.markersize": 5,
    "legend.frameon": False, "pdf.fonttype": 42, "ps.fonttype": 42, "savefig.dpi": DPI,
    "figure.constrained_layout.h_pad": 0.06, "figure.constrained_layout.w_pad": 0.06,
}


def depth_colors(depths: Sequence[int]) -> dict[int, tuple[float, ...]]:
    """Ordinal colours (viridis, dark = shallow, light = deep), trimmed before the pale yellow end."""
    depths = sorted({int(d) for d in depths})
    cmap = matplotlib.colormaps["viridis"]
    if len(depths) == 1:
        return {depths[0]: cmap(0.3)}
    return {d: cmap(0.85 * i / (len(depths) - 1)) for i, d in enumerate(depths)}


def arch_depth_colors(nets: pd.DataFrame) -> dict[tuple[str, int], tuple[float, ...]]:
    """(arch, depth) -> colour: the architecture's hue (plain orange, ResNet blue), darker = deeper."""
    out = {}
    for arch, cmap in (("plain", "Oranges"), ("residual", "Blues")):
        depths = sorted({int(d) for d in nets.loc[nets["arch"] == arch, "depth"]})
        for i, d in enumerate(depths):
            t = 0.75 if len(depths) == 1 else 0.45 + 0.5 * i / (len(depths) - 1)
            out[(arch, d)] = matplotlib.colormaps[cmap](t)
    return out


def seed_stats(data: pd.DataFrame, x: str, y: str = "value") -> pd.DataFrame:
    """Mean, sample sd (ddof=1) and n of ``y`` over seeds (runs) at each ``x``, sorted by ``x``."""
    g = data.groupby(x, sort=True, observed=True)[y]
    return g.agg(mean="mean", sd="std", n="count").reset_index()


def band(ax: Axes, data: pd.DataFrame, x: str, y: str = "value", *, bars: bool = False,
         alpha: float = BAND_ALPHA, **line_kws) -> bool:
    """The mean of ``y`` over seeds at each ``x`` as a line (``seaborn.lineplot``), with ±1 sample
    sd (ddof=1) as a band (``bars``: error bars with caps) where some ``x`` has several seeds; one
    seed: the line alone. On a log y axis (set before the call), points where mean - sd <= 0 get
    no band. Returns whether a spread was drawn.

    The mean and sd come from one pandas groupby rather than seaborn's ``errorbar="sd"``, which
    aggregates x by x: 0.75 s per 500-point line with 3 seeds (measured, 2 shared cores), ~40 s
    for a 3-seed full-scale report; the groupby gives the same numbers in milliseconds.
    ``alpha``: the band's opacity (lighter for a secondary line)."""
    s = seed_stats(data, x, y)
    spread = bool((s["n"] > 1).any())
    labels = ax.get_xlabel(), ax.get_ylabel()
    # a label already there stops seaborn from asking for the tick labels (it lays out the ticks: ~60 ms a call)
    ax.set(xlabel=labels[0] or " ", ylabel=labels[1] or " ")
    sns.lineplot(data=s.rename(columns={"mean": y}), x=x, y=y, ax=ax, estimator=None, legend=False, **line_kws)
    ax.set(xlabel=labels[0], ylabel=labels[1])
    if spread:
        color = ax.get_lines()[-1].get_color()
        if bars:
            ax.errorbar(s[x], s["mean"], yerr=s["sd"].fillna(0.0), fmt="none", ecolor=color, capsize=4,
                        elinewidth=1.2, zorder=line_kws.get("zorder", 2))
        else:
            low = s["mean"] - s["sd"]
            # a log axis cannot show an edge at or below 0: there the band is left out, not drawn down
            # to the axis bottom (which reads as a collapse that no seed had)
            shown = (low > 0) if ax.get_yscale() == "log" else np.ones(len(s), dtype=bool)
            ax.fill_between(s[x], low.where(shown), (s["mean"] + s["sd"]).where(shown), where=np.asarray(shown),
                            color=color, alpha=alpha, linewidth=0)
    return spread


def seed_points(ax: Axes, data: pd.DataFrame, x: str, y: str, color: object, marker: str = "o") -> None:
    """Each seed's value as a small point (``seaborn.scatterplot``), beside its mean."""
    sns.scatterplot(data=data, x=x, y=y, ax=ax, color=color, marker=marker, s=16, alpha=0.55, linewidth=0,
                    legend=False, zorder=3)


def legend_handles(items: Sequence[tuple[str, dict]]) -> list[Line2D]:
    return [Line2D([], [], label=label, **kw) for label, kw in items]


def band_handle(label: str = "±1 sd over seeds") -> Patch:
    """The legend entry that says what the shaded band is."""
    return Patch(facecolor="0.45", alpha=BAND_ALPHA + 0.1, edgecolor="none", label=label)


def tick_label(x: float) -> str:
    """0.06, 0.2, 1, 20 for ordinary magnitudes; 10^-5 style (mathtext) beyond them."""
    if x <= 0:
        return ""
    if 1e-3 <= x < 1e4:
        return f"{x:g}"
    exp = math.floor(math.log10(x) + 1e-9)
    mant = x / 10 ** exp
    return rf"$10^{{{exp}}}$" if abs(mant - 1) < 1e-6 else rf"${mant:g}\times10^{{{exp}}}$"


def finish_log_axes(axes: Sequence[Axes]) -> None:
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
        ax.yaxis.set_major_formatter(FuncFormatter(lambda x, _p: tick_label(x)))
        # minor ticks only where the labels are decades alone (they also cost ~10 % of the drawing time)
        ax.yaxis.set_minor_locator(LogLocator(base=10, subs=np.arange(2, 10), numticks=12) if subs == (1.0,)
                                   else NullLocator())
        ax.yaxis.set_minor_formatter(NullFormatter())


def save_figure(fig: Figure, out_dir: Path, name: str, title: str, description: str) -> dict[str, Path]:
    """``<name>.png`` (DPI) and ``<name>.pdf`` (embedded TrueType fonts), with title and provenance in
    their metadata; the layout is solved once, for the PNG, and reused for the PDF."""
    out_dir.mkdir(parents=True, exist_ok=True)
    finish_log_axes(fig.axes)
    paths = {"png": out_dir / f"{name}.png", "pdf": out_dir / f"{name}.pdf"}
    with matplotlib.rc_context(STYLE):
        fig.savefig(paths["png"], dpi=DPI, metadata={"Title": title, "Description": description,
                                                     "Software": "resnet_lab analysis"})
        fig.set_layout_engine("none")  # solving it again for the PDF doubles the time
        fig.savefig(paths["pdf"], metadata={"Title": title, "Subject": description, "Creator": "resnet_lab analysis"})
    return paths
