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

from .anchors import Anchor
from .runs import Study, display_name
from .stats import DIAG_COLUMN, ERROR_NUMBERS, per_net

RESULT_COLUMNS = ["study", "scale", "net", "arch", "depth", "shortcut", "seed", *ERROR_NUMBERS, "iterations",
                  "minutes", "run_id"]


def results_frame(study: Study) -> pd.DataFrame:
    """One row per finished training run, in the report's order, then its ``diag_*`` numbers."""
    r = study.runs
    its = r["total_iterations"].astype("Int64") if "total_iterations" in r else pd.Series(pd.NA, index=r.index)
    if "param_iterations" in r:  # a run without the tag: the configured length
        its = its.fillna(pd.to_numeric(r["param_iterations"], errors="coerce").astype("Int64"))
    out = pd.DataFrame({
        "study": study.name, "scale": r["scale"], "net": r["model"], "arch": r["arch"], "depth": r["depth"],
        "shortcut": r["shortcut"] if "shortcut" in r else None, "seed": r["seed"],
        **{c: r[c] if c in r else math.nan for c in ERROR_NUMBERS},
        "iterations": its, "minutes": r["duration_s"] / 60 if "duration_s" in r else math.nan, "run_id": r["run_id"],
    })
    diag = sorted(c for c in r if c.startswith(DIAG_COLUMN))
    return pd.concat([out, r[diag]], axis=1).reset_index(drop=True)


def summary_frame(study: Study) -> pd.DataFrame:
    """One row per net: study, scale, net, arch, depth, n_runs and ``<number>_mean|_sd|_n`` for the
    final errors, every ``diag_*`` number and the minutes per run."""
    res = results_frame(study).rename(columns={"net": "model"})
    numbers = [*ERROR_NUMBERS, *sorted(c for c in res if c.startswith(DIAG_COLUMN)), "minutes"]
    out = per_net(res, numbers).rename(columns={"model": "net"})
    scales = res.groupby("model")["scale"].agg(lambda s: ", ".join(sorted(set(s.dropna()))))
    out.insert(0, "scale", out["net"].map(scales))
    out.insert(0, "study", study.name)
    return out


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def _pm(mean: float, sd: float, n: int) -> str:
    """'$6.97 \\pm 0.16$', '$6.97$' for one seed, '--' for no value."""
    if not math.isfinite(mean):
        return "--"
    return f"${mean:.2f} \\pm {sd:.2f}$" if n > 1 and math.isfinite(sd) else f"${mean:.2f}$"


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
        cells += [f"${table[r['model']]:g}$" if r["model"] in table else "--" for _, table in refs]
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
