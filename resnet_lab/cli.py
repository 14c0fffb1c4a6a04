"""The ``resnet-lab`` command. Bad input: one line on stderr, exit status 2, nothing written."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .errors import UserError

if TYPE_CHECKING:
    from .config import TrainConfig

EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130
AddParser = Callable[[Any], argparse.ArgumentParser]  # registers one subcommand on the subparsers


class _Parser(argparse.ArgumentParser):
    """argparse, but its usage errors are one line too (it prints the usage block by default)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see '{self.prog} --help')")


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="plain-N / resnet-N, N = 6n+2 (CIFAR family) or 18/34 (ImageNet family)")
    p.add_argument("--dataset", help="fashion-mnist, cifar10, cifar100 or synthetic")
    # read as --set reads them (config.apply), so 1e5 works and one bound applies either way
    p.add_argument("--iterations", help="training iterations (replaces epochs)")
    p.add_argument("--epochs", help="training epochs, the d2l form (replaces iterations)")
    p.add_argument("--seed", type=int, help="initial weights, data order and augmentation (default 0); "
                                            "plain-n and resnet-n of one seed start alike and see the same batches")
    p.add_argument("--device", help="auto (default: cuda, else mps, else cpu), cpu, mps, cuda or cuda:N")
    p.add_argument("--data-dir", help="directory with the dataset's original files")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--experiment", help="MLflow experiment name (default resnet_lab)")
    p.add_argument("--config", help="TOML file of config fields (see --help-config)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set lr=0.05 --set milestones=1000,1500 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--help-config", action="store_true", help="list every config field with its type and default")
    p.add_argument("--system-metrics", action="store_true",
                   help="log CPU, memory, disk, network (and GPU) use with MLflow's own monitor (needs psutil)")


def build_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults < --config file < named flags < --set, validated."""
    from .config import TrainConfig, apply, load_toml, parse_overrides  # torch: imported when a command needs it

    cfg = TrainConfig()
    if args.config:
        cfg = apply(cfg, load_toml(args.config), args.config)
    flags = {k: v for k, v in {
        "model": args.model, "dataset": args.dataset, "seed": args.seed, "device": args.device,
        "data_dir": args.data_dir, "tracking_uri": args.tracking_uri, "experiment": args.experiment,
        "iterations": args.iterations, "epochs": args.epochs,  # giving one unsets the other (config.apply)
    }.items() if v is not None}
    if args.no_progress:
        flags["progress"] = False
    cfg = apply(cfg, flags, "the command line")
    cfg = apply(cfg, parse_overrides(args.set), "--set")
    return cfg.validate()


def cmd_train(args: argparse.Namespace) -> int:
    if args.help_config:
        from .config import field_help

        print(field_help())
        return 0
    from .tracking import enable_system_metrics
    from .train import train

    cfg = build_config(args)
    if args.system_metrics:
        enable_system_metrics()
    result = train(cfg)
    if result.status != "FINISHED":
        print(f"resnet-lab: run {result.run_id} {result.status.lower()}: {result.reason}", file=sys.stderr)
        return EXIT_FAILED
    m = result.metrics
    print(f"run {result.run_id} finished: {result.iterations} iterations, train error {m.get('train/error', float('nan')):.2f} %, "
          f"test error {m.get('test/error', float('nan')):.2f} %")
    store = f" --tracking-uri {args.tracking_uri}" if args.tracking_uri else ""
    print(f"open it: resnet-lab ui {cfg.experiment}{store}")
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    from .config import TrainConfig
    from .data import IMAGE_SHAPE, NUM_CLASSES
    from .models import build_model, count_parameters, layer_table

    # the model, dataset, size and shortcut checked as train checks them; train's dataset by default
    given = {k: v for k, v in {"dataset": args.dataset, "resize": args.resize, "shortcut": args.shortcut}.items()
             if v is not None}
    cfg = TrainConfig(model=args.model, **given).validate()
    c, h, w = IMAGE_SHAPE[cfg.dataset]
    if cfg.resize is not None:
        h = w = cfg.resize
    model = build_model(cfg.model, in_channels=c, num_classes=NUM_CLASSES[cfg.dataset], shortcut=cfg.shortcut)
    rows = layer_table(model, (c, h, w))
    width = max(len(r[0]) for r in rows)
    print(f"{model.spec.name} ({model.spec.arch}, shortcut {model.shortcut_option if model.spec.residual else 'none'}) "
          f"on {cfg.dataset} {c}x{h}x{w}")
    print(f"{'layer':{width}s}  {'type':16s} {'output':>14s} {'params':>9s}")
    for name, kind, shape, params in rows:
        print(f"{name:{width}s}  {kind:16s} {'x'.join(map(str, shape)):>14s} {params:9,d}")
    print(f"parameters: {count_parameters(model)}")
    return 0


def cmd_check_device(args: argparse.Namespace) -> int:
    from .devicecheck import check_device

    print(check_device(args.device))
    return 0


def make_parser(commands: Sequence[AddParser] = ()) -> argparse.ArgumentParser:
    """The library's commands, plus ``commands`` (each registers one subcommand): the console
    script (``resnet_lab_command``, above this package and ``analysis``) adds ``report``."""
    parser = _Parser(prog="resnet-lab", description="Plain vs residual networks at depth (He et al. 2016).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("train", help="train one net, logged as one MLflow run")
    _train_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("describe", help="print a model's layer table and parameter count")
    p.add_argument("model", help="e.g. resnet-56, plain-20, resnet-18")
    p.add_argument("--dataset", help="sets input channels and size (default: train's, fashion-mnist)")
    p.add_argument("--resize", type=int, help="input size in pixels, e.g. 96 or 224 for the ImageNet family")
    p.add_argument("--shortcut", choices=["A", "B", "C"], help="shortcut option (default: family default)")
    p.set_defaults(func=cmd_describe)
    p = sub.add_parser("check-device", help="one training step on the GPU (cuda/mps) against the CPU's: "
                                            "refuse a device that computes wrong gradients")
    p.add_argument("--device", default="auto", help="auto (default: cuda, else mps, else cpu), mps, cuda or cuda:N")
    p.set_defaults(func=cmd_check_device)
    from . import study_command, ui
    from .diagnostics import command as diagnose

    study_command.add_parser(sub)
    diagnose.add_parser(sub)
    for add_parser in commands:
        add_parser(sub)
    ui.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None, commands: Sequence[AddParser] = ()) -> int:
    try:
        args = make_parser(commands).parse_args(argv)
        return args.func(args)
    except UserError as e:
        print(f"resnet-lab: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("resnet-lab: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
