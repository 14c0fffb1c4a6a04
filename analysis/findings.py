"""Summary sentences computed from the numbers, never written in advance.

Each function takes plain DataFrames (the ``aggregate`` table, the probe tables) and returns
a list of sentences; a finding the data cannot support (e.g. only one plain depth) yields no
sentence. Comparatives ("higher", "lower") come from the numbers, so a sentence flips when the
data does, and where seeds allow, a difference smaller than the seed-to-seed spread says so.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .anchors import Anchor
from .runs import display_name

METRIC_WORDS = {"train_error": "training error", "test_error": "test error", "val_error": "validation error"}


def pct(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.2f} %"


def compare(a: float, b: float) -> str:
    """'higher' / 'lower' / 'the same' for a against b (equal to 1e-9)."""
    if abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b)):
        return "the same"
    return "higher" if a > b else "lower"


def _within_spread(a: pd.Series, b: pd.Series, metric: str) -> bool | None:
    """Is the difference of the means smaller than the sum of the two seed stds? None: one seed."""
    na, nb = int(a.get(f"{metric}_n", a.get("n_seeds", 1))), int(b.get(f"{metric}_n", b.get("n_seeds", 1)))
    if na < 2 or nb < 2:
        return None
    diff = abs(float(a[f"{metric}_mean"]) - float(b[f"{metric}_mean"]))
    return diff < float(a[f"{metric}_std"]) + float(b[f"{metric}_std"])


def one_seed_everywhere(agg: pd.DataFrame) -> bool:
    """No net has a second seed: the summary says so once (``single_seed_finding``), not per sentence."""
    return not agg.empty and "n_seeds" in agg and bool((agg["n_seeds"] <= 1).all())


def _spread(a: pd.Series, b: pd.Series, metric: str, *, said_once: bool) -> str:
    """A qualifier on how the difference compares with the seeds' spread ('' for one seed when
    ``said_once``: the summary's first sentence already says every net has one seed)."""
    within = _within_spread(a, b, metric)
    if within is None:
        return "" if said_once else " (one seed for at least one net: no spread estimate)"
    na, nb = int(a[f"{metric}_n"]), int(b[f"{metric}_n"])
    sa, sb = float(a[f"{metric}_std"]), float(b[f"{metric}_std"])
    where = "within" if within else "beyond"
    return f" ({where} the seed-to-seed spread: std {sa:.2f} and {sb:.2f} points over {na} and {nb} seeds)"


def _has(row: pd.Series, metric: str) -> bool:
    v = row.get(f"{metric}_mean")
    return v is not None and not pd.isna(v)


def _pair(a: pd.Series, b: pd.Series, metric: str) -> str:
    """'higher training error than plain-20: 4.10 % vs 2.30 %'."""
    va, vb = float(a[f"{metric}_mean"]), float(b[f"{metric}_mean"])
    return f"{compare(va, vb)} {METRIC_WORDS[metric]} than {display_name(b['model'])}: {pct(va)} vs {pct(vb)}"


def _test_clause(a: pd.Series, b: pd.Series) -> str:
    if not (_has(a, "test_error") and _has(b, "test_error")):
        return ""
    va, vb = float(a["test_error_mean"]), float(b["test_error_mean"])
    return f", and {compare(va, vb)} test error: {pct(va)} vs {pct(vb)}"


def depth_findings(agg: pd.DataFrame) -> list[str]:
    """Deepest against shallowest net of each architecture, on final training error."""
    out, said_once = [], one_seed_everywhere(agg)
    for arch in ("plain", "residual"):
        g = agg[(agg["arch"] == arch)].dropna(subset=["train_error_mean"]).sort_values("depth")
        if g["depth"].nunique() < 2:
            continue
        shallow, deep = g.iloc[0], g.iloc[-1]
        word = compare(float(deep["train_error_mean"]), float(shallow["train_error_mean"]))
        s = (f"{display_name(deep['model'])} ends with {_pair(deep, shallow, 'train_error')}"
             f"{_spread(deep, shallow, 'train_error', said_once=said_once)}{_test_clause(deep, shallow)}")
        # a difference inside the seed-to-seed spread supports no reading either way
        out.append(s + ("" if _within_spread(deep, shallow, "train_error") else _depth_reading(arch, word)) + ".")
    return out


def _depth_reading(arch: str, word: str) -> str:
    """What deeper-vs-shallower training error means against He et al."""
    if arch == "plain":
        return (" — consistent with the degradation problem of He et al. Sec. 4.2 (the deeper plain net trains worse)"
                if word == "higher" else " — no degradation at these depths and this training length")
    return (" — the deeper ResNet trains better, as in He et al. Fig. 6 (right)" if word == "lower"
            else " — unlike He et al. Fig. 6 (right), the deeper ResNet does not train better here")


def residual_vs_plain(agg: pd.DataFrame) -> list[str]:
    """At each depth with both nets: the ResNet's final training (and test) error against the plain net's."""
    out, said_once = [], one_seed_everywhere(agg)
    for depth in sorted(agg["depth"].unique()):
        d = agg[agg["depth"] == depth]
        plain, res = d[d["arch"] == "plain"], d[d["arch"] == "residual"]
        if plain.empty or res.empty or not (_has(plain.iloc[0], "train_error") and _has(res.iloc[0], "train_error")):
            continue
        p, r = plain.iloc[0], res.iloc[0]
        s = (f"At depth {depth}, {display_name(r['model'])} ends with {_pair(r, p, 'train_error')}"
             f"{_spread(r, p, 'train_error', said_once=said_once)}{_test_clause(r, p)}.")
        out.append(s)
    return out


def flow_ratios(grad_flow: pd.DataFrame) -> pd.DataFrame:
    """Per run, at init (first probe point) and end (last): ||dL/dx|| at the first block's input
    divided by that at the head input; then mean over seeds per model.

    Columns: model, arch, depth, moment, iteration, ratio, first, head, n.
    """
    cols = ["model", "arch", "depth", "moment", "iteration", "ratio", "first", "head", "n"]
    if grad_flow.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for rid, g in grad_flow.groupby("run_id"):
        its = sorted(g["iteration"].unique())
        for moment, it in (("init", its[0]), ("end", its[-1])) if len(its) > 1 else (("init", its[0]),):
            at = g[g["iteration"] == it]
            first = at.loc[at["layer_index"] == at["layer_index"].min(), "value"].iloc[0]
            head = at.loc[at["layer_index"] == at["layer_index"].max(), "value"].iloc[0]
            rows.append({"run_id": rid, "model": g["model"].iloc[0], "arch": g["arch"].iloc[0],
                         "depth": int(g["depth"].iloc[0]), "moment": moment, "iteration": int(it),
                         "first": float(first), "head": float(head), "ratio": float(first) / float(head)})
    df = pd.DataFrame(rows)
    out = (df.groupby(["model", "arch", "depth", "moment"], as_index=False)
           .agg(iteration=("iteration", "max"), ratio=("ratio", "mean"), first=("first", "mean"),
                head=("head", "mean"), n=("run_id", "count")))
    return out[cols]


def ratio_text(r: float) -> str:
    """3 significant figures: 0.0829, 39.2, 7,770 (thousands written out up to a million); '–' if undefined."""
    if r is None or not math.isfinite(r):
        return "–"
    if 1e3 <= abs(r) < 1e6:
        return f"{float(f'{r:.3g}'):,.0f}"
    return f"{r:.3g}"


def _x(r: float) -> str:
    return f"{ratio_text(r)}×"


def _change(r: float) -> str:
    """'grows 30×' / 'shrinks to 0.1×' / 'keeps its size (1×)' for a ratio of gradient norms."""
    return f"grows {_x(r)}" if r > 1 else f"shrinks to {_x(r)}" if r < 1 else "keeps its size (1×)"


def gradient_flow_findings(ratios: pd.DataFrame) -> list[str]:
    """The first-block/head ratio of ||dL/dx||, plain vs residual at the deepest depth with both.

    A ratio of 1 means the gradient reaches the input neither amplified nor shrunk; the net
    whose ratio is closer to 1 (in log terms: 2x and 0.5x are equally far) propagates the
    gradient more evenly. Which net that is comes from the numbers, at each moment.
    """
    if ratios.empty:
        return []
    both = [d for d in sorted(ratios["depth"].unique())
            if set(ratios.loc[ratios["depth"] == d, "arch"]) >= {"plain", "residual"}]
    if not both:
        return []
    depth = both[-1]
    d = ratios[ratios["depth"] == depth]
    get = lambda arch, moment: d[(d["arch"] == arch) & (d["moment"] == moment)]  # noqa: E731
    plain_name = display_name(d.loc[d["arch"] == "plain", "model"].iloc[0])
    res_name = display_name(d.loc[d["arch"] == "residual", "model"].iloc[0])
    parts, closer = [], []  # closer: (moment words, net whose ratio is closer to 1), in moment order
    for moment, words in (("init", "at init"), ("end", "at the end of training")):
        p, r = get("plain", moment), get("residual", moment)
        if p.empty or r.empty:
            continue
        rp, rr = float(p["ratio"].iloc[0]), float(r["ratio"].iloc[0])
        it = int(max(p["iteration"].iloc[0], r["iteration"].iloc[0]))
        parts.append(f"{words} (iteration {it:,}) it {_change(rp)} in {plain_name} and {_change(rr)} in {res_name}")
        if min(rp, rr) > 0:
            dp, dr = abs(math.log(rp)), abs(math.log(rr))
            if compare(dp, dr) != "the same":
                closer.append((words, res_name if dr < dp else plain_name))
    if not parts:
        return []
    s = (f"Gradient flow at depth {depth}, ||dL/dx|| from the head input back to the first block's input: "
         f"{'; '.join(parts)}.")
    lead = "The ratio is closer to 1 (the gradient reaches the input more evenly)"
    if closer and len({name for _, name in closer}) == 1:
        s += f" {lead} in {closer[0][1]} {' and '.join(w for w, _ in closer)}."
    elif closer:
        s += f" {lead} {', but '.join(f'{w} in {name}' for w, name in closer)}."
    return [s]


VANISH = 0.1  # first/last conv weight-gradient ratio below which we call the first layer's gradient vanished


def weight_grad_ratios(series: pd.DataFrame) -> pd.DataFrame:
    """Per model: median over training of ||dL/dW|| of the first conv divided by that of the last conv
    (main path, no projection shortcuts), mean over seeds. Columns: model, arch, depth, ratio, n."""
    cols = ["model", "arch", "depth", "ratio", "n"]
    if series.empty:
        return pd.DataFrame(columns=cols)
    w = series[(series["group"] == "weight") & (series["layer"] != "fc")
               & ~series["layer"].str.contains("shortcut", regex=False)]
    rows = []
    for rid, g in w.groupby("run_id"):
        lo, hi = g["layer_index"].min(), g["layer_index"].max()
        first = g[g["layer_index"] == lo].set_index("iteration")["value"]
        last = g[g["layer_index"] == hi].set_index("iteration")["value"]
        ratio = (first / last).replace([np.inf, -np.inf], np.nan).dropna()
        if len(ratio):
            rows.append({"run_id": rid, "model": g["model"].iloc[0], "arch": g["arch"].iloc[0],
                         "depth": int(g["depth"].iloc[0]), "ratio": float(ratio.median())})
    if not rows:
        return pd.DataFrame(columns=cols)
    return (pd.DataFrame(rows).groupby(["model", "arch", "depth"], as_index=False)
            .agg(ratio=("ratio", "mean"), n=("run_id", "count")))[cols]


def weight_grad_findings(ratios: pd.DataFrame) -> list[str]:
    """Do weight gradients shrink towards the input? Plain vs ResNet at the deepest depth with both."""
    both = [d for d in sorted(ratios["depth"].unique())
            if set(ratios.loc[ratios["depth"] == d, "arch"]) >= {"plain", "residual"}] if len(ratios) else []
    if not both:
        return []
    d = ratios[ratios["depth"] == both[-1]]
    p, r = d[d["arch"] == "plain"].iloc[0], d[d["arch"] == "residual"].iloc[0]
    s = (f"Weight gradients at depth {both[-1]}: the first conv layer's ||dL/dW|| relative to the last conv "
         f"layer's (median over training) is {_x(p['ratio'])} in {display_name(p['model'])} and {_x(r['ratio'])} in "
         f"{display_name(r['model'])}")
    if p["ratio"] >= VANISH:
        s += (f"; the plain net's first-layer weight gradient stays within {1 / VANISH:g}× of its last layer's, so it "
              "does not vanish (He et al. Sec. 4.1 attribute this to BN)")
    else:
        s += (f"; the plain net's first-layer weight gradient is more than {1 / VANISH:g}× smaller than its last "
              "layer's: here weight gradients do shrink towards the input")
    return [s + "."]


def response_findings(responses: pd.DataFrame) -> list[str]:
    """Mean response std over layers at the end of training, ResNet vs plain at the deepest matched depth."""
    if responses.empty:
        return []
    last = responses.groupby("run_id")["iteration"].transform("max")
    end = responses[responses["iteration"] == last]
    per_run = end.groupby(["run_id", "model", "arch", "depth"], as_index=False)["value"].mean()
    per_model = per_run.groupby(["model", "arch", "depth"], as_index=False)["value"].mean()
    both = [d for d in sorted(per_model["depth"].unique())
            if set(per_model.loc[per_model["depth"] == d, "arch"]) >= {"plain", "residual"}]
    if not both:
        return []
    d = per_model[per_model["depth"] == both[-1]]
    p, r = d[d["arch"] == "plain"].iloc[0], d[d["arch"] == "residual"].iloc[0]
    word = {"lower": "smaller", "higher": "larger", "the same": "the same size as"}[compare(r["value"], p["value"])]
    s = (f"{display_name(r['model'])}'s layer responses (std of each 3×3 conv's BN output, mean over layers, end "
         f"of training) are {word}{'' if word.startswith('the same') else ' than'} {display_name(p['model'])}'s: "
         f"{r['value']:.3g} vs {p['value']:.3g}")
    s += (", as He et al. Fig. 7 reports for ResNets." if word == "smaller"
          else ", unlike the smaller ResNet responses in He et al. Fig. 7.")
    return [s]


def anchor_findings(agg: pd.DataFrame, anchor: Anchor | None) -> list[str]:
    """Measured minus published error for every net the anchor covers."""
    if anchor is None:
        return []
    parts = []
    for metric, table in (("test_error", anchor.test_error), ("train_error", anchor.train_error)):
        for model, ref in table.items():
            row = agg[agg["model"] == model]
            if row.empty or not _has(row.iloc[0], metric):
                continue
            v = float(row.iloc[0][f"{metric}_mean"])
            parts.append(f"{display_name(model)} {METRIC_WORDS[metric]} {pct(v)} vs {ref:g} % ({v - ref:+.2f} points)")
    if not parts:
        return []
    return [f"Against {anchor.label}: {'; '.join(parts)}."]


def single_seed_finding(agg: pd.DataFrame) -> list[str]:
    """One sentence, once, when no net has a second seed (the comparisons then carry no spread)."""
    if not one_seed_everywhere(agg):
        return []
    return ["Every net was trained with one seed, so no difference below can be set against the seed-to-seed "
            "spread; rerun with more seeds before reading small differences."]


def summarize(agg: pd.DataFrame, grad_flow: pd.DataFrame, responses: pd.DataFrame,
              anchor: Anchor | None = None, grad_norm_series: pd.DataFrame | None = None) -> list[str]:
    """Every finding the data supports, in report order."""
    weights = weight_grad_ratios(grad_norm_series) if grad_norm_series is not None else pd.DataFrame()
    return (single_seed_finding(agg) + depth_findings(agg) + residual_vs_plain(agg)
            + gradient_flow_findings(flow_ratios(grad_flow))
            + weight_grad_findings(weights) + response_findings(responses) + anchor_findings(agg, anchor))
