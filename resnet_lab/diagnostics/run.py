"""``resnet-lab diagnose``: the four diagnostics on finished training runs, logged into those runs.

For each finished run of a study (or one ``--run``): download its final and initial weights,
rebuild the net from its ``config.json``, load its data as training did (same dataset, split
and normalisation; fixed, seeded, unaugmented subsets from ``common.subset``), run the
diagnostics it does not have yet, and log each one:

1. the table as the artifact ``diagnostics/<name>.parquet``;
2. its metrics and the completion tag ``diag.<name> = <settings hash>`` in ONE ``log_batch``.

A run has a diagnostic only when it has the tag, and the tag is written last, so a process
killed at any moment leaves each diagnostic either complete (tag, metrics, table) or
not counted, and a rerun redoes exactly the uncounted ones. (MLflow 3's SQL store commits
a batch's metrics and then its tags in two transactions, so a kill between them can leave
metrics without the tag; the rerun logs them again at the same step, with the same values.)
A diagnostic logged with other sizes (another settings hash) is redone.

The shattering depth sweep at init trains nothing and belongs to no run: it is logged the
same way to the study's parent run (``diagnostics/shattering_sweep.parquet``,
``diag.shattering_sweep``).

Every check (names, scale, store, study, runs finished and with weights, data, subset
sizes) happens before the first log call, so bad input logs nothing.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm import tqdm

from ..data import Dataset, load_dataset
from ..errors import UserError
from ..models import ResNet, build_model
from ..tracking import (absolute_uri, connect, display_uri, no_download_bars, resolve_tracking_uri, search_all_runs,
                        sqlite_path)
from . import settings as S
from .common import BN_IMAGES, CURVATURE_IMAGES, LANDSCAPE_IMAGES, LESION_IMAGES, SHATTERING_IMAGES, subset
from .curvature import curvature
from .landscape import landscape
from .lesion import lesion
from .shattering import depth_sweep, shattering

META = torch.device("meta")  # where the check pass "prepares" jobs: shapes and dtypes, no storage
WEIGHTS = ("model/state_dict.pt", "model/init_state_dict.pt", "config.json")
SWEEP = "shattering_sweep"
TAG_PREFIX = "diag."
# the config.json fields that say which net and which data a run had (the rest is how it trained)
BUILD_FIELDS = ("model", "shortcut", "zero_init_residual", "dataset", "data_dir", "data_root", "resize",
                "val_size", "train_size", "seed")


def tag_key(name: str) -> str:
    return f"{TAG_PREFIX}{name}"


def parse_only(text: str | None) -> tuple[str, ...] | None:
    """``--only lesion,curvature`` -> ("lesion", "curvature"), in run order; None: what the plan says."""
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in S.NAMES]
    if bad or not names:
        raise UserError(f"--only: unknown diagnostic {bad[0] if bad else text!r}; choose from {','.join(S.NAMES)}")
    return tuple(n for n in S.NAMES if n in names)


# ---------------------------------------------------------------- one run, prepared


@dataclass
class Job:
    """One run's diagnostics still to do, with everything they need on the device once ``prepare``d.

    ``diagnose`` prepares every job on the "meta" device first (every check, no memory), then each
    on the real device just before it runs and ``release``s it after: one run's tensors at a time.
    """

    run_id: str
    name: str
    todo: tuple[str, ...]
    settings: S.DiagnosticsSettings
    model: ResNet | None = None
    init: dict[str, torch.Tensor] = field(default_factory=dict)
    data: Dataset | None = None
    inputs: dict[str, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    run: Any = None  # the MLflow run, to prepare it again on the real device

    def release(self) -> None:
        """Drop the weights and inputs (the device memory they hold); the data stays cached on the host."""
        self.model, self.init, self.inputs = None, {}, {}


def todo_of(run: Any, names: tuple[str, ...], settings: S.DiagnosticsSettings) -> tuple[str, ...]:
    """The diagnostics ``run`` lacks: no completion tag, or one with another settings hash."""
    return tuple(n for n in names if run.data.tags.get(tag_key(n)) != settings.hash(n))


def check_run(client: Any, run: Any) -> None:
    """A run can be diagnosed: FINISHED, with both weights and its config logged (older runs lack the init weights)."""
    name = f"run {run.info.run_id} ({run.info.run_name})"
    if run.info.status != "FINISHED":
        raise UserError(f"{name} is {run.info.status}, not FINISHED: diagnostics need a finished training; "
                        "finish it with 'resnet-lab study FILE' first")
    have = {a.path for d in ("model", "") for a in client.list_artifacts(run.info.run_id, d or None)}
    missing = [w for w in WEIGHTS if w not in have]
    if missing:
        raise UserError(f"{name} has no {missing[0]} artifact (trained before the lab logged it): retrain it "
                        "(delete the run, rerun the study), or diagnose other runs with --run RUN_ID")


@lru_cache(maxsize=4)
def _dataset(key: tuple[Any, ...]) -> Dataset:
    dataset, data_dir, data_root, val_size, seed, resize, train_size = key
    return load_dataset(dataset, data_dir=data_dir, data_root=data_root or "data", val_size=val_size or 0, seed=seed,
                        resize=resize, train_size=train_size, download=False)


def run_data(run: Any, cfg: dict[str, Any]) -> Dataset:
    """The run's data as its training loaded it (the dataset, split and normalisation of its config)."""
    try:
        return _dataset(tuple(cfg.get(k) for k in ("dataset", "data_dir", "data_root", "val_size", "seed", "resize",
                                                    "train_size")))
    except UserError as e:
        raise UserError(f"run {run.info.run_id} ({run.info.run_name}): {e}") from None



def run_config(client: Any, run: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(client.download_artifacts(run.info.run_id, "config.json", tmp)).read_text()
    return {k: json.loads(text).get(k) for k in BUILD_FIELDS}


def prepare(client: Any, run: Any, job: Job, device: torch.device) -> Job:
    """Weights downloaded, net rebuilt, data loaded as training did, the subsets drawn (UserError if too few).

    On ``torch.device("meta")`` this checks all of it and holds no memory (tensors without storage)."""
    job.run = run
    cfg = run_config(client, run)
    with tempfile.TemporaryDirectory() as tmp:
        local = {w: Path(client.download_artifacts(run.info.run_id, w, tmp)) for w in WEIGHTS[:2]}
        final = torch.load(local["model/state_dict.pt"], map_location=device, weights_only=True)
        job.init = torch.load(local["model/init_state_dict.pt"], map_location=device, weights_only=True)
    job.data = data = run_data(run, cfg)
    job.model = build_model(cfg["model"], in_channels=data.in_channels, num_classes=data.num_classes,
                            shortcut=cfg["shortcut"], zero_init_residual=bool(cfg["zero_init_residual"])).to(device)
    job.model.load_state_dict(final)
    job.inputs = draw_inputs(data, job.todo, job.settings, device)
    return job


def draw_inputs(data: Dataset, names: tuple[str, ...], s: S.DiagnosticsSettings,
                device: torch.device) -> dict[str, tuple[torch.Tensor, ...]]:
    """The fixed subsets each diagnostic runs on (seeded by its settings' seed, so the same for every run
    of the same data: plain-n and resnet-n are measured on the same images)."""
    def pick(split: Any, n: int, seed: int, purpose: int) -> tuple[torch.Tensor, torch.Tensor]:
        return subset(split, n, seed=seed, purpose=purpose, mean=data.mean, std=data.std, device=device)

    out: dict[str, tuple[torch.Tensor, ...]] = {}
    if "lesion" in names:
        out["lesion"] = pick(data.test, s.lesion.test_images, s.lesion.seed, LESION_IMAGES)
    if "landscape" in names:
        out["landscape"] = pick(data.train, s.landscape.train_images, s.landscape.seed, LANDSCAPE_IMAGES)
    if "curvature" in names:
        c = s.curvature
        out["curvature"] = pick(data.train, c.images * c.subsets, c.seed, CURVATURE_IMAGES)
    if "shattering" in names:
        sh = s.shattering
        x, y = pick(data.test, 2 * sh.pairs, sh.seed, SHATTERING_IMAGES)
        out["shattering"] = (x, y, pick(data.train, sh.bn_images, sh.seed, BN_IMAGES)[0])
    return out


def measure(job: Job, name: str) -> tuple[pd.DataFrame, dict[str, float]]:
    """One diagnostic on a prepared job: (table, metrics)."""
    s, model, inp = job.settings, job.model, job.inputs[name]
    assert model is not None and job.data is not None
    if name == "lesion":
        return lesion(model, inp[0], inp[1], s.lesion)
    if name == "landscape":
        return landscape(model, job.init, inp[0], inp[1], s.landscape)
    if name == "curvature":
        return curvature(model, inp[0], inp[1], s.curvature)
    x, y, bn = inp  # shattering: at init (the logged iteration-0 weights) and at the end
    at_init = build_model(model.spec.name, in_channels=job.data.in_channels, num_classes=job.data.num_classes,
                          shortcut=model.shortcut_option if model.spec.residual else None).to(x.device)
    at_init.load_state_dict(job.init)
    df0, m0 = shattering(at_init, x, y, bn, s.shattering, moment="init")
    df1, m1 = shattering(model, x, y, bn, s.shattering, moment="final")
    return pd.concat([df0, df1], ignore_index=True), m0 | m1


def log_diagnostic(client: Any, run_id: str, name: str, table: pd.DataFrame, metrics: dict[str, float],
                   settings_hash: str) -> None:
    """Table first, then metrics and the completion tag in one call: the tag is the commit point."""
    from mlflow.entities import Metric, RunTag

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.parquet"
        table.to_parquet(path, index=False)
        client.log_artifact(run_id, str(path), "diagnostics")
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                     tags=[RunTag(tag_key(name), settings_hash)], synchronous=True)


# ---------------------------------------------------------------- finding the runs


def open_store(uri: str) -> Any:
    """A client for an existing store: a SQLite file that is not there is an error (connecting would create it)."""
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise UserError(f"no MLflow tracking store at {display_uri(uri)} (file {db} not found): run the study "
                        "first, or pass --tracking-uri / set MLFLOW_TRACKING_URI to the store it wrote")
    return connect(uri)


def study_runs(client: Any, study: Any) -> tuple[Any, list[Any]]:
    """(the study's parent run or None, its finished training runs of the plan's seeds, newest per name)."""
    exp = client.get_experiment_by_name(study.name)
    if exp is None:
        raise UserError(f"no MLflow experiment {study.name!r} in the store: run 'resnet-lab study {study.path}' first")
    runs = search_all_runs(client, exp.experiment_id, f"tags.study = '{study.name}' and tags.scale = '{study.scale}'",
                           order_by=["attributes.start_time DESC"])
    parents = [r for r in runs if r.data.tags.get("kind") == "study"]
    seeds = study.diagnostics.seeds
    finished: dict[str, Any] = {}
    for r in runs:
        if r.data.tags.get("kind") == "train" and r.info.status == "FINISHED" and \
                (seeds is None or int(r.data.tags.get("seed", -1)) in seeds):
            finished.setdefault(r.info.run_name, r)
    if not finished:
        raise UserError(f"no finished training runs of study {study.name!r} ({study.scale} scale"
                        f"{'' if seeds is None else ', seeds ' + ','.join(map(str, seeds))}) in the store: "
                        f"run 'resnet-lab study {study.path}' first")
    order = {r.name: i for i, r in enumerate(study.runs)}
    return (parents[0] if parents else None), sorted(finished.values(), key=lambda r: order.get(r.info.run_name, 1e9))


# ---------------------------------------------------------------- the command


@dataclass
class Sweep:
    """The shattering depth sweep at init, for the study's parent run."""

    parent_id: str
    settings: S.DiagnosticsSettings
    data: Dataset
    inputs: tuple[torch.Tensor, ...]


@dataclass
class DiagnoseResult:
    logged: list[str] = field(default_factory=list)  # "<run name>: <diagnostic>"
    already: int = 0  # diagnostics found logged with the same settings


def diagnose(study_file: str | Path | None = None, run_id: str | None = None, *, only: str | None = None,
             scale: str = "auto", tracking_uri: str | None = None, progress: bool = True) -> DiagnoseResult:
    """Check everything, then run and log what is missing; see the module docstring."""
    from ..studyfile import load_scales
    from ..train import select_device

    names = parse_only(only)
    if (study_file is None) == (run_id is None):
        raise UserError("diagnose needs a STUDY_FILE or --run RUN_ID (one of the two)")
    if scale not in ("auto", "cpu", "full"):
        raise UserError(f"--scale must be auto, cpu or full, got {scale!r}")
    device = select_device("auto")
    scale = scale if scale != "auto" else ("full" if device.type == "cuda" else "cpu")
    study = load_scales(study_file)[scale] if study_file is not None else None
    plan = study.diagnostics if study is not None else S.DiagnosticsPlan(settings=S.FULL if scale == "full" else S.CPU)
    names = names or plan.names
    client = open_store(absolute_uri(resolve_tracking_uri(tracking_uri)))
    parent, runs = study_runs(client, study) if study is not None else (None, [_get_run(client, run_id)])
    result, jobs = DiagnoseResult(), []
    with no_download_bars():
        for run in runs:
            check_run(client, run)
            todo = todo_of(run, names, plan.settings)
            result.already += len(names) - len(todo)
            if todo:  # checked now, on "meta"; put on the device only when its turn comes
                jobs.append(prepare(client, run, Job(run.info.run_id, run.info.run_name, todo, plan.settings), META))
        sweep = _sweep_job(client, parent, runs[0], names, plan.settings, device) if parent is not None else None
        result.already += parent is not None and "shattering" in names and sweep is None  # the sweep, done before
    # ---- everything checked: from here on, logging
    for job in jobs:
        try:
            _run_job(client, prepare(client, job.run, job, device), result, progress)
        finally:
            job.release()
    if sweep is not None:
        _run_sweep(client, sweep, result, progress)
    return result


def _get_run(client: Any, run_id: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        raise UserError(f"no run {run_id!r} in the tracking store (check the id, or --tracking-uri)") from None


def _sweep_job(client: Any, parent: Any, first: Any, names: tuple[str, ...], settings: S.DiagnosticsSettings,
               device: torch.device) -> Sweep | None:
    """The sweep to do on the parent run, on the data of the study's first run; None if done or not asked for."""
    if "shattering" not in names or parent.data.tags.get(tag_key(SWEEP)) == settings.hash(SWEEP):
        return None
    data = run_data(first, run_config(client, first))
    return Sweep(parent.info.run_id, settings, data, draw_inputs(data, ("shattering",), settings, device)["shattering"])


def _say(text: str) -> None:
    print(f"resnet-lab diagnose: {text}", file=sys.stderr, flush=True)


def _run_job(client: Any, job: Job, result: DiagnoseResult, progress: bool) -> None:
    bar = tqdm(job.todo, desc=job.name, unit="diag", disable=not progress, dynamic_ncols=True, leave=False)
    for name in bar:
        bar.set_postfix_str(name, refresh=True)
        t0 = time.perf_counter()
        table, metrics = measure(job, name)
        log_diagnostic(client, job.run_id, name, table, metrics, job.settings.hash(name))
        result.logged.append(f"{job.name}: {name}")
        _say(f"{job.name}: {name} logged ({time.perf_counter() - t0:.1f} s)")
    bar.close()


def _run_sweep(client: Any, sweep: Sweep, result: DiagnoseResult, progress: bool) -> None:
    t0 = time.perf_counter()
    sh = sweep.settings.shattering
    if progress:
        _say(f"shattering sweep at init: depths {', '.join(map(str, sh.sweep_depths))}, {sh.sweep_seeds} seed(s)")
    x, y, bn = sweep.inputs
    table, metrics = depth_sweep(x, y, bn, sh, in_channels=sweep.data.in_channels, num_classes=sweep.data.num_classes)
    log_diagnostic(client, sweep.parent_id, SWEEP, table, metrics, sweep.settings.hash(SWEEP))
    result.logged.append(f"study: {SWEEP}")
    _say(f"study: {SWEEP} logged ({time.perf_counter() - t0:.1f} s)")
