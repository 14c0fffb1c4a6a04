"""The ``resnet-lab diagnose`` subcommand; the work is in ``diagnostics.run``, imported when the
command runs, so building the CLI's parser costs no pandas or MLflow import."""

from __future__ import annotations

import argparse
from typing import Any

from .settings import NAMES


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``diagnose`` on the ``resnet-lab`` subparsers."""
    p = sub.add_parser("diagnose", help="lesion, loss-landscape, curvature and shattering diagnostics on a "
                                        "study's finished runs, logged into each run",
                       description="Run the diagnostics each finished run of the study lacks and log them into "
                                   "that run (resumable: a rerun skips what is logged).")
    p.add_argument("study_file", nargs="?", metavar="STUDY_FILE", help="study TOML file, e.g. experiments/fashion_mnist.toml")
    p.add_argument("--run", dest="run_id", metavar="RUN_ID", help="diagnose this one finished run instead of a study")
    p.add_argument("--only", help=f"comma-separated subset of {','.join(NAMES)}")
    p.add_argument("--scale", default="auto", help="cpu or full sizes (default auto: full where CUDA is)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_diagnose)
    return p


def cmd_diagnose(args: argparse.Namespace) -> int:
    from .run import diagnose

    result = diagnose(args.study_file, args.run_id, only=args.only, scale=args.scale, tracking_uri=args.tracking_uri,
                      progress=not args.no_progress)
    print(f"diagnostics logged: {len(result.logged)}; already logged with the same settings: {result.already}")
    return 0
