"""Tables to paste: ``results.csv`` (one row per training run), ``summary.csv`` (one row per
net: mean, sd, n of each number) and ``table.tex`` (the final-error table, LaTeX booktabs).

Written next to ``report.md`` by :func:`analysis.document.build_report`, so ``resnet-lab report``
logs them to the study's parent run with the rest of the report. Every number is one of the
runs' MLflow metrics (or a mean of them); a ``diag/*`` metric a run logged becomes a ``diag_*``
column of both CSVs without any change here.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import pandas as pd

from resnet_lab import plateau

from .anchors import Anchor
from .numbers import fmt, pm
from .findings import PLATEAU_COLUMN
from .runs import DIAGNOSTICS, Study, display_name
from .stats import DIAG_COLUMN, ERROR_NUMBERS, per_net

RESULT_COLUMNS = ["study", "scale", "net", "arch", "depth", "shortcut", "seed", *ERROR_NUMBERS, "plateau",
                  "iterations", "minutes", "run_id", "diagnosed"]
KEEP_EMPTY = {"study", "net", "seed", "run_id"}  # identity columns stay even where a store lacks them


def plateau_text(value: float) -> str:
    """A run's ``final/plateau`` as a reader's word; a run that did not measure it says so."""
    if value == 1:
        return "reached"
    if value == 0:
        return "not reached"
    return f"not measured (the run logged no {plateau.FINAL_KEY}: trained before the lab measured it)"


def diagnosed_text(study: Study) -> pd.Series:
    """Per run: which diagnostics it has ('lesion, landscape, curvature, shattering'), or why its
    ``diag_*`` cells are empty."""
    have = {n: set(t["run_id"]) for n, t in study.diagnostics.items() if n in DIAGNOSTICS and "run_id" in t}
    any_run = set().union(*have.values()) if have else set()
    r = study.runs
    nets_done = set(r.loc[r["run_id"].isin(any_run), "model"])
    out = []
    for row in r.itertuples():
        done = [n for n in DIAGNOSTICS if row.run_id in have.get(n, ())]
        if len(done) == len(DIAGNOSTICS):
            out.append(", ".join(done))
        elif done:
            out.append(f"{', '.join(done)} (not {', '.join(n for n in DIAGNOSTICS if n not in done)}: "
                       "run 'resnet-lab diagnose STUDY_FILE')")
        elif row.model in nets_done:
            out.append("no: diagnosed on other seeds of this net only (the study's diagnostics 'seeds' setting, "
                       "or 'resnet-lab diagnose STUDY_FILE' not run to the end)")
        else:
            out.append("no: not run (run 'resnet-lab diagnose STUDY_FILE')")
    return pd.Series(out, index=r.index, dtype=object)


def _drop_empty(df: pd.DataFrame) -> pd.DataFrame:
    """Columns with no value in any row say nothing: left out."""
    empty = [c for c in df if c not in KEEP_EMPTY and df[c].isna().all()]
    return df.drop(columns=empty)


def results_frame(study: Study) -> pd.DataFrame:
    """One row per finished training run, in the report's order, then its ``diag_*`` numbers; a
    ``diag_*`` cell is empty only where ``diagnosed`` says why, a column empty in every row is left out."""
    r = study.runs
    its = r["total_iterations"].astype("Int64") if "total_iterations" in r else pd.Series(pd.NA, index=r.index)
    if "param_iterations" in r:  # a run without the tag: the configured length
        its = its.fillna(pd.to_numeric(r["param_iterations"], errors="coerce").astype("Int64"))
    reached = r[PLATEAU_COLUMN] if PLATEAU_COLUMN in r else pd.Series(math.nan, index=r.index)
    out = pd.DataFrame({
        "study": study.name, "scale": r["scale"], "net": r["model"], "arch": r["arch"], "depth": r["depth"],
        "shortcut": r["shortcut"] if "shortcut" in r else None, "seed": r["seed"],
        **{c: r[c] if c in r else math.nan for c in ERROR_NUMBERS},
        "plateau": reached.map(plateau_text), "iterations": its,
        "minutes": (r["duration_s"] / 60).round(2) if "duration_s" in r else math.nan, "run_id": r["run_id"],
        "diagnosed": diagnosed_text(study),
    })
    diag = sorted(c for c in r if c.startswith(DIAG_COLUMN))
    return _drop_empty(pd.concat([out, r[diag]], axis=1).reset_index(drop=True))


def summary_frame(study: Study) -> pd.DataFrame:
    """One row per net: study, scale, net, arch, depth, n_runs, ``plateau_reached`` ('3 of 3') and
    ``<number>_mean|_sd|_n`` for the final errors, every ``diag_*`` number and the minutes per run;
    no ``_sd`` column where every net has one value, no column without a value."""
    res = results_frame(study).rename(columns={"net": "model"})
    numbers = [c for c in (*ERROR_NUMBERS, *sorted(c for c in res if c.startswith(DIAG_COLUMN)), "minutes") if c in res]
    out = per_net(res, numbers).rename(columns={"model": "net"})
    scales = res.groupby("model")["scale"].agg(lambda s: ", ".join(sorted(set(s.dropna()))))
    out.insert(0, "scale", out["net"].map(scales))
    out.insert(0, "study", study.name)
    if "plateau" in res:
        reached = res.groupby("model")["plateau"].agg(
            lambda s: f"{int((s == 'reached').sum())} of {int(s.isin(['reached', 'not reached']).sum())}"
            if s.isin(["reached", "not reached"]).any() else "not measured")
        out.insert(out.columns.get_loc("n_runs") + 1, "plateau_reached", out["net"].map(reached))
    one = [f"{c}_sd" for c in numbers if (out[f"{c}_n"] <= 1).all()]
    return _drop_empty(out.drop(columns=one))


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def _pm(mean: float, sd: float, n: int) -> str:
    """'$6.97 \\pm 0.16$', '$6.97$' for one seed, '--' for no value (:func:`analysis.numbers.pm`)."""
    text = pm(mean, sd, n, missing="--")
    return text if text == "--" else "$" + text.replace(",", "{,}").replace(" ± ", " \\pm ") + "$"


def latex_table(study: Study, anchor: Anchor | None = None) -> str:
    """The final-error table as a booktabs ``table`` (needs ``\\usepackage{booktabs}``): one row per
    net, mean ± sample sd over seeds, n, and the anchor's published numbers where the study has them."""
    nets = per_net(study.runs, [c for c in ERROR_NUMBERS if c in study.runs])
    cols = [c for c in ERROR_NUMBERS if f"{c}_mean" in nets and nets[f"{c}_mean"].notna().any()]
    header = ["Net", "$n$", *[{"train_error": "Train", "test_error": "Test", "val_error": "Val"}[c] + r" error (\%)"
                              for c in cols]]
    refs = [] if anchor is None else [t for t in (("train", anchor.train_error), ("test", anchor.test_error)) if t[1]]
    header += [f"{latex_escape(anchor.label)} {kind} error (\\%)" for kind, _ in refs]
    lines = [f"  \\begin{{tabular}}{{l{'r' * (len(header) - 1)}}}", "    \\toprule", "    " + " & ".join(header) + r" \\",
             "    \\midrule"]
    for i, r in nets.iterrows():
        if i and nets.loc[i - 1, "arch"] != r["arch"]:
            lines.append("    \\midrule")  # plain nets, then ResNets
        cells = [latex_escape(display_name(r["model"])), str(int(r["n_runs"]))]
        cells += [_pm(r[f"{c}_mean"], r[f"{c}_sd"], int(r[f"{c}_n"])) for c in cols]
        cells += [f"${fmt(table[r['model']])}$" if r["model"] in table else "--" for _, table in refs]
        lines.append("    " + " & ".join(cells) + r" \\")
    lines += ["    \\bottomrule", "  \\end{tabular}"]
    scale = f" ({latex_escape(study.scale)} scale)" if study.scale else ""
    caption = (f"Final error (\\%) of study \\texttt{{{latex_escape(study.name)}}}{scale}: mean $\\pm$ sample "
               f"standard deviation over $n$ seeds (no $\\pm$ for one seed)"
               + (f"; published: {latex_escape(anchor.source)}" if refs else "") + ".")
    return "\n".join([f"% resnet_lab: final errors of study {study.name}; needs \\usepackage{{booktabs}}",
                      "\\begin{table}[t]", "  \\centering", f"  \\caption{{{caption}}}",
                      f"  \\label{{tab:{''.join(ch if ch.isalnum() else '-' for ch in study.name)}}}",
                      *lines, "\\end{table}", ""])


def _write(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder: a reader never sees half a table."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_tables(study: Study, out_dir: Path, anchor: Anchor | None = None) -> dict[str, Path]:
    """``results.csv``, ``summary.csv`` and ``table.tex`` in ``out_dir``; name -> path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"results": out_dir / "results.csv", "summary": out_dir / "summary.csv", "table": out_dir / "table.tex"}
    _write(paths["results"], results_frame(study).to_csv(index=False))
    _write(paths["summary"], summary_frame(study).to_csv(index=False))
    _write(paths["table"], latex_table(study, anchor))
    return paths
