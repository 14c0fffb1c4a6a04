"""``resnet-lab study``'s arguments, apart from ``study.py`` so that building the command line
(``resnet-lab ui``, ``--help``) does not import torch: that import is most of a command's start-up
(6 of the 23 s ``resnet-lab ui`` took to print its URL on 2 cores)."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``resnet-lab study``."""
    p = sub.add_parser(
        "study", help="run a depth study (experiments/*.toml) as MLflow runs under one parent run",
        description="Train every model x seed of a study file, each as an MLflow child run under one parent run; "
                    "rerunning skips finished runs and resumes interrupted ones from their checkpoints.")
    p.add_argument("file", help="study file, e.g. experiments/fashion_mnist.toml")
    p.add_argument("--scale", default="auto", choices=["auto", "cpu", "full"],
                   help="auto (default): the full study on CUDA, the file's [cpu] scale without CUDA")
    p.add_argument("--jobs", type=int, help="train N runs at once in worker processes (default 1, or one per "
                                            "--devices GPU)")
    p.add_argument("--devices", help="GPU indices to spread runs over, e.g. 0,1 (default: cuda if present, else cpu)")
    p.add_argument("--launcher", default="local", choices=["local", "ray", "submitit"],
                   help="local (default): this machine; ray: one Ray task per run (pip install '.[ray]'); "
                        "submitit: one SLURM job array, a task per run (pip install '.[slurm]')")
    p.add_argument("--cluster", choices=["slurm", "local", "debug"],
                   help="--launcher submitit: slurm (default), or local/debug (this machine, for tests)")
    p.add_argument("--partition", help="--launcher submitit: SLURM partition (default: the [slurm] table's)")
    p.add_argument("--time-min", type=int, help="--launcher submitit: time limit per task in minutes (default 240)")
    p.add_argument("--gpus-per-task", type=int, help="--launcher submitit: GPUs per task (default 1)")
    p.add_argument("--array-parallelism", type=int, help="--launcher submitit: tasks running at once (default 16)")
    p.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                   help="--launcher submitit: an extra sbatch option, e.g. --sbatch account=proj (repeatable)")
    p.add_argument("--no-wait", action="store_true",
                   help="--launcher submitit: return once the array is submitted, and say how to finish later")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else start a local Ray instance)")
    p.add_argument("--gpus-per-run", type=float, help="GPUs each Ray task asks for, e.g. 0.25 (default 1)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db); "
                                          "use an http:// server for Ray clusters")
    p.add_argument("--fuse", choices=["auto", "on", "off"],
                   help="train the runs that share a shape (depth, recipe; any seed, plain and residual) as one "
                        "fused model: auto (default: the study file's fuse, else where measured faster), on, off")
    p.add_argument("--no-progress", action="store_true", help="no progress bars, one line per run start/finish")
    p.add_argument("--dry-run", action="store_true", help="validate the file and list its runs; train nothing")
    p.add_argument("--system-metrics", action="store_true",
                   help="log each training run's CPU, memory, disk, network (and GPU) use with MLflow's own "
                        "monitor (needs psutil)")
    p.set_defaults(func=cmd_study)


def _slurm_flags(args: argparse.Namespace) -> dict | None:
    """The submitit flags given (None when the launcher is another one; those flags are then refused)."""
    flags = {"partition": args.partition, "time_min": args.time_min, "gpus_per_task": args.gpus_per_task,
             "array_parallelism": args.array_parallelism}
    given = [k for k, v in flags.items() if v is not None] + (["sbatch"] if args.sbatch else []) + \
        (["no_wait"] if args.no_wait else [])
    if args.launcher != "submitit":
        if given:
            from .errors import UserError

            raise UserError(f"--{given[0].replace('_', '-')} is for --launcher submitit")
        return None
    return flags | {"sbatch": args.sbatch}


def cmd_study(args: argparse.Namespace) -> int:
    """Exit code: 0 all runs finished, 1 some failed (UserError -> 2 via the CLI)."""
    from .study import run_study
    from .tracking import enable_system_metrics

    if args.system_metrics and not args.dry_run:
        enable_system_metrics()  # MLflow's switch is an environment variable: worker processes inherit it
    result = run_study(args.file, scale=args.scale, jobs=args.jobs, devices=args.devices, launcher=args.launcher,
                       address=args.address, gpus_per_run=args.gpus_per_run, tracking_uri=args.tracking_uri,
                       progress=not args.no_progress, dry_run=args.dry_run, cluster=args.cluster,
                       slurm_flags=_slurm_flags(args), wait=not args.no_wait, fuse=args.fuse)
    if result is None:
        return 0
    if result.failed:
        print(f"resnet-lab: {len(result.failed)} of {len(result.outcomes)} runs of study {result.study.name} failed: "
              f"{', '.join(o.run.name for o in result.failed)}", file=sys.stderr)
        return 1
    return 0
