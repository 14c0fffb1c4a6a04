"""One training run's own small figures, logged to its MLflow run so the run's page shows pictures.

The study report (``analysis/``) draws every net together with seed bands; these are one run's
two lines each, so plain matplotlib (the object API, no pyplot state, Agg) is enough and keeps a
run's end cheap: no seaborn aggregation, no global figure registry shared between threads.
"""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

SIZE = (4.8, 3.2)  # inches; at 100 dpi a card-sized picture in the run's artifact view


def error_curves(history: dict[str, list[tuple[int, float]]], title: str) -> Figure:
    """``{"train/error": [(iteration, %), ...], "test/error": ...}`` as lines over iterations."""
    fig = Figure(figsize=SIZE, dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for key, points in history.items():
        if points:
            steps, values = zip(*sorted(points))
            ax.plot(steps, values, label=key.split("/")[0], marker="." if len(points) < 20 else None)
    ax.set(xlabel="iteration", ylabel="error (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    return fig


def gradient_flow(table: pd.DataFrame, title: str) -> Figure:
    """``Probes.tables()["grad_flow"]`` (||dL/dx|| at each block input and the head) at the first and
    last probe point, over the block index: a flat line is a gradient that reaches the input intact."""
    fig = Figure(figsize=SIZE, dpi=100, layout="constrained")
    ax = fig.add_subplot()
    first, last = table["iteration"].min(), table["iteration"].max()
    for it, label in ((first, f"init (it {first})"), (last, f"end (it {last})")):
        rows = table[table["iteration"] == it].sort_values("layer_index")
        ax.plot(rows["layer_index"], rows["value"], label=label, marker="." if len(rows) < 20 else None)
        if first == last:
            break
    ax.set(xlabel="block input (0 = first block, last = head)", ylabel="||dL/dx||", yscale="log", title=title)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    return fig
