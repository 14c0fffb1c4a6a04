"""Every number against its noise: per-net mean, sample sd and n, and paired differences with
a t confidence interval.

For the same seed, plain-d and resnet-d start from identical weights and see the same batches
(and so do nets of different depths, data-wise), so two nets are compared *paired by seed*: the
difference is taken seed by seed and the interval is that of the mean difference, which is
narrower than comparing two independent means whenever the seeds' luck is shared. Everything
here works on the tidy ``runs`` frame of :mod:`analysis.runs` and on any numeric column of it
(final errors, ``diag_*`` diagnostics, minutes), so new per-run numbers need no new code.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pandas as pd
from scipy import stats as sps

LEVEL = 0.95
ERROR_NUMBERS = ("train_error", "test_error", "val_error")
DIAG_COLUMN = "diag_"  # runs-frame columns of the ``diag/*`` MLflow metrics


def numbers_of(runs: pd.DataFrame) -> list[str]:
    """The per-run numbers worth a mean and sd: final errors, then every ``diag_*`` column."""
    return [c for c in ERROR_NUMBERS if c in runs] + sorted(c for c in runs if c.startswith(DIAG_COLUMN))


def mean_sd_n(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, sample sd (ddof=1; NaN for fewer than two values) and count of the finite values."""
    v = pd.to_numeric(pd.Series(list(values), dtype=object), errors="coerce").astype(float)
    v = v[np.isfinite(v)]
    n = len(v)
    return (float(v.mean()) if n else math.nan, float(v.std(ddof=1)) if n > 1 else math.nan, n)


def per_net(runs: pd.DataFrame, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per net: model, arch, depth, and ``<c>_mean``, ``<c>_sd``, ``<c>_n`` for each
    column ``c`` (default: :func:`numbers_of`). Plain first, then residual, each by depth."""
    columns = list(columns) if columns is not None else numbers_of(runs)
    rows = []
    for model, g in runs.groupby("model", sort=False):
        row = {"model": model, "arch": g["arch"].iloc[0], "depth": g["depth"].iloc[0], "n_runs": len(g)}
        for c in columns:
            row[f"{c}_mean"], row[f"{c}_sd"], row[f"{c}_n"] = mean_sd_n(g[c])
        rows.append(row)
    return net_order(pd.DataFrame(rows))


def net_order(df: pd.DataFrame) -> pd.DataFrame:
    """Plain nets first, then residual, each by depth (the report's and the paper's order)."""
    if df.empty:
        return df
    key = (df["arch"] != "plain").astype(int) * 10_000 + df["depth"].astype(int)
    return df.assign(_k=key).sort_values("_k", kind="stable").drop(columns="_k").reset_index(drop=True)


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values with a two-sided t interval (n-1 degrees of freedom); no interval for n < 2."""

    mean: float
    sd: float
    n: int
    low: float = math.nan
    high: float = math.nan
    level: float = LEVEL

    @property
    def has_interval(self) -> bool:
        return self.n >= 2 and math.isfinite(self.low) and math.isfinite(self.high)

    @property
    def clear(self) -> bool:
        """The interval excludes 0 (a direction may be stated). False without an interval."""
        return self.has_interval and (self.low > 0 or self.high < 0)


def t_interval(values: Iterable[float], level: float = LEVEL) -> Interval:
    """``mean ± t_{(1+level)/2, n-1} · sd / sqrt(n)`` of the finite ``values``."""
    mean, sd, n = mean_sd_n(values)
    if n < 2:
        return Interval(mean, sd, n, level=level)
    half = float(sps.t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, sd, n, mean - half, mean + half, level)


@dataclass(frozen=True)
class Paired:
    """``a`` minus ``b`` on ``column``, matched by seed: the difference's interval and both nets'
    means over the same seeds (so the means and the difference agree)."""

    a: str
    b: str
    column: str
    diff: Interval
    a_mean: float
    b_mean: float
    seeds: tuple[int, ...]


def paired(runs: pd.DataFrame, a: str, b: str, column: str, level: float = LEVEL) -> Paired | None:
    """Net ``a`` minus net ``b`` seed by seed on ``column``; None when no seed has both numbers."""
    def by_seed(model: str) -> pd.Series:
        g = runs[runs["model"] == model]
        return pd.to_numeric(g.set_index(g["seed"].astype(int))[column], errors="coerce")

    both = pd.concat({"a": by_seed(a), "b": by_seed(b)}, axis=1, join="inner").dropna().sort_index()
    if both.empty:
        return None
    return Paired(a, b, column, t_interval(both["a"] - both["b"], level), float(both["a"].mean()),
                  float(both["b"].mean()), tuple(int(s) for s in both.index))


def comparisons(runs: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(kind, a, b) of every paired comparison the study supports: ``plain-resnet`` (plain-d minus
    resnet-d at each depth with both) and ``deep-shallow`` (each deeper minus each shallower net
    of one architecture)."""
    nets = net_order(runs.drop_duplicates("model")[["model", "arch", "depth"]])
    out = []
    for depth, g in nets.groupby("depth", sort=True):
        p, r = g[g["arch"] == "plain"], g[g["arch"] != "plain"]
        if len(p) == 1 and len(r) == 1:
            out.append(("plain-resnet", p["model"].iloc[0], r["model"].iloc[0]))
    for _arch, g in nets.groupby(nets["arch"] != "plain", sort=True):
        g = g.sort_values("depth")
        for (_, shallow), (_, deep) in combinations(g.iterrows(), 2):
            if deep["depth"] > shallow["depth"]:
                out.append(("deep-shallow", deep["model"], shallow["model"]))
    return out


def paired_differences(runs: pd.DataFrame, columns: Sequence[str] | None = None,
                       level: float = LEVEL) -> pd.DataFrame:
    """Every comparison of :func:`comparisons` on every column: kind, a, b, column, mean
    difference, sd, n, low, high (NaN for one seed), a_mean, b_mean, seeds."""
    columns = list(columns) if columns is not None else numbers_of(runs)
    rows = []
    for kind, a, b in comparisons(runs):
        for c in columns:
            p = paired(runs, a, b, c, level)
            if p is not None:
                d = p.diff
                rows.append({"kind": kind, "a": a, "b": b, "column": c, "mean_diff": d.mean, "sd_diff": d.sd,
                             "n": d.n, "low": d.low, "high": d.high, "a_mean": p.a_mean, "b_mean": p.b_mean,
                             "seeds": list(p.seeds)})
    cols = ["kind", "a", "b", "column", "mean_diff", "sd_diff", "n", "low", "high", "a_mean", "b_mean", "seeds"]
    return pd.DataFrame(rows, columns=cols)


def within_two_sd(value: float, mean: float, sd: float, n: int) -> bool | None:
    """Does ``value`` lie in ``mean ± 2 sd``? None when there is no sd (one seed)."""
    if n < 2 or not math.isfinite(sd):
        return None
    return mean - 2 * sd <= value <= mean + 2 * sd
