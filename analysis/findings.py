"""Summary sentences computed from the numbers, never written in advance.

Each function takes plain DataFrames (the tidy ``runs`` frame, the probe tables) and returns
a list of sentences; a finding the data cannot support (e.g. only one plain depth) yields no
sentence. Two nets are compared paired by seed (:mod:`analysis.stats`): the mean difference with
its 95 % t interval; a direction ("trains worse") is stated only when the interval excludes 0,
otherwise the sentence says "no clear difference"; one seed gives the difference and says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from resnet_lab import plateau

from .anchors import DATASETS, PAPER, Anchor, Recipe
from .runs import display_name, shared_milestones, shared_param
from .numbers import fmt
from .stats import Interval, Paired, comparisons, paired, per_net, within_two_sd

METRIC_WORDS = {"train_error": "training error", "test_error": "test error", "val_error": "validation error"}


def pct(x: float, like: tuple[float, ...] = ()) -> str:
    """'25.2 %' (:func:`analysis.numbers.fmt`), with the decimals of ``like``; 'n/a' without a value."""
    return "n/a" if x is None or not math.isfinite(x) else f"{fmt(x, like=like)} %"


def compare(a: float, b: float) -> str:
    """'higher' / 'lower' / 'the same' for a against b (equal to 1e-9)."""
    if abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b)):
        return "the same"
    return "higher" if a > b else "lower"


def one_seed_everywhere(runs: pd.DataFrame) -> bool:
    """No net has a second seed: the summary says so once (``single_seed_finding``)."""
    return not runs.empty and bool((runs.groupby("model")["run_id"].nunique() <= 1).all())


def interval_text(d: Interval, flip: bool = False) -> str:
    """'95 % CI 3.20 to 5.00, 3 seeds' or 'one seed, no interval'. ``flip``: the interval of minus
    the difference (a sentence that says "better by" reads the difference from the other side),
    with the decimals of the mean."""
    if not d.has_interval:
        return "one seed, no interval" if d.n <= 1 else f"{d.n} seeds, no interval"
    low, high = (-d.high, -d.low) if flip else (d.low, d.high)
    group = (d.mean, low, high)
    return f"{d.level * 100:g} % CI {fmt(low, like=group)} to {fmt(high, like=group)}, {d.n} seeds"


def _points(p: Paired) -> str:
    """'by 1.13 points (95 % CI 0.62 to 1.65, 3 seeds' : the size of a stated direction and its
    interval, both from that direction's side (no sign: the verb carries it)."""
    d = p.diff
    return f"by {fmt(abs(d.mean), like=(d.low, d.high))} points ({interval_text(d, flip=d.mean < 0)}"


def _signed(p: Paired) -> str:
    """'+0.05 points (95 % CI -0.60 to 0.70, 3 seeds' : a minus b where no direction is stated."""
    d = p.diff
    return f"{fmt(d.mean, like=(d.low, d.high), sign=True)} points ({interval_text(d)}"


def _means(p: Paired) -> str:
    """'34.0 % vs 24.9 %': both nets' means over the paired seeds, with one number of decimals."""
    return f"{pct(p.a_mean, (p.b_mean,))} vs {pct(p.b_mean, (p.a_mean,))}"


# how a net that is worse / better than another reads, per number
_WORSE = {"train_error": ("trains worse than", "trains better than"),
          "test_error": ("has higher test error than", "has lower test error than"),
          "val_error": ("has higher validation error than", "has lower validation error than")}


def difference_sentence(p: Paired) -> str:
    """'plain-56 trains worse than plain-20 by 4.10 points (95 % CI 3.20 to 5.00, 3 seeds; training
    error 6.40 % vs 2.30 %)'; 'better by' gives the interval from its own side. An interval
    containing 0 states no direction: 'no clear difference'."""
    a, b, d, what = display_name(p.a), display_name(p.b), p.diff, METRIC_WORDS[p.column]
    if _direction(p) is None:
        return f"{a} and {b} show no clear difference in {what}: {_signed(p)}; {_means(p)})"
    verb = _WORSE[p.column][0 if d.mean > 0 else 1]
    return f"{a} {verb} {b} {_points(p)}; {what} {_means(p)})"


def _test_clause(p: Paired | None) -> str:
    """'; on the test set plain-56 is worse by 1.00 points (...)' or '; no clear difference on the test set: ...'."""
    if p is None:
        return ""
    means = f"test error {_means(p)}"
    if _direction(p) is None:
        return f"; no clear difference on the test set: {_signed(p)}; {means})"
    return f"; on the test set {display_name(p.a)} is {_direction(p)} {_points(p)}; {means})"


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


@dataclass(frozen=True)
class Check:
    """One of He et al. Fig. 6's training facts, read from the runs: ``holds`` (None: cannot tell)
    and the sentence that says it with its numbers."""

    name: str
    holds: bool | None
    sentence: str


def fig6_nets(runs: pd.DataFrame) -> tuple[str, str, str, str] | None:
    """(deep plain, shallow plain, deep ResNet, shallow ResNet): the deepest and shallowest depths
    with both architectures; None below two such depths."""
    both = sorted(int(d) for d, g in runs.groupby("depth") if {"plain", "residual"} <= set(g["arch"]))
    if len(both) < 2:
        return None
    name = lambda arch, d: runs.loc[(runs["arch"] == arch) & (runs["depth"] == d), "model"].iloc[0]  # noqa: E731
    return name("plain", both[-1]), name("plain", both[0]), name("residual", both[-1]), name("residual", both[0])


def _by_seed(runs: pd.DataFrame, a: str, b: str) -> list[tuple[int, float, float]]:
    """(seed, a's final training error, b's) for every seed both nets have."""
    get = lambda m: runs[runs["model"] == m].set_index("seed")["train_error"].dropna()  # noqa: E731
    ea, eb = get(a), get(b)
    return [(int(sd), float(ea[sd]), float(eb[sd])) for sd in sorted(set(ea.index) & set(eb.index))]


def _seed_list(rows: list[tuple[int, float, float]]) -> str:
    return "; ".join(f"seed {sd}: {pct(x, (y,))} vs {pct(y, (x,))}" for sd, x, y in rows)


def _above(runs: pd.DataFrame, a: str, b: str, name: str) -> Check | None:
    """a's final training error above b's in every seed, with a paired interval that excludes 0."""
    rows, p = _by_seed(runs, a, b), paired(runs, a, b, "train_error")
    if not rows or p is None:
        return None
    above = [sd for sd, x, y in rows if x > y]
    d = p.diff
    holds = len(above) == len(rows) and (d.low > 0 if d.has_interval else None)
    size = f"difference {_signed(p)})"
    text = (f"{display_name(a)}'s final training error is above {display_name(b)}'s in {len(above)} of {len(rows)} "
            f"seed{'s' if len(rows) > 1 else ''} ({_seed_list(rows)}); {size}")
    if holds:
        text += ": holds"
    elif holds is None:
        text += ": one seed, so whether it holds in general cannot be told"
    else:
        why = [f"not above in seed{'s' if len(rows) - len(above) > 1 else ''} "
               + ", ".join(str(sd) for sd, x, y in rows if not x > y)] if len(above) < len(rows) else []
        why += ["the interval does not exclude 0"] if d.has_interval and not d.low > 0 else []
        text += f": does not hold ({'; '.join(why)})"
    return Check(name, holds, text + ".")


def _at_most_about(runs: pd.DataFrame, a: str, b: str, name: str) -> Check | None:
    """a's final training error at most about b's: not clearly above it (the paired interval does
    not lie above 0; with one seed, not above)."""
    rows, p = _by_seed(runs, a, b), paired(runs, a, b, "train_error")
    if not rows or p is None:
        return None
    d = p.diff
    holds = not d.low > 0 if d.has_interval else d.mean <= 0
    text = (f"{display_name(a)}'s final training error is at most about {display_name(b)}'s "
            f"({_seed_list(rows)}; difference {_signed(p)})): ")
    text += ("holds" if holds else "does not hold, it is clearly above") + (
        ", with one seed" if not d.has_interval else "")
    return Check(name, holds, text + ".")


def fig6_checks(runs: pd.DataFrame) -> list[Check]:
    """He et al. Fig. 6's three training facts, seed by seed: the deep plain net trains worse than the
    shallow plain net (degradation) and than the ResNet of its depth, and the deep ResNet trains at
    least about as well as the shallow one. The summary and the scale banner both read these."""
    nets = fig6_nets(runs)
    if nets is None:
        return []
    deep_p, shallow_p, deep_r, shallow_r = nets
    checks = [_above(runs, deep_p, shallow_p, "degradation"), _above(runs, deep_p, deep_r, "shortcut"),
              _at_most_about(runs, deep_r, shallow_r, "deep ResNet")]
    return [c for c in checks if c is not None]


def fig6_verdict(runs: pd.DataFrame) -> str | None:
    """One sentence: do all of Fig. 6's training facts hold here, and if not, which do not."""
    checks, nets = fig6_checks(runs), fig6_nets(runs)
    if not checks or nets is None:
        return None
    names = _and([display_name(m) for m in (nets[1], nets[0], nets[3], nets[2])])
    if all(c.holds for c in checks):
        return f"All {len(checks)} of He et al. Fig. 6's training facts hold for {names} in these runs."
    failed = [c.name for c in checks if c.holds is False]
    unknown = [c.name for c in checks if c.holds is None]
    held = [c.name for c in checks if c.holds]
    parts = ([f"{_and(failed)} {'does' if len(failed) == 1 else 'do'} not hold"] if failed else []) + (
        [f"{_and(unknown)} cannot be told from one seed"] if unknown else []) + (
        [f"{_and(held)} {'holds' if len(held) == 1 else 'hold'}"] if held else [])
    return f"He et al. Fig. 6's training facts for {names}: {'; '.join(parts)} (see the Summary)."


def fig6_findings(runs: pd.DataFrame) -> list[str]:
    """The summary's Fig. 6 sentences: one per training fact, then the verdict."""
    checks = fig6_checks(runs)
    if not checks:
        return []
    head = "He et al. Fig. 6 in every seed"
    return [f"{head} ({c.name}): {c.sentence}" for c in checks] + [fig6_verdict(runs)]  # type: ignore[list-item]


PLATEAU_HEAD = (f"Plateau (`resnet_lab/plateau.py`: the training loss on a fixed, unaugmented training subset, "
                f"`{plateau.HISTORY_KEY}`, falls by less than {100 * plateau.TOLERANCE:g} % over the last "
                f"{100 * plateau.WINDOW:g} % of iterations)")  # the sentence that says, per net and seed, whether
PLATEAU_COLUMN = "plateau"  # runs column of the ``final/plateau`` metric: 1 reached, 0 not, NaN not measured


def not_at_plateau(runs: pd.DataFrame) -> dict[str, list[int]]:
    """model -> the seeds whose run measured the plateau and did not reach it (empty models left out)."""
    if PLATEAU_COLUMN not in runs:
        return {}
    miss = runs[runs[PLATEAU_COLUMN] == 0]
    return {m: sorted(int(s) for s in g["seed"]) for m, g in miss.groupby("model", sort=False)}


def plateau_label(seeds: list[int], of: int | None = None) -> str:
    """'(not at its plateau in seeds 1, 2)', or '(not at its plateau)' when that is every one of its
    ``of`` seeds: what follows a net's name wherever it is used."""
    if of is not None and len(seeds) >= of:
        return "(not at its plateau)"
    return f"(not at its plateau in seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})"


def plateau_findings(runs: pd.DataFrame) -> list[str]:
    """Per net and seed, whether the run reached its plateau (``resnet_lab.plateau``, logged by
    training as ``final/plateau``)."""
    what = PLATEAU_HEAD
    if PLATEAU_COLUMN not in runs:  # a frame not loaded from a store
        return []
    if runs[PLATEAU_COLUMN].isna().all():
        return [f"{what}: not measured, these runs logged no `{plateau.FINAL_KEY}` (trained before the lab measured it), "
                "so no sentence here says whether a net had finished training."]
    parts = []
    for model, g in runs.groupby("model", sort=False):
        g = g.sort_values("seed")
        by = {"reached": [int(s) for s in g.loc[g[PLATEAU_COLUMN] == 1, "seed"]],
              "not reached": [int(s) for s in g.loc[g[PLATEAU_COLUMN] == 0, "seed"]],
              "not measured": [int(s) for s in g.loc[g[PLATEAU_COLUMN].isna(), "seed"]]}
        said = [f"{k} in seed{'s' if len(v) > 1 else ''} {', '.join(map(str, v))}" for k, v in by.items() if v]
        parts.append(f"{display_name(model)} {', '.join(said)}")
    n, reached = len(runs), int((runs[PLATEAU_COLUMN] == 1).sum())
    head = f"{what}: reached in {reached} of {n} runs"
    return [f"{head} ({'; '.join(parts)})." if reached < n else f"{head}."]


def departures(runs: pd.DataFrame, recipe: Recipe = PAPER) -> list[str]:
    """Every way the runs' training params depart from the paper's recipe, one sentence each."""
    out = []
    num = lambda name: _float(shared_param(runs, name))  # noqa: E731
    dataset = shared_param(runs, "dataset")
    label, n_train, shape = DATASETS.get(dataset or "", (dataset or "?", None, "?"))
    resize = num("resize")
    if dataset != recipe.dataset:
        out.append(f"Data: {label} ({shape}), not CIFAR-10 ({recipe.image}).")
    if resize:
        out.append(f"Images resized to {int(resize)}×{int(resize)}, not {recipe.image.split('×', 1)[1]}.")
    val = num("val_size") or 0.0
    train_size = num("train_size")
    if train_size:
        out.append(f"Training set: a fixed {int(train_size):,}-image subset, not {recipe.train_images:,} images.")
    elif n_train and n_train - val != recipe.train_images:
        out.append(f"Training set: {int(n_train - val):,} images, not {recipe.train_images:,}.")
    if val != recipe.val_images:
        out.append(f"Validation split: {f'{int(val):,} images' if val else 'none'}, not {recipe.val_images:,} images "
                   "held out of training.")
    test_size = num("test_size")
    if test_size:
        out.append(f"Test error on a fixed {int(test_size):,}-image subset of the test set (the same images for every "
                   f"run), not all {recipe.test_images:,} images.")
    its, batch = num("iterations"), num("batch_size")
    if its and its != recipe.iterations:
        images = train_size or (n_train - val if n_train else None)
        passes = f" ({fmt(its * batch / images)} passes over the training set)" if batch and images else ""
        paper_passes = recipe.iterations * recipe.batch_size / recipe.train_images
        out.append(f"Length: {int(its):,} iterations{passes}, not {recipe.iterations:,} (about {paper_passes:.0f} "
                   "passes).")
    if batch and batch != recipe.batch_size:
        out.append(f"Batch size {int(batch)}, not {recipe.batch_size}.")
    for name, word, paper in (("lr", "Learning rate", recipe.lr), ("momentum", "Momentum", recipe.momentum),
                              ("weight_decay", "Weight decay", recipe.weight_decay),
                              ("lr_decay", "lr drop factor", recipe.lr_decay)):
        v = num(name)
        if v is not None and not math.isclose(v, paper):  # settings as configured, not as measured numbers
            out.append(f"{word} {v:g}, not {paper:g}.")
    drops = shared_milestones(runs)
    if its and drops and [d / its for d in drops] != [m / recipe.iterations for m in recipe.milestones]:
        at = lambda ms, n: " and ".join(f"{m:,} ({100 * m / n:.0f} %)" for m in ms)  # noqa: E731
        out.append(f"lr drops at iterations {at(drops, its)}, not at {at(recipe.milestones, recipe.iterations)} "
                   "of training.")
    if shared_param(runs, "augment") in ("False", "false"):
        out.append(f"No augmentation, not {recipe.augment}.")
    built = set(runs.loc[runs["arch"] != "plain", "shortcut"].dropna()) if "shortcut" in runs else set()
    if len(built) == 1 and (shortcut := built.pop()) != recipe.shortcut:
        out.append(f"Shortcut option {shortcut}, not {recipe.shortcut}.")
    depths = sorted(int(d) for d in runs["depth"].dropna().unique())
    if depths and tuple(depths) != recipe.depths:
        out.append(f"Depths {_and(depths)}, not {_and(list(recipe.depths))}.")
    return out


def _and(items: list) -> str:
    items = [f"{i}" for i in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


@dataclass(frozen=True)
class Banner:
    """The reduced-scale banner: what it is, each departure from the paper, what it shows of Fig. 6."""

    intro: str
    departures: list[str]
    verdict: str | None


def scale_banner(runs: pd.DataFrame, scale: str | None) -> Banner | None:
    """For a CPU-scale study: every way it departs from the paper's recipe (one sentence each), then
    what it shows of Fig. 6, from the same checks the summary states (so the two cannot disagree)."""
    if scale != "cpu":
        return None
    found = departures(runs)
    intro = ("CPU scale: a reduced study for a machine without CUDA"
             + (f"; it departs from {PAPER.source}'s recipe in {len(found)} ways:" if found else "."))
    return Banner(intro, found, fig6_verdict(runs))


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
    """3 significant figures (:func:`analysis.numbers.fmt`): 0.0829, 39.2, 7,770; '–' if undefined."""
    return fmt(r, missing="–")


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
         f"{fmt(r['value'], like=[p['value']])} vs {fmt(p['value'], like=[r['value']])}")
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
                where = (f"{pct(mean, (ref,))} (one seed: no sd) vs {pct(ref, (mean,))} "
                         f"({fmt(mean - ref, like=(mean, ref), sign=True)} points)")
            else:
                lo, hi = mean - 2 * sd, mean + 2 * sd
                group = (mean, sd, lo, hi)
                where = (f"{fmt(mean, like=group)} ± {fmt(sd, like=group)} % over {int(n)} seeds vs {fmt(ref)} %: "
                         f"{'inside' if inside else 'outside'} mean ± 2 sd ({fmt(lo, like=group)} to {fmt(hi, like=group)})")
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
    return (single_seed_finding(runs) + plateau_findings(runs) + depth_findings(runs) + by_curve
            + fig6_findings(runs) + residual_vs_plain(runs)
            + gradient_flow_findings(flow_ratios(grad_flow))
            + weight_grad_findings(weights) + response_findings(responses) + anchor_findings(runs, anchor))
