"""Study files (``experiments/*.toml``): which nets to train, with which settings, at which scale.

A study file::

    name = "fashion_mnist"            # optional: the MLflow experiment, default the file stem
    description = "..."               # optional: shown as the parent run's note
    archs = ["plain", "resnet"]       # x depths: plain-20, resnet-20, plain-32, ...
    depths = [20, 32, 44, 56]         # 6n+2 (CIFAR family) or 18/34 (ImageNet family)
    models = ["resnet-110"]           # explicit extra models
    seeds = [0]                       # default [0]
    fuse = "auto"                     # auto / on / off: train runs of one shape as one fused model

    [train]                           # TrainConfig fields ('resnet-lab train --help-config')
    dataset = "fashion-mnist"
    iterations = 32000                # setting epochs instead unsets iterations, and vice versa

    [overrides.resnet-110]            # per-model settings on top of [train]
    warmup_iterations = 400

    [cpu]                             # required: the reduced scale used without CUDA;
    depths = [20, 56]                 # archs/depths/models/seeds/fuse here replace the top-level ones
    models = []
    [cpu.train]                       # merged over [train]
    train_size = 10000
    [cpu.overrides.plain-56]          # merged over [overrides.plain-56]
    lr = 0.05

    [slurm]                           # optional: sbatch settings for --launcher submitit
    partition = "gpu"                 # (resnet_lab.slurm.KEYS; flags override them)
    time_min = 240

Settings apply in the order [train] < [cpu.train] < [overrides.M] < [cpu.overrides.M]. An
optional TrainConfig field is unset with the string "none" (``train_size = "none"``).
``model``, ``seed``, ``experiment``, ``run_name``, ``tracking_uri``, ``device`` and ``progress``
come from the study and the command line, not the file. Both scales are expanded and every
run's config validated whichever scale runs, so a file that loads is valid on any machine.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import TrainConfig, apply, check_experiment_name
from .diagnostics import settings as DIAG
from . import slurm as SLURM
from .errors import UserError
from .models import parse_model_name
from .scales import SCALES
from .speed import FUSE_CHOICES

ARCHS = {"plain": "plain", "resnet": "resnet", "residual": "resnet"}  # study arch -> model name prefix
GRID_KEYS = ("archs", "depths", "models", "seeds")
TOP_KEYS = ("name", "description", *GRID_KEYS, "fuse", "train", "overrides", "diagnostics", "cpu", "slurm")
CPU_KEYS = ("description", *GRID_KEYS, "fuse", "train", "overrides", "diagnostics")
DIAG_KEYS = ("run", "seeds", *DIAG.NAMES)  # [diagnostics] / [cpu.diagnostics]: which, on which seeds, sizes
SET_BY_STUDY = {
    "model": "the models come from archs x depths and models",
    "seed": "the seeds come from seeds",
    "experiment": "the MLflow experiment is the study's name",
    "run_name": "runs are named <model>-s<seed>",
    "tracking_uri": "pass --tracking-uri (or set MLFLOW_TRACKING_URI)",
    "device": "pass --devices (or let the study pick cuda/cpu)",
    "progress": "pass --no-progress",
}
TRAIN_FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]

# A table of TrainConfig values as the file gives it: (its label, e.g. "cpu.train", its settings).
# A run's config is its tables applied in order ([train], [cpu.train], [overrides.MODEL], ...).
SettingsTable = tuple[str, dict[str, Any]]


@dataclass(frozen=True)
class StudyRun:
    """One training of a study: its index in the study (1-based) and its full config."""

    index: int
    cfg: TrainConfig

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def config_hash(self) -> str:
        return self.cfg.config_hash()


@dataclass
class Study:
    """One scale of a study file, expanded into runs; every config validated."""

    name: str
    path: Path
    scale: str
    description: str
    archs: list[str]
    depths: list[int]
    models: list[str]  # the explicit models
    seeds: list[int]
    train: dict[str, Any]  # the effective [train] table ([train] then [cpu.train])
    overrides: dict[str, dict[str, Any]]  # per model, effective
    runs: list[StudyRun] = field(default_factory=list)
    diagnostics: DIAG.DiagnosticsPlan = field(default_factory=DIAG.DiagnosticsPlan)
    slurm: SLURM.Settings = field(default_factory=SLURM.Settings)  # [slurm]: sbatch settings (--launcher submitit)
    fuse: str = "auto"  # auto / on / off (``study.group_runs``); ``--fuse`` overrides it

    def params(self) -> dict[str, str]:
        """The parent run's params: the grid of this scale, the effective [train] table as
        ``train.<key>`` and the overrides as ``overrides.<model>.<key>``."""
        out = {"name": self.name, "scale": self.scale, "archs": ",".join(self.archs),
               "depths": ",".join(map(str, self.depths)), "models": ",".join(self.models),
               "seeds": ",".join(map(str, self.seeds)), "runs": str(len(self.runs)),
               "run_names": ",".join(r.name for r in self.runs)[:6000]}
        out |= {f"train.{k}": _param(v) for k, v in sorted(self.train.items())}
        out |= {f"overrides.{m}.{k}": _param(v) for m, table in sorted(self.overrides.items())
                for k, v in sorted(table.items())}
        return out


def _param(value: Any) -> str:
    return "None" if value is None else str(value)


class _FileError:
    """Makes the one-line errors about one study file: ``err("msg")`` is UserError('<file>: msg')."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)

    def __call__(self, message: str) -> UserError:
        return UserError(f"{self.path}: {' '.join(message.split())}")


def load_study(path: str | Path, scale: str = "full") -> Study:
    """Read and validate a study file (both scales), return the runs of ``scale``."""
    if scale not in SCALES:
        raise UserError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    return load_scales(path)[scale]


def load_scales(path: str | Path) -> dict[str, Study]:
    """Both scales of a study file, each expanded and validated; any problem is one UserError."""
    path = Path(path)
    err = _FileError(path)
    data = _read(path)
    _check_keys(data, TOP_KEYS, "", err, "a study has name, description, archs, depths, models, seeds, fuse, "
                "[train], [overrides.MODEL], [cpu] and [slurm]")
    name = data.get("name", path.stem)
    try:
        check_experiment_name(name, "name")
    except UserError as e:
        raise err(str(e)) from None
    description = _string(data, "description", "", err) or ""
    if "cpu" not in data:
        raise err("missing [cpu] table: the reduced settings used on machines without CUDA "
                  "(an empty [cpu] table runs the full settings on CPU)")
    cpu = data["cpu"]
    if not isinstance(cpu, dict):
        raise err(f"cpu must be a table ([cpu]) of reduced settings, got {cpu!r}")
    _check_keys(cpu, CPU_KEYS, "[cpu] ", err, "[cpu] may set description, archs, depths, models, seeds, fuse, "
                "[cpu.train] and [cpu.overrides.MODEL]")

    full_grid = _grid_settings(data, "", err)
    cpu_grid = full_grid | {k: v for k, v in _grid_settings(cpu, "[cpu] ", err).items() if k in cpu}
    full_models = _expand_models(full_grid, {}, err)
    cpu_models = _expand_models(cpu_grid, {k: "[cpu] " for k in GRID_KEYS if k in cpu}, err)
    overrides = _overrides(data, "overrides", full_models + cpu_models, err)
    cpu_overrides = _overrides(cpu, "cpu.overrides", cpu_models, err)
    train = _table(data, "train", err)
    cpu_train = _table(cpu, "cpu.train", err)

    full = _expand(name, path, "full", description, full_grid, full_models, [("train", train)],
                   [("overrides", overrides)], err)
    cpu_description = _string(cpu, "description", "[cpu] ", err) or description
    small = _expand(name, path, "cpu", cpu_description, cpu_grid, cpu_models,
                    [("train", train), ("cpu.train", cpu_train)],
                    [("overrides", overrides), ("cpu.overrides", cpu_overrides)], err)
    full.fuse = _fuse(data, "", "auto", err)
    small.fuse = _fuse(cpu, "[cpu] ", full.fuse, err)
    full.diagnostics = _diagnostics(data.get("diagnostics", {}), "diagnostics", DIAG.FULL, None, full.seeds, err)
    small.diagnostics = _diagnostics(cpu.get("diagnostics", {}), "cpu.diagnostics", DIAG.CPU,
                                     full.diagnostics.names if "diagnostics" in data else None, small.seeds, err)
    full.slurm = small.slurm = SLURM.parse_table(data.get("slurm", {}), str(path))
    return {"full": full, "cpu": small}


def _read(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"study file {path} does not exist (the studies are in experiments/*.toml)") from None
    except OSError as e:
        raise UserError(f"cannot read study file {path}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"study file {path} is not valid TOML: {e}") from None


def _expand(name: str, path: Path, scale: str, description: str, grid: dict[str, list[Any]], models: list[str],
            base: list[SettingsTable], overrides: list[tuple[str, dict[str, dict[str, Any]]]], err: _FileError) -> Study:
    """One scale: a validated config per model, then seed by seed, model by model."""
    per_model: dict[str, TrainConfig] = {}
    effective: dict[str, dict[str, Any]] = {}
    for model in models:
        own = base + [(f"{label}.{model}", tables[model]) for label, tables in overrides if model in tables]
        per_model[model] = _build(model, own, " (cpu scale)" if scale == "cpu" else "", err)
        merged = {k: v for label, tables in overrides if model in tables for k, v in tables[model].items()}
        if merged:
            effective[model] = merged
    runs = [StudyRun(i + 1, dataclasses.replace(per_model[m], seed=seed, experiment=name))
            for i, (seed, m) in enumerate((s, m) for s in grid["seeds"] for m in models)]
    train = {k: v for _, table in base for k, v in table.items()}
    return Study(name=name, path=path, scale=scale, description=description,
                 archs=[ARCHS[a] for a in grid["archs"]], depths=list(grid["depths"]),
                 models=[_model_name(m, "", err) for m in grid["models"]], seeds=list(grid["seeds"]),
                 train=train, overrides=effective, runs=runs)


def _build(model: str, tables: list[SettingsTable], scale_note: str, err: _FileError) -> TrainConfig:
    """``model``'s config from its settings tables in order, validated as a whole; an invalid result
    is blamed on the first table after which the config is invalid (that table names the key)."""
    cfgs = [TrainConfig(model=model)]
    for label, table in tables:
        cfgs.append(_apply(cfgs[-1], table, label, err))
    try:
        return cfgs[-1].validate()
    except UserError as final:
        for (label, _), cfg in zip(tables, cfgs[1:]):
            try:
                cfg.validate()
            except UserError as e:
                note = "" if label.startswith("cpu.") else scale_note
                raise err(f"[{label}] {e}{note}") from None
        raise err(f"{model}{scale_note}: {final}") from None


def _apply(cfg: TrainConfig, table: dict[str, Any], label: str, err: _FileError) -> TrainConfig:
    """``cfg`` with one table of TrainConfig fields applied (not yet validated)."""
    for key in table:
        if key in SET_BY_STUDY:
            raise err(f"[{label}] {key} cannot be set in a study file: {SET_BY_STUDY[key]}")
        if key not in TRAIN_FIELDS:
            close = difflib.get_close_matches(key, TRAIN_FIELDS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise err(f"[{label}] unknown key {key!r}{hint}: the keys are TrainConfig fields, "
                      "see 'resnet-lab train --help-config'")
    try:
        return apply(cfg, table, f"[{label}]")
    except UserError as e:
        raise err(f"[{label}] {e}") from None


def _check_keys(table: dict[str, Any], allowed: tuple[str, ...], label: str, err: _FileError, what: str) -> None:
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            if key in TRAIN_FIELDS:
                hint = f" (training settings go in the [{label.strip('[] ') + '.' if label else ''}train] table)"
            raise err(f"{label}unknown key {key!r}{hint}: {what}")


def _string(table: dict[str, Any], key: str, label: str, err: _FileError) -> str | None:
    value = table.get(key)
    if value is not None and not isinstance(value, str):
        raise err(f"{label}{key} must be a string, got {value!r}")
    return value


def _fuse(table: dict[str, Any], label: str, default: str, err: _FileError) -> str:
    value = table.get("fuse", default)
    if value not in FUSE_CHOICES:
        raise err(f'{label}fuse must be "auto", "on" or "off", got {value!r}')
    return value


def _table(parent: dict[str, Any], label: str, err: _FileError) -> dict[str, Any]:
    value = parent.get(label.split(".")[-1], {})
    if not isinstance(value, dict):
        raise err(f"{label} must be a table ([{label}]) of training settings, got {value!r}")
    return value


def _grid_settings(table: dict[str, Any], label: str, err: _FileError) -> dict[str, list[Any]]:
    """archs, depths, models, seeds of one table, type-checked (defaults for the missing ones)."""
    out: dict[str, list[Any]] = {"archs": ["plain", "resnet"], "depths": [], "models": [], "seeds": [0]}
    kinds = {"archs": str, "depths": int, "models": str, "seeds": int}
    for key, kind in kinds.items():
        if key not in table:
            continue
        value = table[key]
        noun = "strings" if kind is str else "integers"
        if not isinstance(value, list):
            raise err(f"{label}{key} must be a list of {noun}, got {value!r}")
        for item in value:
            if not isinstance(item, kind) or isinstance(item, bool):
                raise err(f"{label}{key} must be a list of {noun}, got {item!r} in {value!r}")
        dups = sorted({str(v) for v in value if value.count(v) > 1})
        if dups:
            raise err(f"{label}{key} lists {', '.join(dups)} more than once (duplicate runs)")
        out[key] = list(value)
    for arch in out["archs"]:
        if arch not in ARCHS:
            raise err(f"{label}archs: unknown arch {arch!r}: use plain and/or resnet")
    if len({ARCHS[a] for a in out["archs"]}) < len(out["archs"]):
        raise err(f"{label}archs names resnet twice (residual is resnet): duplicate runs")
    for depth in out["depths"]:
        if depth <= 0:
            raise err(f"{label}depths must be positive depths, got {depth}")
        _model_name(f"resnet-{depth}", f"{label}depths: ", err)
    for seed in out["seeds"]:
        if seed < 0:
            raise err(f"{label}seeds must be >= 0, got {seed}")
    return out


def _model_name(name: str, label: str, err: _FileError) -> str:
    try:
        return parse_model_name(name).name
    except UserError as e:
        raise err(f"{label}{e}") from None


def _expand_models(grid: dict[str, list[Any]], labels: dict[str, str], err: _FileError) -> list[str]:
    """archs x depths (depth by depth, plain before resnet), then the explicit models."""
    def label(key: str) -> str:
        return labels.get(key, "")

    if grid["depths"] and not grid["archs"]:
        raise err(f"{label('archs')}archs is empty but depths are given: list plain and/or resnet")
    if not grid["seeds"]:
        raise err(f"{label('seeds')}seeds is empty: give at least one seed, e.g. seeds = [0]")
    archs = sorted(grid["archs"], key=lambda a: ARCHS[a] != "plain")
    names = [f"{ARCHS[a]}-{d}" for d in grid["depths"] for a in archs]
    for model in grid["models"]:
        name = _model_name(model, f"{label('models')}models: ", err)
        if name in names:
            where = "archs x depths" if name in names[:len(grid["depths"]) * len(archs)] else "models"
            raise err(f"{label('models')}models: {name} is already in {where} (duplicate runs)")
        names.append(name)
    if not names:
        raise err(f"{label('depths') or label('models')}the model list is empty (depths and models): give "
                  "depths (x archs) and/or models, e.g. depths = [20, 56]")
    return names


def _overrides(table: dict[str, Any], key: str, models: list[str], err: _FileError) -> dict[str, dict[str, Any]]:
    """[overrides.MODEL] tables, keyed by normalised model name; each names a model of the study."""
    raw = table.get("overrides", {})
    if not isinstance(raw, dict):
        raise err(f"{key} must be tables of per-model settings ([{key}.resnet-110]), got {raw!r}")
    out: dict[str, dict[str, Any]] = {}
    for model, settings in raw.items():
        name = _model_name(model, f"[{key}] ", err)
        if not isinstance(settings, dict):
            raise err(f"[{key}] {model} must be a table of training settings ([{key}.{model}]), got {settings!r}")
        if name in out:
            raise err(f"[{key}] {name} is given twice")
        if name not in models:
            raise err(f"[{key}.{model}] names no model of this study (models: {', '.join(dict.fromkeys(models))})")
        out[name] = settings
    return out


# ---------------------------------------------------------------- [diagnostics] and [cpu.diagnostics]

def _diagnostics(table: Any, label: str, base: DIAG.DiagnosticsSettings, inherited: tuple[str, ...] | None,
                 seeds: list[int], err: _FileError) -> DIAG.DiagnosticsPlan:
    """One scale's diagnostics: ``run`` (which; [cpu.diagnostics] inherits [diagnostics]' list), ``seeds``
    ("all", "first" or a list of the study's seeds; default all at full scale, the first at CPU scale) and
    a table of sizes per diagnostic over the scale's preset (``DIAG.FULL`` or ``DIAG.CPU``)."""
    if not isinstance(table, dict):
        raise err(f"{label} must be a table ([{label}]) of diagnostics settings, got {table!r}")
    _check_keys(table, DIAG_KEYS, f"[{label}] ", err, f"[{label}] may set run, seeds and a table of sizes per "
                f"diagnostic ([{label}.lesion], ...)")
    names = table.get("run", inherited or DIAG.NAMES)
    if not isinstance(names, list | tuple) or not names or any(n not in DIAG.NAMES for n in names):
        raise err(f"[{label}] run must be a non-empty list of {', '.join(DIAG.NAMES)}, got {names!r}")
    pick = table.get("seeds", "first" if base is DIAG.CPU else "all")
    if pick == "all":
        chosen = None
    elif pick == "first":
        chosen = (seeds[0],)
    elif isinstance(pick, list) and pick and all(isinstance(s, int) and s in seeds for s in pick):
        chosen = tuple(dict.fromkeys(pick))
    else:
        raise err(f"[{label}] seeds must be \"all\", \"first\" or a list of the study's seeds {seeds}, got {pick!r}")
    sizes = {name: _sizes(getattr(base, name), table.get(name, {}), f"{label}.{name}", err) for name in DIAG.NAMES}
    return DIAG.DiagnosticsPlan(tuple(n for n in DIAG.NAMES if n in names), chosen, DIAG.DiagnosticsSettings(**sizes))


def _sizes(default: Any, table: Any, label: str, err: _FileError) -> Any:
    """``default`` (a settings dataclass) with the keys of ``table``; types checked here, ranges by the dataclass."""
    if not isinstance(table, dict):
        raise err(f"{label} must be a table ([{label}]) of sizes, got {table!r}")
    known = {f.name: f for f in dataclasses.fields(default)}
    _check_keys(table, tuple(known), f"[{label}] ", err, f"[{label}] sets {', '.join(known)}")
    values = {}
    for key, value in table.items():
        current = getattr(default, key)
        if isinstance(current, tuple):
            ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            value = tuple(value) if ok else value
        else:
            ok = isinstance(value, int | float) and not isinstance(value, bool) and \
                (isinstance(current, float) or isinstance(value, int))
        if not ok:
            raise err(f"[{label}] {key} must be {'a list of integers' if isinstance(current, tuple) else type(current).__name__}"
                      f", got {value!r}")
        values[key] = float(value) if isinstance(current, float) else value
    try:
        return dataclasses.replace(default, **values)
    except UserError as e:
        raise err(f"[{label}] {e}") from None
