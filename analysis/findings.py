"""Summary sentences computed from the numbers, never written in advance.

Each function takes plain DataFrames (the tidy ``runs`` frame, the probe tables) and returns
a list of sentences; a finding the data cannot support (e.g. only one plain depth) yields no
sentence. Two nets are compared paired by seed (:mod:`analysis.stats`): the mean difference with
its 95 % t interval; a direction ("trains worse") is stated only when the interval excludes 0,
otherwise the sentence says "no clear difference"; one seed gives the difference and says so.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .anchors import Anchor
from .runs import display_name, shared_milestones, shared_param
from .stats import Interval, Paired, comparisons, paired, per_net, within_two_sd

METRIC_WORDS = {"train_error": "training error", "test_error": "test error", "val_error": "validation error"}


def pct(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.2f} %"


def compare(a: float, b: float) -> str:
    """'higher' / 'lower' / 'the same' for a against b (equal to 1e-9)."""
    if abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b)):
        return "the same"
    return "higher" if a > b else "lower"


def one_seed_everywhere(runs: pd.DataFrame) -> bool:
    """No net has a second seed: the summary says so once (``single_seed_finding``)."""
    return not runs.empty and bool((runs.groupby("model")["run_id"].nunique() <= 1).all())


def interval_text(d: Interval) -> str:
    """'95 % CI 3.20 to 5.00, 3 seeds' or 'one seed, no interval'."""
    if not d.has_interval:
        return "one seed, no interval" if d.n <= 1 else f"{d.n} seeds, no interval"
    return f"{d.level * 100:g} % CI {d.low:.2f} to {d.high:.2f}, {d.n} seeds"


# how a net that is worse / better than another reads, per number
_WORSE = {"train_error": ("trains worse than", "trains better than"),
          "test_error": ("has higher test error than", "has lower test error than"),
          "val_error": ("has higher validation error than", "has lower validation error than")}


def difference_sentence(p: Paired) -> str:
    """'plain-56 trains worse than plain-20 by 4.10 points (95 % CI 3.20 to 5.00, 3 seeds; training
    error 6.40 % vs 2.30 %)'. An interval containing 0 states no direction: 'no clear difference'."""
    a, b, d, what = display_name(p.a), display_name(p.b), p.diff, METRIC_WORDS[p.column]
    means = f"{what} {pct(p.a_mean)} vs {pct(p.b_mean)}"
    if _direction(p) is None:
        return f"{a} and {b} show no clear difference in {what}: {d.mean:+.2f} points ({interval_text(d)}; " \
               f"{pct(p.a_mean)} vs {pct(p.b_mean)})"
    verb = _WORSE[p.column][0 if d.mean > 0 else 1]
    return f"{a} {verb} {b} by {abs(d.mean):.2f} points ({interval_text(d)}; {means})"


def _test_clause(p: Paired | None) -> str:
    """'; on the test set plain-56 is worse by 1.00 points (...)' or '; no clear difference on the test set: ...'."""
    if p is None:
        return ""
    d = p.diff
    means = f"test error {pct(p.a_mean)} vs {pct(p.b_mean)}"
    if _direction(p) is None:
        return f"; no clear difference on the test set: {d.mean:+.2f} points ({interval_text(d)}; {means})"
    return (f"; on the test set {display_name(p.a)} is {_direction(p)} by {abs(d.mean):.2f} points "
            f"({interval_text(d)}; {means})")


def _direction(p: Paired) -> str | None:
    """'worse' / 'better' where a direction may be stated (a clear interval, or one seed, which
    the sentence says); None for no clear difference."""
    d = p.diff
    if (d.has_interval and not d.clear) or compare(d.mean, 0.0) == "the same":
        return None
    return "worse" if d.mean > 0 else "better"


def depth_findings(runs: pd.DataFrame) -> list[str]:
    """Deepest minus shallowest net of each architecture, paired by seed, on final training error."""
    out = []
    for arch in ("plain", "residual"):
        nets = runs[(runs["arch"] == arch) & runs["train_error"].notna()].drop_duplicates("model").sort_values("depth")
        if nets["depth"].nunique() < 2:
            continue
        deep, shallow = nets["model"].iloc[-1], nets["model"].iloc[0]
        p = paired(runs, deep, shallow, "train_error")
        if p is None:
            out.append(f"{display_name(deep)} and {display_name(shallow)} share no seed: not compared.")
            continue
        test = paired(runs, deep, shallow, "test_error") if "test_error" in runs else None
        word = _direction(p)
        out.append(difference_sentence(p) + _test_clause(test) + (_depth_reading(arch, word) if word else "") + ".")
    return out


def curve_degradation(runs: pd.DataFrame, curves: pd.DataFrame) -> list[str]:
    """He et al. Fig. 6 (left) read curve by curve: in each seed, is the deepest plain net's training
    error above the shallowest plain net's at every evaluation after the first lr drop?

    Training error at an evaluation is the logging window that ends there (a point at step t
    describes the iterations before t, so only points after the drop count). One sentence saying
    in how many seeds it holds, and where it fails.
    """
    plain = runs[runs["arch"] == "plain"].drop_duplicates("model").sort_values("depth")
    milestones = shared_milestones(runs)
    if plain["depth"].nunique() < 2 or not milestones or curves.empty:
        return []
    drop = milestones[0]
    deep, shallow = plain["model"].iloc[-1], plain["model"].iloc[0]
    tr = curves[curves["metric"] == "train/error"].set_index(["model", "seed", "iteration"])["value"]
    evals = curves[(curves["metric"] == "test/error") & (curves["iteration"] > drop)]
    held, failed, n = 0, [], 0
    for seed in sorted(set(runs.loc[runs["model"] == deep, "seed"]) & set(runs.loc[runs["model"] == shallow, "seed"])):
        steps = sorted(set(evals.loc[evals["model"] == deep, "iteration"]) & set(evals.loc[evals["model"] == shallow, "iteration"])
                       & {i for m, s, i in tr.index if s == seed})
        pairs = [(i, tr.get((deep, seed, i)), tr.get((shallow, seed, i))) for i in steps]
        pairs = [(i, d, s) for i, d, s in pairs if d is not None and s is not None]
        if not pairs:
            continue
        n += 1
        below = [i for i, d, s in pairs if not d > s]
        held += not below
        if below:
            failed.append(f"seed {seed}: not above at iteration{'s' if len(below) > 1 else ''} "
                          + ", ".join(f"{i:,}" for i in below))
    if not n:
        return []
    what = (f"Curve by curve (He et al. Fig. 6, left): {display_name(deep)}'s training error is above "
            f"{display_name(shallow)}'s at every evaluation after the first lr drop (iteration {drop:,}) "
            f"in {held} of {n} seed{'s' if n > 1 else ''}")
    return [what + (f" ({'; '.join(failed)})." if failed else ".")]


def scale_banner(runs: pd.DataFrame, scale: str | None) -> str | None:
    """For a CPU-scale study: what was shortened, what it can show, and, from the numbers, whether
    the deeper ResNet trains better than the shallower one (He et al. Fig. 6, right) at this length."""
    if scale != "cpu":
        return None
    its, batch = shared_param(runs, "iterations"), shared_param(runs, "batch_size")
    train_size, test_size = shared_param(runs, "train_size"), shared_param(runs, "test_size")
    length = f"{int(its):,} iterations at batch {batch}" if its and batch else "a short schedule"
    if its and batch and train_size:
        length += (f" ({int(its) * int(batch) / int(train_size):.1f} passes over a {int(train_size):,}-image "
                   "training subset)")
    test = f"; test error on a fixed {int(test_size):,}-image subset of the test set" if test_size else ""
    text = (f"CPU scale: a shortened study for a machine without CUDA, {length}{test}, against the paper's 64k "
            "iterations. It shows the early part of training, where a deep plain net lags most.")
    res = runs[runs["arch"] == "residual"].drop_duplicates("model").sort_values("depth")
    if res["depth"].nunique() >= 2:
        deep, shallow = res["model"].iloc[-1], res["model"].iloc[0]
        p = paired(runs, deep, shallow, "train_error")
        word = _direction(p) if p is not None else None
        errors = f"{pct(p.a_mean)} vs {pct(p.b_mean)} final training error" if p is not None else ""
        if word == "better":
            text += f" At this length {display_name(deep)} already trains better than {display_name(shallow)} ({errors}), as in Fig. 6 (right)."
        elif p is not None:
            how = (f"trains worse than {display_name(shallow)}" if word == "worse"
                   else f"and {display_name(shallow)} show no clear difference")
            text += (f" At this length {display_name(deep)} {how} ({errors}), while in the paper's Fig. 6 (right) "
                     "the deeper ResNet trains clearly better: that needs the full schedule (`--scale full`, a GPU). "
                     "Here, compare plain and residual at the same depth, not ResNet depths with each other.")
    return text


def _depth_reading(arch: str, word: str) -> str:
    """What deeper-vs-shallower training error means against He et al."""
    if arch == "plain":
        return (" — consistent with the degradation problem of He et al. Sec. 4.2 (the deeper plain net trains worse)"
                if word == "worse" else " — no degradation at these depths and this training length")
    return (" — the deeper ResNet trains better, as in He et al. Fig. 6 (right)" if word == "better"
            else " — unlike He et al. Fig. 6 (right), the deeper ResNet does not train better here")


def residual_vs_plain(runs: pd.DataFrame) -> list[str]:
    """At each depth with both nets: plain-d minus resnet-d, paired by seed, on final training (and test) error."""
    out = []
    for kind, plain, res in comparisons(runs):
        if kind != "plain-resnet":
            continue
        p = paired(runs, plain, res, "train_error")
        if p is None:
            continue
        test = paired(runs, plain, res, "test_error") if "test_error" in runs else None
        depth = int(runs.loc[runs["model"] == plain, "depth"].iloc[0])
        out.append(f"At depth {depth}, {difference_sentence(p)}{_test_clause(test)}.")
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


def anchor_findings(runs: pd.DataFrame, anchor: Anchor | None) -> list[str]:
    """Measured against published error for every net the anchor covers, and whether the published
    number lies inside the net's mean ± 2 sd over seeds."""
    if anchor is None:
        return []
    nets = per_net(runs, [c for c in ("train_error", "test_error") if c in runs]).set_index("model")
    parts = []
    for metric, table in (("test_error", anchor.test_error), ("train_error", anchor.train_error)):
        for model, ref in table.items():
            if model not in nets.index or not nets.loc[model, f"{metric}_n"]:
                continue
            mean, sd, n = (float(nets.loc[model, f"{metric}_{k}"]) for k in ("mean", "sd", "n"))
            inside = within_two_sd(ref, mean, sd, int(n))
            if inside is None:
                where = f"{pct(mean)} (one seed: no sd) vs {ref:g} % ({mean - ref:+.2f} points)"
            else:
                where = (f"{mean:.2f} ± {sd:.2f} % over {int(n)} seeds vs {ref:g} %: "
                         f"{'inside' if inside else 'outside'} mean ± 2 sd ({mean - 2 * sd:.2f} to {mean + 2 * sd:.2f})")
            parts.append(f"{display_name(model)} {METRIC_WORDS[metric]} {where}")
    if not parts:
        return []
    return [f"Against {anchor.label}: {'; '.join(parts)}."]


def single_seed_finding(runs: pd.DataFrame) -> list[str]:
    """One sentence, once, when no net has a second seed (the comparisons then carry no interval)."""
    if not one_seed_everywhere(runs):
        return []
    return ["Every net was trained with one seed, so no difference below has a confidence interval; "
            "rerun with more seeds before reading small differences."]


def summarize(runs: pd.DataFrame, grad_flow: pd.DataFrame, responses: pd.DataFrame,
              anchor: Anchor | None = None, grad_norm_series: pd.DataFrame | None = None,
              curves: pd.DataFrame | None = None) -> list[str]:
    """Every finding the data supports, in report order, from the tidy ``runs`` frame (one row per run)."""
    weights = weight_grad_ratios(grad_norm_series) if grad_norm_series is not None else pd.DataFrame()
    by_curve = curve_degradation(runs, curves) if curves is not None else []
    return (single_seed_finding(runs) + depth_findings(runs) + by_curve + residual_vs_plain(runs)
            + gradient_flow_findings(flow_ratios(grad_flow))
            + weight_grad_findings(weights) + response_findings(responses) + anchor_findings(runs, anchor))
