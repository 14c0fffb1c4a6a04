"""``resnet-lab report``: load a study from MLflow, write its report, log it to the study's parent run.

``write_report("cifar10_paper")`` loads the study (``analysis.runs.load_study``), writes
``reports/<study>/report.md``, ``report.html`` and ``figures/`` (``analysis.document``) and,
with ``log_to_mlflow``, logs the folder to the study's parent run under ``report/``.

The heavy modules (pandas, matplotlib, MLflow) are imported when a report is written, not
when the CLI builds its parser, so the other ``resnet-lab`` commands do not pay for them.
"""

from __future__ import annotations

import argparse
import math
import time
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resnet_lab.errors import UserError, check_can_create

if TYPE_CHECKING:
    import pandas as pd

    from .document import Report

DEFAULT_STUDY = "fashion_mnist"


def write_report(study: str, *, tracking_uri: str | None = None, out_dir: Path = Path("reports"),
                 log_to_mlflow: bool = True, scale: str | None = None) -> Path:
    """Write ``<out_dir>/<study>/report.md`` (+ ``report.html``, ``figures/``); return the .md path.

    With ``log_to_mlflow`` the folder is logged to the study's parent run as artifacts under
    ``report/`` (skipped, with a note in the report, when the experiment has no parent run).
    """
    from .document import build_report
    from .runs import load_study

    target = Path(out_dir) / study
    check_writable(target)  # before loading: a bad --out must not cost a study load, nor leave anything
    loaded = load_study(study, tracking_uri, scale=scale)
    rep = build_report(loaded, target)
    if log_to_mlflow:
        log_report(rep)
    return rep.markdown


def check_writable(folder: Path) -> None:
    """``folder`` exists as a writable directory or can be created: its nearest existing
    ancestor is a writable directory. Checked, never created, so a failure leaves nothing."""
    check_can_create(folder, "the report folder", "pass another `out_dir`")


def log_report(rep: Report) -> str | None:
    """Log the report folder to the parent run (artifact dir ``report/``), its headline numbers as
    the parent's metrics and its summary in the parent's description; the run id, or None."""
    parent = rep.study.parent
    if parent is None:
        return None
    from mlflow.entities import Metric

    from resnet_lab.tracking import connect

    client = connect(rep.study.tracking_uri)
    client.log_artifacts(parent.run_id, str(rep.out_dir), "report")
    now = int(time.time() * 1000)
    client.log_batch(parent.run_id, metrics=[Metric(k, v, now, 0) for k, v in headline_metrics(rep.study.runs).items()])
    client.set_tag(parent.run_id, "mlflow.note.content", parent_note(rep))
    rep.logged_to = parent.run_id
    return parent.run_id


def headline_metrics(runs: pd.DataFrame) -> dict[str, float]:
    """The numbers a study's row in the runs table should show: deepest minus shallowest plain net's
    final training error (mean of the seed-paired differences; the degradation of He et al. Sec. 4.2,
    > 0 when the deeper plain net trains worse) and each net's mean final test error."""
    from .stats import paired

    out = {f"study/mean_test_error/{model}": float(g["test_error"].mean())
           for model, g in runs.groupby("model", sort=False) if g["test_error"].notna().any()}
    plain = runs[runs["arch"] == "plain"].drop_duplicates("model").sort_values("depth")
    if plain["depth"].nunique() >= 2:
        gap = paired(runs, plain["model"].iloc[-1], plain["model"].iloc[0], "train_error")
        if gap is not None and math.isfinite(gap.diff.mean):
            out["study/plain_deep_minus_shallow_train_error"] = gap.diff.mean
    return out


def parent_note(rep: Report) -> str:
    """What ran (from the finished runs) and the report's summary sentences: the parent run's description."""
    from resnet_lab.tracking import describe_study

    runs, study = rep.study.runs, rep.study
    lengths = [f"{int(n)} iterations" for n in runs["total_iterations"].dropna()]
    datasets = ", ".join(sorted(runs["param_dataset"].dropna().unique()))
    head = describe_study(study.name, study.scale, list(dict.fromkeys(runs["model"])), [int(s) for s in runs["seed"]],
                          lengths or ["? iterations"], datasets or "?")
    from .document import artifact_url

    url = artifact_url(study, study.parent.run_id, "report/report.html") if study.parent is not None else None
    where = f"[report/report.html]({url})" if url else "report/report.html"
    return head + "\n\n" + "\n".join(f"- {s}" for s in rep.summary) + f"\n\nThe report: artifact {where}."


# --------------------------------------------------------------------------- CLI


def study_name(arg: str) -> str:
    """A study name, or a study TOML path: its ``name`` key, else its file stem (the study runner's rule)."""
    path = Path(arg)
    if arg.endswith(".toml") or path.is_file():
        if not path.is_file():
            raise UserError(f"study file {arg} not found: give a study name (e.g. {DEFAULT_STUDY}) or an existing "
                            "study TOML path")
        try:
            name = tomllib.loads(path.read_text()).get("name", path.stem)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"study file {arg} is not valid TOML: {' '.join(str(e).split())}") from None
        if not isinstance(name, str) or not name:
            raise UserError(f"study file {arg}: name must be a non-empty string, got {name!r}")
        return name
    if not arg or "/" in arg:
        raise UserError(f"{arg!r} is not a study name or a study TOML file")
    return arg


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``report`` on the ``resnet-lab`` subparsers."""
    p = sub.add_parser("report", help="write a study's report (Markdown, self-contained HTML, figures) "
                                      "and log it to the study's MLflow parent run",
                       description="Read a study's runs from MLflow and write reports/<study>/report.md, "
                                   "report.html and figures/ (PNG + PDF).")
    p.add_argument("study", nargs="?", default=DEFAULT_STUDY, metavar="STUDY_OR_FILE",
                   help=f"study name (= MLflow experiment) or study TOML file (default {DEFAULT_STUDY})")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--out", default="reports", type=Path, help="output directory (default reports)")
    p.add_argument("--scale", help="which study scale to report when the experiment has several (cpu / full); "
                                   "default: the latest study run's")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the report to the study's parent run")
    p.set_defaults(func=cmd_report)
    return p


# The Python API names its arguments (`tracking_uri`); on the command line the same words are flags.
FLAGS = {"`tracking_uri`": "--tracking-uri", "`scale`": "--scale", "`out_dir`": "--out"}


def cmd_report(args: argparse.Namespace) -> int:
    name = study_name(args.study)
    try:
        path = write_report(name, tracking_uri=args.tracking_uri, out_dir=args.out,
                            log_to_mlflow=not args.no_mlflow, scale=args.scale)
    except UserError as e:
        message = str(e)
        for arg, flag in FLAGS.items():
            message = message.replace(arg, flag)
        raise UserError(message) from None
    print(path)
    return 0
