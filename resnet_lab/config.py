"""The training configuration: one typed dataclass, loadable from TOML, every field overridable.

Validation happens here, before anything is built or logged, so that bad input becomes one
``UserError`` line and never an empty MLflow run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .data import DATASETS
from .device import accelerator, check_device_name
from .errors import UserError
from .models import SHORTCUTS, canonical_name, parse_model_name
from .speed import COMPILE_MODES, PRECISIONS, cxx_missing
from .studyname import NAME_RE  # noqa: F401 - the one rule for experiment and study names, defined torch-free
from .tracking import NOT_TRAINING

# The longest run the lab starts: 156x the paper's 64k steps, ~12 days of resnet-110 on a fast GPU;
# a longer one (a typo, an exponent: 1e20) could never finish. One bound however the number is given.
MAX_ITERATIONS = 10_000_000


@dataclass
class TrainConfig:
    """Defaults are He et al. 2016 Sec. 4.2 (CIFAR-10); see experiments/ for whole studies."""

    # model
    model: str = "resnet-20"
    shortcut: str | None = None  # A / B / C; None = family default (A for CIFAR nets, B for 18/34)
    zero_init_residual: bool = False
    # data
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    data_root: str = "data"
    resize: int | None = None
    val_size: int = 0  # paper: 5000 (45k/5k split)
    train_size: int | None = None  # subset of train for quick runs
    test_size: int | None = None  # fixed subset of test for quick runs (the same images for every seed)
    augment: bool = True  # pad 4 + random crop + horizontal flip
    # optimisation (iteration based; `epochs` is the d2l form and replaces `iterations`)
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    iterations: int | None = 64000
    epochs: int | None = None
    # lr drops, in iterations; None = the paper's 32k/48k of 64k, i.e. at 50 % and 75 % of the run
    milestones: list[int] | None = None
    lr_decay: float = 0.1
    warmup_iterations: int = 0  # paper: ~400 for ResNet-110
    warmup_lr: float = 0.01
    # evaluation and logging
    eval_every: int = 2000
    eval_batch_size: int = 1000
    log_every: int = 100
    # training loss/error on this many fixed, unaugmented training images at every evaluation
    # (train_fixed/*), which decides whether the run reached its plateau (resnet_lab.plateau); 0 = off
    plateau_images: int = 1000
    # probes (resnet_lab.probes)
    probes: bool = True
    grad_every: int = 1
    log_layer_metrics: bool = False  # one MLflow key per layer too (hundreds); the probe tables have them all
    # checkpoints (resume after a crash or Ctrl-C); 0 = off; a multiple of log_every
    checkpoint_every: int = 1000
    checkpoint_dir: str = "checkpoints"
    # run
    seed: int = 0
    device: str = "auto"  # auto (cuda, else mps, else cpu: resnet_lab.device) / cpu / mps / cuda / cuda:N
    # fp32 / bf16 autocast; auto = bf16 where the device computes it natively (resnet_lab.speed)
    precision: str = "auto"
    # torch.compile the model for the training step: true / false, or unset (auto: where it pays
    # for its compile time at the run's length, resnet_lab.speed); see docs/benchmarks.md
    compile: bool | None = None
    # auto / default / reduce-overhead (CUDA graphs over the compiled step); auto: reduce-overhead on
    # CUDA, default elsewhere (resnet_lab.speed.choose_compile_mode)
    compile_mode: str = "auto"
    tracking_uri: str | None = None
    experiment: str = "resnet_lab"
    run_name: str | None = None  # default "<model>-s<seed>"
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.model, str):
            self.model = canonical_name(self.model)  # --model RESNET-20 trains, names and hashes resnet-20

    def validate(self) -> "TrainConfig":
        """Check every field; raise UserError naming the field and a valid alternative."""
        parse_model_name(self.model)
        if self.dataset not in DATASETS:
            raise UserError(f"unknown dataset {self.dataset!r}: use one of {', '.join(DATASETS)}")
        if self.shortcut is not None and self.shortcut not in SHORTCUTS:
            raise UserError(f"shortcut must be one of {', '.join(SHORTCUTS)} (or unset for the family default), got {self.shortcut!r}")
        for name in ("batch_size", "eval_every", "eval_batch_size", "log_every", "grad_every"):
            _positive(self, name)
        for name in ("lr", "warmup_lr", "lr_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise UserError(f"{name} must be a positive number, got {value}")
        for name in ("momentum", "weight_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise UserError(f"{name} must be >= 0, got {value}")
        if self.checkpoint_every < 0 or self.checkpoint_every % self.log_every:
            raise UserError(f"checkpoint_every must be 0 (off) or a multiple of log_every ({self.log_every}), "
                            f"got {self.checkpoint_every}")
        for name in ("val_size", "warmup_iterations", "seed", "plateau_images"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("resize", "train_size", "test_size"):
            if getattr(self, name) is not None:
                _positive(self, name)
        if (self.iterations is None) == (self.epochs is None):
            raise UserError("set exactly one of iterations and epochs (e.g. --set epochs=10 --set iterations=none)")
        _positive(self, "iterations" if self.epochs is None else "epochs")
        check_run_length("iterations" if self.epochs is None else "epochs",
                         self.iterations if self.epochs is None else self.epochs)
        ms = self.milestones or []
        if any(b <= a for a, b in zip(ms, ms[1:])) or any(m <= 0 for m in ms):
            raise UserError(f"milestones must be positive and strictly increasing iterations, got {self.milestones}")
        if self.iterations is not None:
            self.check_schedule(self.iterations)
        check_device_name(self.device)
        if self.precision not in PRECISIONS:
            raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise UserError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        if self.compile:
            _check_compile(self.device)
        check_experiment_name(self.experiment, "experiment")
        return self

    def resolved(self, total_iterations: int) -> "TrainConfig":
        """A copy with the milestones filled in for a run of ``total_iterations``, checked."""
        ms = self.milestones if self.milestones is not None else [total_iterations // 2, total_iterations * 3 // 4]
        out = dataclasses.replace(self, milestones=ms)
        out.check_schedule(total_iterations)
        return out

    def check_schedule(self, total_iterations: int) -> None:
        """Milestones and warm-up must fall inside the run (also checked once epochs are resolved)."""
        if self.epochs is not None:
            check_run_length(f"{self.epochs} epochs", total_iterations, unit=" iterations")
        if self.milestones and self.milestones[-1] >= total_iterations:
            raise UserError(f"milestone {self.milestones[-1]} is not before the last iteration {total_iterations}: "
                            "lower the milestones or raise iterations")
        if self.warmup_iterations >= total_iterations:
            raise UserError(f"warmup_iterations {self.warmup_iterations} must be below the run length {total_iterations}")

    @property
    def name(self) -> str:
        return self.run_name or f"{self.model}-s{self.seed}"

    def config_hash(self) -> str:
        """Identity of a training for resume/skip: every field that changes what is trained.

        Where files live, how progress is shown and where runs are logged do not count, so
        moving the data or the store does not make a finished run look new.
        """
        d = {k: v for k, v in self.to_dict().items() if k not in NOT_TRAINING}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def check_run_length(what: str, value: int, unit: str = "") -> None:
    """``MAX_ITERATIONS``, the one bound on a run's length (``--iterations``, ``--set``, a config file, epochs)."""
    if value > MAX_ITERATIONS:
        raise UserError(f"{what} must be at most {MAX_ITERATIONS:,}{unit} (the paper's runs are 64,000), got "
                        f"{value:,}{unit}: a run that long would never finish")


def check_experiment_name(name: object, what: str) -> None:
    """The one rule for experiment and study names (``NAME_RE``)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise UserError(f"{what} must be a short name of letters, digits, '_', '.' or '-' (it is the MLflow "
                        f"experiment), got {name!r}")


def _positive(cfg: TrainConfig, name: str) -> None:
    value = getattr(cfg, name)
    if value is None or value <= 0:
        raise UserError(f"{name} must be a positive integer, got {value}")


def _check_compile(device: str) -> None:
    """torch.compile needs dynamo for this Python and, on CPU, a C++ compiler for inductor's kernels."""
    from torch._dynamo import is_dynamo_supported

    if not is_dynamo_supported():
        raise UserError("compile=true: torch.compile does not support this Python/torch; use --set compile=false")
    on_cpu = device == "cpu" or (device == "auto" and accelerator() == "cpu")
    cxx = cxx_missing()
    if on_cpu and cxx is not None:
        raise UserError(f"compile=true on CPU needs a C++ compiler ({cxx!r} not found; set CXX or install g++), "
                        "or use --set compile=false")


_FIELDS = {f.name: f for f in fields(TrainConfig)}


def _coerce(name: str, value: Any) -> Any:
    """Turn a TOML value or a --set string into the field's type, or raise UserError."""
    hint = typing.get_type_hints(TrainConfig)[name]
    args = typing.get_args(hint)
    optional = isinstance(hint, types.UnionType) and type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    if isinstance(value, str) and optional and value.strip().lower() in ("none", "null", ""):
        return None
    if isinstance(value, str) and optional and base is bool and value.strip().lower() == "auto":
        return None  # an unset switch (compile) means "decide for me": auto
    if value is None:
        if optional:
            return None
        raise UserError(f"{name} cannot be empty")
    origin = typing.get_origin(base)
    try:
        if origin is list:
            (item,) = typing.get_args(base)
            if isinstance(value, str):
                value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
            if not isinstance(value, list):
                raise ValueError
            return [_scalar(item, v) for v in value]
        return _scalar(base, value)
    except (ValueError, TypeError):
        raise UserError(f"{name} expects {_type_name(hint)}, got {value!r}") from None


def _scalar(kind: type, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.strip().lower() in ("true", "1", "yes", "on")
        raise ValueError
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
    if kind is float:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ValueError
        return value
    raise TypeError(kind)


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def apply(cfg: TrainConfig, values: dict[str, Any], source: str) -> TrainConfig:
    """A copy of ``cfg`` with ``values`` applied; unknown keys are an error naming ``source``."""
    changes = {}
    for key, value in values.items():
        if key not in _FIELDS:
            close = [k for k in _FIELDS if k.split("_")[0] == key.split("_")[0]]
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(f"unknown config key {key!r} in {source}{hint}; see 'resnet-lab train --help-config'")
        changes[key] = _coerce(key, value)
    return dataclasses.replace(cfg, **_one_run_length(changes))


def _one_run_length(changes: dict[str, Any]) -> dict[str, Any]:
    """``iterations`` and ``epochs`` are two forms of one setting: giving one unsets the other.

    The one place this rule lives (command line, config files and study tables all go through
    ``apply``); ``validate`` checks that exactly one of them is set.
    """
    given = [k for k in ("iterations", "epochs") if changes.get(k) is not None]
    if len(given) == 2:
        raise UserError("iterations and epochs are both given: give one, not both (giving one unsets the other)")
    if given:
        changes.setdefault("epochs" if given[0] == "iterations" else "iterations", None)
    return changes


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file; its keys are TrainConfig fields (a [train] table is accepted too)."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"config file {path} is not valid TOML: {e}") from None
    return data.get("train", data) if isinstance(data.get("train"), dict) else data


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``["lr=0.05", "milestones=100,200"]`` -> dict; each item must be key=value."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects key=value, got {item!r} (e.g. --set lr=0.05)")
        out[key.strip()] = value.strip()
    return out


# What each field means, for --help-config (tests/test_cli.py checks that every field has a line).
FIELD_HELP = {
    "model": "the net: plain-N / resnet-N, N = 6n+2 (CIFAR family) or 18/34 (ImageNet family)",
    "shortcut": "A (zero-padding, no parameters), B (projection where the shape changes) or C (projection "
                "everywhere); unset: A for CIFAR nets, B for 18/34",
    "zero_init_residual": "start each block's last BatchNorm gamma at 0 (residual nets only)",
    "dataset": "fashion-mnist, cifar10 or synthetic (small, generated; for tests and smoke runs)",
    "data_dir": "a folder with the dataset's original files (else FASHION_MNIST_DIR / CIFAR10_DIR, the cache, Debian's package)",
    "data_root": "torchvision's cache and download folder",
    "resize": "input side in pixels (e.g. 96 for the d2l recipe); unset: the dataset's own size",
    "val_size": "training images held out as a validation split, logged as val/* (paper: 5000); 0 = none",
    "train_size": "train on the first N training images only (quick runs); unset: all",
    "test_size": "evaluate on a fixed subset of N test images (the same for every seed); unset: all",
    "augment": "pad 4 + random crop back to size + horizontal flip, as in the paper",
    "batch_size": "images per SGD step",
    "lr": "learning rate after warm-up",
    "momentum": "SGD momentum",
    "weight_decay": "L2 weight decay",
    "iterations": "training steps (setting epochs unsets it)",
    "epochs": "passes over the training set, the d2l form (setting iterations unsets it)",
    "milestones": "iterations where lr is multiplied by lr_decay; unset: at 50 % and 75 % of the run",
    "lr_decay": "factor applied to lr at each milestone",
    "warmup_iterations": "first N iterations at warmup_lr (paper: ~400 for ResNet-110)",
    "warmup_lr": "learning rate during warm-up",
    "eval_every": "iterations between test (and val) evaluations",
    "eval_batch_size": "images per evaluation batch (memory only; results do not depend on it)",
    "log_every": "iterations between logged train/* points (each the mean since the last one)",
    "probes": "record gradient flow, per-layer gradient norms and layer responses (probes/*.parquet, z_probes/*)",
    "grad_every": "iterations between per-layer gradient-norm records (1 = every step)",
    "log_layer_metrics": "also log one MLflow key per layer (hundreds of charts; the probe tables have them all)",
    "plateau_images": "fixed training images whose loss is logged as train_fixed/* and decides whether the run "
                      "reached its plateau (resnet_lab.plateau); 0 = off",
    "checkpoint_every": "iterations between checkpoints (resume after a crash or Ctrl-C); 0 = none; a multiple of log_every",
    "checkpoint_dir": "folder of the checkpoints",
    "seed": "initial weights, data order and augmentation (plain-n and resnet-n of one seed share them)",
    "device": "auto (CUDA if there is one, else CPU), cpu, cuda or cuda:N",
    "precision": "auto (bf16 autocast where the device computes bf16 natively: CUDA, AMX or AVX512-BF16 CPUs), "
                 "fp32 or bf16",
    "compile": "torch.compile the training step: auto (the rule in resnet_lab.speed: on CPU, runs of at least "
               "1,000 iterations), true or false",
    "compile_mode": "torch.compile's mode when compiling: default, reduce-overhead (CUDA graphs over the step) or "
                    "auto (reduce-overhead on CUDA, default elsewhere)",
    "tracking_uri": "MLflow store (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)",
    "experiment": "MLflow experiment the run goes to",
    "run_name": "MLflow run name; unset: <model>-s<seed>",
    "progress": "show a progress bar",
}
CHOICES = {"compile": "auto|true|false", "compile_mode": "|".join(COMPILE_MODES), "precision": "auto|fp32|bf16",
           "device": "auto|cpu|cuda|cuda:N"}


def field_help() -> str:
    """One line per field: name, type (or its choices), default, what it means (for --help-config)."""
    cfg = TrainConfig()
    hints = typing.get_type_hints(TrainConfig)
    rows = [(f.name, CHOICES.get(f.name, _type_name(hints[f.name])),
             "auto" if f.name == "compile" and getattr(cfg, f.name) is None else repr(getattr(cfg, f.name)))
            for f in fields(cfg)]
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"  {name:{w[0]}s}  {kind:{w[1]}s}  default {default:{w[2]}s}  {FIELD_HELP[name]}"
                     for name, kind, default in rows)
