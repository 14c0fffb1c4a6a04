"""Read a study's runs from any MLflow tracking store into tidy pandas DataFrames.

A *study* is one MLflow experiment (named after the study) holding one parent run
(tags ``kind=study``, ``study``, ``scale``) and one child run per training (``kind=train``).
``load_study`` returns a :class:`Study` with:

* ``runs``: one row per finished child run: ids, model/arch/depth/seed, status, scale, key
  params and the final value of each scalar metric (``train_error``, ``test_error``, ...), and of
  every ``diag/*`` metric (the diagnostics' per-run numbers) as a ``diag_*`` column.
* ``curves``: run_id, model, arch, depth, seed, iteration, metric, value for the scalar
  curves (``train/error``, ``test/error``, ``val/error``, ``train/loss``, ``test/loss``, ``val/loss``, ``lr``).
* the probe tables from each run's ``probes/*.parquet`` artifacts (never from the hundreds of
  per-layer metric keys), with run_id/model/arch/depth/seed columns added:
  ``grad_flow`` and ``responses`` as logged; ``grad_norms`` at the probe points (init, each
  evaluation, end) as the mean over the logging window before the point; and
  ``grad_norm_series``, the per-iteration norms averaged into at most ``max_points`` bins.

How it stays fast: one ``search_runs`` call gives every run's tags, params and final
metrics; each curve key is one bulk history read for all runs (one SQL query on a database
store, the server's ``get-history-bulk`` endpoint on a tracking server; ``get_metric_history``
per run only where neither exists), and each run's probe tables are one artifact read,
reduced with numpy on arrival (64k iterations x 220 layers -> a few hundred points).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from resnet_lab import plateau
from resnet_lab.errors import UserError
from resnet_lab.scales import SCALES
from resnet_lab.tracking import connect, display_uri, is_sqlite, no_download_bars, resolve_tracking_uri, search_all_runs, sqlite_path

CURVE_KEYS = ("train/error", "test/error", "val/error", "train/loss", "test/loss", "val/loss", "lr",
              plateau.HISTORY_KEY)  # the last: loss on a fixed unaugmented training subset (the plateau's curve)
FINAL_KEYS = (*CURVE_KEYS, "perf/images_per_s")
PLATEAU_KEY = plateau.FINAL_KEY  # 1.0: the run reached its plateau (resnet_lab.plateau), 0.0: not; absent: not measured
ERROR_COLUMNS = ("train_error", "test_error", "val_error")
METRIC_COLUMNS = ("train_error", "test_error", "val_error", "train_loss", "test_loss", "val_loss")
ID_COLUMNS = ["run_id", "model", "arch", "depth", "seed"]
# TrainConfig fields worth a column in ``runs``; every param stays in ``Study.params``.
KEY_PARAMS = ("dataset", "iterations", "epochs", "batch_size", "lr", "momentum", "weight_decay", "milestones",
              "lr_decay", "warmup_iterations", "log_every", "eval_every", "grad_every", "train_size", "test_size", "val_size",
              "augment", "shortcut", "zero_init_residual", "resize", "probes")
PROBE_FILES = {"grad_norms": "grad_norms.parquet", "grad_flow": "grad_flow.parquet",
               "responses": "responses.parquet"}
DEFAULT_MAX_POINTS = 500
IO_THREADS = 8
BULK_ENDPOINT = "/ajax-api/2.0/mlflow/metrics/get-history-bulk"  # the tracking server's bulk history read
BULK_MAX_RUNS, BULK_MAX_POINTS = 100, 25000  # the server's limits on one bulk answer
DIAG_PREFIX = "diag/"  # per-run diagnostic numbers: a ``diag_*`` column each in ``runs``
DIAGNOSTICS = ("lesion", "landscape", "curvature", "shattering")  # per-run tables diagnostics/<name>.parquet
SWEEP = "shattering_sweep"  # the parent run's table: shattering at init over depths (no training run)


def metric_column(key: str) -> str:
    """``"train/error" -> "train_error"``: the ``runs`` column of a metric's final value."""
    return key.replace("/", "_")


def shared_param(runs: pd.DataFrame, name: str) -> str | None:
    """A training param's value (``param_<name>`` column) if every run shares it, else None; a
    param logged as "None" (an unset optional field) counts as absent."""
    values = set(runs.get(f"param_{name}", pd.Series(dtype=object)).dropna().astype(str)) - {"None"}
    return values.pop() if len(values) == 1 else None


def shared_milestones(runs: pd.DataFrame) -> list[int]:
    """The lr-drop iterations if every run shares them, else []."""
    try:
        ms = json.loads(shared_param(runs, "milestones") or "null")
    except (ValueError, TypeError):
        return []
    return [int(m) for m in ms] if isinstance(ms, list) else []


def display_name(model: str, arch: str | None = None, depth: int | None = None) -> str:
    """Paper-style label: ``resnet-56 -> ResNet-56``, ``plain-56 -> plain-56``."""
    if model.startswith("resnet-"):
        return "ResNet-" + model[len("resnet-"):]
    return model


@dataclass
class ParentRun:
    run_id: str
    run_name: str
    tags: dict[str, str]
    params: dict[str, str]
    study_file: str | None = None  # artifact path, e.g. study/cifar10_paper.toml
    study_text: str | None = None


@dataclass
class Study:
    """Everything the figures and the report need, already tidy."""

    name: str
    tracking_uri: str
    experiment_id: str
    parent: ParentRun | None
    runs: pd.DataFrame
    curves: pd.DataFrame
    grad_norms: pd.DataFrame
    grad_norm_series: pd.DataFrame
    grad_flow: pd.DataFrame
    responses: pd.DataFrame
    params: dict[str, dict[str, str]] = field(default_factory=dict)  # run_id -> every param
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per loading phase
    left_out: pd.DataFrame | None = None  # child runs not used (unfinished, superseded), with why
    # diagnostics/<name>.parquet of each run that has diagnostic <name> (its diag.<name> tag), ID columns
    # added; "shattering_sweep" from the parent run. A diagnostic no run has is absent.
    diagnostics: dict[str, pd.DataFrame] = field(default_factory=dict)

    @property
    def scale(self) -> str | None:
        if self.parent is not None and self.parent.tags.get("scale"):
            return self.parent.tags["scale"]
        scales = sorted(self.runs["scale"].dropna().unique()) if "scale" in self.runs else []
        return ", ".join(scales) or None

    def select(self, keep: Callable[[pd.DataFrame], pd.Series] | Iterable[str]) -> "Study":
        """A copy with only some runs: a mask function of ``runs`` or an iterable of run ids."""
        mask = keep(self.runs) if callable(keep) else self.runs["run_id"].isin(list(keep))
        ids = set(self.runs.loc[mask, "run_id"])
        pick = lambda df: df[df["run_id"].isin(ids)].reset_index(drop=True)  # noqa: E731
        return replace(self, runs=pick(self.runs), curves=pick(self.curves), grad_norms=pick(self.grad_norms),
                       grad_norm_series=pick(self.grad_norm_series), grad_flow=pick(self.grad_flow),
                       responses=pick(self.responses), params={k: v for k, v in self.params.items() if k in ids},
                       notes=list(self.notes),
                       diagnostics={k: pick(v) if "run_id" in v else v for k, v in self.diagnostics.items()})


# --------------------------------------------------------------------------- loading


def load_study(study: str, tracking_uri: str | None = None, *, scale: str | None = None,
               max_points: int = DEFAULT_MAX_POINTS, probes: bool = True) -> Study:
    """Load a study (= MLflow experiment ``study``) from ``tracking_uri``.

    ``scale`` picks the parent run (and its children) when the experiment holds both a
    ``cpu`` and a ``full`` study; default: the most recent parent's scale. Only FINISHED
    child runs are used; for several finished runs of the same model and seed the newest
    wins. What is left out and why is in ``notes`` and ``left_out``. An unknown experiment
    or one with no finished training runs is a ``UserError``.
    """
    if scale is not None and scale not in SCALES:
        raise UserError(f"`scale` must be {' or '.join(SCALES)}, got {scale!r}")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    uri = resolve_tracking_uri(tracking_uri)
    _require_sqlite_file(uri)
    client = connect(uri)
    exp = client.get_experiment_by_name(study)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments(max_results=50))
        known = f"; experiments there: {', '.join(names[:12])}" if names else "; the store has no experiments"
        raise UserError(f"no MLflow experiment {study!r} in tracking store {display_uri(uri)}{known} "
                        "(run the study first, or pass `tracking_uri`)")
    all_runs = search_all_runs(client, exp.experiment_id)
    timings["search_runs"] = time.perf_counter() - t0

    notes: list[str] = []
    parent = _pick_parent(all_runs, study, scale)
    children = _children(all_runs, study, parent, scale)
    if not children:
        where = f"experiment {study!r} in tracking store {display_uri(uri)}"
        held = _scales_held(all_runs, study)
        if scale is not None and held:
            raise UserError(f"no {scale}-scale training runs in {where}; it holds "
                            + ", ".join(f"{s}-scale runs ({n})" for s, n in held.items())
                            + f": pass `scale` {' or '.join(held)}, or run the study at {scale} scale first")
        raise UserError(f"no training runs in {where}: run the study first (or check the study name / `tracking_uri`)")
    runs_df, params = _runs_frame(children)
    runs_df, left_out = _finished_newest(runs_df)
    for row in left_out.itertuples():
        notes.append(f"{row.run_name} (run {row.run_id[:8]}, {row.status.lower()}) left out: {row.reason}")
    if runs_df.empty:
        raise UserError(f"no finished training runs in experiment {study!r} in tracking store {display_uri(uri)} "
                        f"({len(left_out)} unfinished: {', '.join(sorted(set(left_out['status'])))})")
    params = {rid: params[rid] for rid in runs_df["run_id"]}
    if parent is not None:
        parent = _with_study_file(client, uri, parent)
    else:
        notes.append(f"experiment {study!r} has no study parent run (tag kind=study): the study config is not "
                     "shown and the report is not logged to MLflow")

    t1 = time.perf_counter()
    curves = _load_curves(client, runs_df, children)
    # the schedule rides along with the frame (pandas keeps attrs through filtering), so a notebook's
    # draw_degradation(study.curves[...]) marks the lr drops by itself
    curves.attrs.update(milestones=shared_milestones(runs_df), lr_decay=_float(shared_param(runs_df, "lr_decay")))
    timings["curves"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    tables = _load_probes(uri, runs_df, children, max_points=max_points) if probes else {}
    timings["probes"] = time.perf_counter() - t2
    empty = _empty_probe_frames()
    if probes:
        missing = [n for n in runs_df["run_name"] if n not in set(tables.get("_have", []))]
        if missing:
            notes.append(f"no probe artifacts for {', '.join(missing)}: left out of the gradient and response figures")
        for name, rid, file, why in tables.get("_unreadable", []):
            notes.append(f"could not read {file} of run {name} ({rid[:8]}): {why}; that run is left out of the figures "
                         "and sentences that table feeds")
    t3 = time.perf_counter()
    diagnostics = _load_diagnostics(client, uri, runs_df, children, parent) if probes else {}
    timings["diagnostics"] = time.perf_counter() - t3
    timings["total"] = time.perf_counter() - t0
    return Study(
        name=study, tracking_uri=uri, experiment_id=exp.experiment_id, parent=parent, runs=runs_df, curves=curves,
        grad_norms=tables.get("grad_norms", empty["grad_norms"]),
        grad_norm_series=tables.get("grad_norm_series", empty["grad_norm_series"]),
        grad_flow=tables.get("grad_flow", empty["grad_flow"]),
        responses=tables.get("responses", empty["responses"]),
        params=params, notes=notes, timings=timings, left_out=left_out, diagnostics=diagnostics)


def _require_sqlite_file(uri: str) -> None:
    """A SQLite URI must name an existing file: connecting would create an empty store, and
    a report must leave nothing behind when there is nothing to report."""
    if not is_sqlite(uri):
        return
    path = sqlite_path(uri)
    if path is None or not path.is_file():
        raise UserError(f"no MLflow tracking store at {display_uri(uri)} (file {path or '?'} not found): run the study "
                        "first, or pass `tracking_uri` / set MLFLOW_TRACKING_URI to the store it wrote")


def _pick_parent(all_runs: list[Any], study: str, scale: str | None) -> ParentRun | None:
    parents = [r for r in all_runs if r.data.tags.get("kind") == "study"
               and r.data.tags.get("study", study) == study
               and (scale is None or r.data.tags.get("scale") == scale)]
    if not parents:
        return None
    r = max(parents, key=lambda r: r.info.start_time or 0)
    return ParentRun(run_id=r.info.run_id, run_name=r.info.run_name, tags=dict(r.data.tags),
                     params=dict(r.data.params))


def _scales_held(all_runs: list[Any], study: str) -> dict[str, int]:
    """scale -> number of the study's training runs of that scale in the experiment."""
    held: dict[str, int] = {}
    for r in all_runs:
        tags = r.data.tags
        if tags.get("kind") == "train" and tags.get("study", study) == study and tags.get("scale"):
            held[tags["scale"]] = held.get(tags["scale"], 0) + 1
    return dict(sorted(held.items()))


def _children(all_runs: list[Any], study: str, parent: ParentRun | None, scale: str | None) -> list[Any]:
    """Training runs of the study: ``kind=train`` (or, in an ad-hoc experiment without study
    tags, every run with a ``model`` tag), of the parent's scale when it has one."""
    tagged = [r for r in all_runs if r.data.tags.get("kind") == "train"]
    runs = tagged or [r for r in all_runs if "model" in r.data.tags and r.data.tags.get("kind") != "study"]
    runs = [r for r in runs if r.data.tags.get("study", study) == study]
    want = scale or (parent.tags.get("scale") if parent else None)
    if want:
        runs = [r for r in runs if r.data.tags.get("scale", want) == want]
    return runs


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _int(value: Any) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def _runs_frame(children: list[Any]) -> tuple[pd.DataFrame, dict[str, dict[str, str]]]:
    rows, params = [], {}
    for r in children:
        tags, p, m = r.data.tags, r.data.params, r.data.metrics
        model = tags.get("model") or p.get("model", "?")
        arch = tags.get("arch") or ("plain" if model.startswith("plain") else "residual")
        depth = _int(tags.get("depth")) or _int(model.rsplit("-", 1)[-1])
        row = {
            "run_id": r.info.run_id, "run_name": r.info.run_name, "model": model, "arch": arch, "depth": depth,
            "seed": _int(tags.get("seed", p.get("seed"))), "status": r.info.status, "scale": tags.get("scale"),
            "shortcut": tags.get("shortcut"),  # the option the net was built with (A/B/C; "none" for plain)
            "start_time": pd.to_datetime(r.info.start_time, unit="ms", utc=True) if r.info.start_time else pd.NaT,
            "end_time": pd.to_datetime(r.info.end_time, unit="ms", utc=True) if r.info.end_time else pd.NaT,
            "parent_run_id": tags.get("mlflow.parentRunId"), "device": tags.get("device"),
            "git_commit": tags.get("git_commit"), "git_dirty": tags.get("git_dirty"),
            "torch_version": tags.get("torch_version"), "num_parameters": _int(tags.get("num_parameters")),
            "total_iterations": _int(tags.get("total_iterations")), "config_hash": tags.get("config_hash"),
            "data_source": tags.get("data_source"), "failure_reason": tags.get("failure_reason"),
        }
        row |= {f"param_{k}": p.get(k) for k in KEY_PARAMS}
        row |= {metric_column(k): m.get(k, math.nan) for k in FINAL_KEYS}
        row["plateau"] = m.get(PLATEAU_KEY, math.nan)
        row |= {metric_column(k): v for k, v in m.items() if k.startswith(DIAG_PREFIX)}  # diagnostics' numbers
        rows.append(row)
        params[r.info.run_id] = dict(p)
    df = pd.DataFrame(rows)
    if not df.empty:
        df["depth"] = df["depth"].astype("Int64")
        df["seed"] = df["seed"].astype("Int64")
        df["duration_s"] = (df["end_time"] - df["start_time"]).dt.total_seconds()
    return df, params


def _finished_newest(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """FINISHED runs, newest per (model, seed); the rest with a reason."""
    if df.empty:
        return df, df.assign(reason=[])
    done = df["status"] == "FINISHED"
    unfinished = df[~done].assign(reason=lambda d: d["failure_reason"].fillna("not finished"))
    fin = df[done].sort_values("start_time", ascending=False)
    dup = fin.duplicated(["model", "seed"], keep="first")
    superseded = fin[dup].assign(reason="a newer finished run of the same model and seed is used")
    keep = fin[~dup].copy()
    keep["_arch_order"] = (keep["arch"] != "plain").astype(int)
    keep = keep.sort_values(["_arch_order", "depth", "seed"]).drop(columns="_arch_order").reset_index(drop=True)
    left_out = pd.concat([unfinished, superseded], ignore_index=True) if len(unfinished) + len(superseded) \
        else df.iloc[0:0].assign(reason=[])
    return keep, left_out


def _with_study_file(client: Any, uri: str, parent: ParentRun) -> ParentRun:
    """Attach the study TOML (artifact ``study/<file>``) if the parent run has one."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        repo = get_artifact_repository(client.get_run(parent.run_id).info.artifact_uri, tracking_uri=uri)
        files = [a.path for a in repo.list_artifacts("study") if not a.is_dir]
        toml = [f for f in files if f.endswith(".toml")] or files
        if not toml:
            return parent
        with local_artifacts(repo, toml[0]) as local:
            text = local.read_text(errors="replace")
    except Exception:  # noqa: BLE001 - a parent without a readable study file is fine: no config shown
        return parent
    return replace(parent, study_file=toml[0], study_text=text)


@contextmanager
def local_artifacts(repo: Any, path: str) -> Iterator[Path]:
    """A local path of artifact ``path``: in place for a local store (no copy), else downloaded
    into a temporary directory that lives as long as the ``with`` block (no progress bar)."""
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    if isinstance(repo, LocalArtifactRepository):
        yield Path(repo.artifact_dir) / path
        return
    with tempfile.TemporaryDirectory() as tmp, no_download_bars():
        yield Path(repo.download_artifacts(path, tmp))



def _load_curves(client: Any, runs: pd.DataFrame, children: list[Any]) -> pd.DataFrame:
    """Full histories of the scalar curve keys: one bulk read per key for all runs.

    Runs without a bulk answer (a store without one, a server that refuses it) fall back
    to ``get_metric_history`` per (run, key) in a thread pool.
    """
    have = {r.info.run_id: set(r.data.metrics) for r in children}
    rows: list[tuple[str, str, int, float, int]] = []  # run_id, key, step, value, timestamp
    fallback: list[tuple[str, str]] = []
    for key in CURVE_KEYS:
        ids = [rid for rid in runs["run_id"] if key in have.get(rid, ())]
        if not ids:
            continue
        got = history_bulk(client, ids, key)
        if got is None:
            fallback += [(rid, key) for rid in ids]
        else:
            rows += [(rid, key, step, value, ts) for rid, step, value, ts in got]

    def fetch(job: tuple[str, str]) -> list[tuple[str, str, int, float, int]]:
        rid, key = job
        return [(rid, key, m.step, m.value, m.timestamp) for m in client.get_metric_history(rid, key)]

    if fallback:
        with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
            for part in pool.map(fetch, fallback):
                rows += part
    cols = [*ID_COLUMNS, "iteration", "metric", "value"]
    if not rows:
        return pd.DataFrame(columns=cols)
    df = pd.DataFrame(rows, columns=["run_id", "metric", "iteration", "value", "_ts"])
    # a resumed run may have logged a step twice: keep the last write
    df = df.sort_values(["run_id", "metric", "iteration", "_ts"]).drop_duplicates(
        ["run_id", "metric", "iteration"], keep="last")
    df = df.merge(runs[ID_COLUMNS], on="run_id")
    df["iteration"] = df["iteration"].astype(np.int64)
    df["value"] = df["value"].astype(np.float64)
    return df[cols].reset_index(drop=True)


def history_bulk(client: Any, run_ids: list[str], key: str) -> list[tuple[str, int, float, int]] | None:
    """Every (run_id, step, value, timestamp) of ``key`` in ``run_ids``, in one store read.

    A SQL store (SQLite, Postgres, ...) answers with one query; a tracking server with its
    ``get-history-bulk`` endpoint (100 runs and 25,000 points per answer: a full answer is
    split and asked again, so nothing is silently cut). None when the store has no bulk
    read or the server refuses it; the caller then reads per run.
    """
    from mlflow.store.tracking.rest_store import RestStore

    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    if isinstance(store, RestStore):
        return _rest_history_bulk(store, run_ids, key)
    if callable(getattr(store, "get_metric_history_bulk", None)):
        try:
            found = store.get_metric_history_bulk(run_ids=run_ids, metric_key=key, max_results=None)
        except Exception:  # noqa: BLE001 - fall back to the per-run read
            return None
        return [(m.run_id, int(m.step), float(m.value), int(m.timestamp)) for m in found]
    return None


def _rest_history_bulk(store: Any, run_ids: list[str], key: str) -> list[tuple[str, int, float, int]] | None:
    from mlflow.utils.rest_utils import http_request

    out: list[tuple[str, int, float, int]] = []
    todo = [run_ids[i:i + BULK_MAX_RUNS] for i in range(0, len(run_ids), BULK_MAX_RUNS)]
    while todo:
        chunk = todo.pop()
        try:
            resp = http_request(store.get_host_creds(), BULK_ENDPOINT, "GET", max_retries=2,
                                params={"run_id": chunk, "metric_key": key, "max_results": BULK_MAX_POINTS})
            found = resp.json().get("metrics", []) if resp.status_code == 200 else None
        except Exception:  # noqa: BLE001 - an older or restricted server: read per run
            found = None
        if found is None:
            return None
        if len(found) >= BULK_MAX_POINTS:  # the answer may be cut: ask for halves
            if len(chunk) == 1:
                return None
            todo += [chunk[: len(chunk) // 2], chunk[len(chunk) // 2:]]
            continue
        out += [(m["run_id"], int(m.get("step", 0)), float(m["value"]), int(m.get("timestamp", 0))) for m in found]
    return out


# --------------------------------------------------------------------------- diagnostics artifacts


def _read_table(uri: str, artifact_uri: str, name: str) -> pd.DataFrame | None:
    """``diagnostics/<name>.parquet`` of one run; None when it cannot be read."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        repo = get_artifact_repository(artifact_uri, tracking_uri=uri)
        with local_artifacts(repo, f"diagnostics/{name}.parquet") as path:
            return pd.read_parquet(path)
    except Exception:  # noqa: BLE001 - a table that is not there counts as a diagnostic not run
        return None


def _load_diagnostics(client: Any, uri: str, runs: pd.DataFrame, children: list[Any],
                      parent: ParentRun | None) -> dict[str, pd.DataFrame]:
    """The tables of each run that has the diagnostic (its completion tag ``diag.<name>``), and the
    parent's shattering sweep: one artifact read each, in a thread pool."""
    by_id = {r.info.run_id: r for r in children}
    meta = runs[ID_COLUMNS].set_index("run_id")
    wanted = [(rid, n) for rid in runs["run_id"] for n in DIAGNOSTICS if f"diag.{n}" in by_id[rid].data.tags]
    with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
        tables = list(pool.map(lambda w: _read_table(uri, by_id[w[0]].info.artifact_uri, w[1]), wanted))
    out: dict[str, list[pd.DataFrame]] = {}
    for (rid, name), t in zip(wanted, tables):
        if t is not None:
            m = meta.loc[rid]
            out.setdefault(name, []).append(t.assign(run_id=rid, model=m["model"], arch=m["arch"], depth=m["depth"],
                                                     seed=m["seed"]))
    frames = {k: pd.concat(v, ignore_index=True) for k, v in out.items()}
    if parent is not None and f"diag.{SWEEP}" in parent.tags:
        sweep = _read_table(uri, client.get_run(parent.run_id).info.artifact_uri, SWEEP)
        if sweep is not None:
            frames[SWEEP] = sweep.assign(arch=sweep["arch"].replace({"resnet": "residual"}))
    return frames


# --------------------------------------------------------------------------- probe artifacts


def _empty_probe_frames() -> dict[str, pd.DataFrame]:
    base = [*ID_COLUMNS, "iteration", "layer", "layer_index"]
    return {"grad_norms": pd.DataFrame(columns=[*base, "group", "value", "n_iterations"]),
            "grad_norm_series": pd.DataFrame(columns=[*base, "group", "value", "n_iterations"]),
            "grad_flow": pd.DataFrame(columns=[*base, "value"]),
            "responses": pd.DataFrame(columns=[*base, "value"])}


def _load_probes(uri: str, runs: pd.DataFrame, children: list[Any], *, max_points: int) -> dict[str, Any]:
    artifact_uri = {r.info.run_id: r.info.artifact_uri for r in children}
    windows = {row.run_id: _int(row.param_log_every) or 1 for row in runs.itertuples()}

    def one(rid: str) -> dict[str, pd.DataFrame] | None:
        return _probe_tables_of_run(uri, artifact_uri[rid], window=windows[rid], max_points=max_points)

    ids = list(runs["run_id"])
    # grad_norms of a long run is large (64k iterations x ~230 layers): a few at a time
    with ThreadPoolExecutor(max_workers=min(4, max(1, len(ids)))) as pool:
        results = dict(zip(ids, pool.map(one, ids)))
    names = runs.set_index("run_id")["run_name"]
    out: dict[str, Any] = {"_have": [names[rid] for rid, t in results.items() if t],
                           "_unreadable": [(names[rid], rid, file, why) for rid, t in results.items() if t
                                           for file, why in t.get("_unreadable", [])]}
    meta = runs[ID_COLUMNS].set_index("run_id")
    empty = _empty_probe_frames()
    for name in empty:
        frames = []
        for rid, tables in results.items():
            if tables and name in tables and len(tables[name]):
                t = tables[name]
                m = meta.loc[rid]
                frames.append(t.assign(run_id=rid, model=m["model"], arch=m["arch"], depth=m["depth"],
                                       seed=m["seed"]))
        if frames:
            df = pd.concat(frames, ignore_index=True)
            df["layer"] = df["layer"].astype(str)
            out[name] = df[list(empty[name].columns)]
    return out


def _probe_tables_of_run(uri: str, artifact_uri: str, *, window: int, max_points: int) -> dict[str, pd.DataFrame] | None:
    """Read and reduce one run's ``probes/`` tables; None if the run has none."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        repo = get_artifact_repository(artifact_uri, tracking_uri=uri)
        names = {Path(f.path).name for f in repo.list_artifacts("probes")}
    except Exception:  # noqa: BLE001 - no probes (disabled, or the run died before writing them)
        return None
    if not set(PROBE_FILES.values()) & names:
        return None
    with local_artifacts(repo, "probes") as d:
        return _read_probe_dir(d, names, window, max_points)


def _read_probe_dir(d: Path, names: set[str], window: int, max_points: int) -> dict[str, Any]:
    """The run's probe tables; a file that cannot be read (truncated, corrupt) is left out and named
    under ``"_unreadable"`` as (file, reason), so one damaged artifact costs its figures, not the report."""
    out: dict[str, Any] = {}
    bad: list[tuple[str, str]] = []

    def guarded(file: str, read: Callable[[], Any]) -> Any:
        try:
            return read()
        except Exception as e:  # noqa: BLE001 - pyarrow's ArrowInvalid, OSError, a missing column...
            bad.append((f"probes/{file}", f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"))
            return None

    for key in ("grad_flow", "responses"):
        if PROBE_FILES[key] in names:
            table = guarded(PROBE_FILES[key], lambda key=key: pd.read_parquet(d / PROBE_FILES[key]))
            if table is not None:
                out[key] = table
    if PROBE_FILES["grad_norms"] in names:
        points: set[int] = set()
        for key in ("grad_flow", "responses"):
            if key in out:
                points |= {int(i) for i in out[key]["iteration"]}
        reduced = guarded(PROBE_FILES["grad_norms"], lambda: reduce_grad_norms(
            d / PROBE_FILES["grad_norms"], points=sorted(points), window=window, max_points=max_points))
        if reduced is not None:
            out["grad_norms"], out["grad_norm_series"] = reduced
    if bad:
        out["_unreadable"] = bad
    return out


def _codes(column: Any) -> tuple[np.ndarray, list[str]]:
    """Integer codes and category names of an arrow column (dictionary-encoded or not)."""
    import pyarrow as pa

    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_dictionary(col.type):
        return col.indices.to_numpy(zero_copy_only=False).astype(np.int64), [str(v) for v in col.dictionary.to_pylist()]
    codes, uniques = pd.factorize(np.asarray(col.to_pylist(), dtype=object))
    return codes.astype(np.int64), [str(u) for u in uniques]


@dataclass
class _Wide:
    """A grad-norm table as [iterations x columns]; a column is one (layer, group)."""

    iterations: np.ndarray
    layers: list[str]
    groups: list[str]
    layer_index: np.ndarray
    values: np.ndarray


def _read_tiled(pf: Any) -> _Wide | None:
    """The layout ``Probes.write_tables`` writes: iteration-major, the same (layer, group) columns
    in the same order at every iteration. Only ``iteration`` and ``value`` are decoded for every
    row; the layer columns are read and their tiling checked in the first and last row groups,
    the iterations everywhere. None if the file is laid out otherwise."""
    head = pf.read_row_group(0, columns=["iteration", "layer", "layer_index", "group"])
    it0 = head.column("iteration").to_numpy()
    k = int(np.argmax(it0 != it0[0])) or len(it0)
    n = pf.metadata.num_rows
    if n % k or (k == len(it0) and pf.num_row_groups > 1):
        return None
    lcode, lnames = _codes(head.column("layer"))
    gcode, gnames = _codes(head.column("group"))
    layers, groups = [lnames[c] for c in lcode[:k]], [gnames[c] for c in gcode[:k]]
    if len(set(zip(layers, groups))) != k:
        return None
    col_of = {key: i for i, key in enumerate(zip(layers, groups))}
    offset = 0
    for g in range(pf.num_row_groups):
        rows = pf.metadata.row_group(g).num_rows
        if g in (0, pf.num_row_groups - 1):
            t = head if g == 0 else pf.read_row_group(g, columns=["layer", "group"])
            lc, ln = _codes(t.column("layer"))
            gc, gn = _codes(t.column("group"))
            remap = np.full((len(ln), len(gn)), -1, dtype=np.int64)
            for (a, b), i in col_of.items():
                if a in ln and b in gn:
                    remap[ln.index(a), gn.index(b)] = i
            if not (remap[lc, gc] == (offset + np.arange(rows)) % k).all():
                return None
        offset += rows
    t = pf.read(columns=["iteration", "value"])
    its = t.column("iteration").to_numpy().reshape(-1, k)
    if not (its == its[:, :1]).all():
        return None
    iters = its[:, 0]
    if len(iters) > 1 and not (np.diff(iters) > 0).all():
        return None
    return _Wide(iters, layers, groups, head.column("layer_index").to_numpy()[:k].astype(np.int64),
                 t.column("value").to_numpy().reshape(-1, k))


def _read_any(pf: Any) -> _Wide:
    """Any row order: pivot by sorting (slower; for tables not written by ``Probes``)."""
    t = pf.read(columns=["iteration", "layer", "layer_index", "group", "value"])
    lcode, lnames = _codes(t.column("layer"))
    gcode, gnames = _codes(t.column("group"))
    keys, first, col = np.unique(lcode * len(gnames) + gcode, return_index=True, return_inverse=True)
    iters, row = np.unique(t.column("iteration").to_numpy(), return_inverse=True)
    wide = np.full((len(iters), len(keys)), np.nan)
    wide[row, col] = t.column("value").to_numpy()
    return _Wide(iters, [lnames[c // len(gnames)] for c in keys], [gnames[c % len(gnames)] for c in keys],
                 t.column("layer_index").to_numpy()[first].astype(np.int64), wide)


def reduce_grad_norms(path: Path | str, *, points: Iterable[int], window: int,
                      max_points: int = DEFAULT_MAX_POINTS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One run's per-iteration weight/BN gradient norms -> (at the probe points, binned series).

    At a probe point ``p > 0`` the value is the mean over the measured iterations in
    ``[p - window, p)`` (the steps since the previous log point, the same window as
    ``train/error``); at ``p = 0`` it is iteration 0 alone. The series averages the
    iterations into at most ``max_points`` equal-width bins, placed at the bin's mean
    iteration; runs with at most ``max_points`` measured iterations keep every one.
    A 64k-iteration ResNet-110 (14M rows) becomes ~33 x 219 + 500 x 219 values.
    """
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    cols = ["iteration", "layer", "layer_index", "group", "value", "n_iterations"]
    if pf.metadata.num_rows == 0:
        return pd.DataFrame(columns=cols), pd.DataFrame(columns=cols)
    w = _read_tiled(pf) or _read_any(pf)
    iters, wide = w.iterations, w.values

    def tidy(at: np.ndarray, values: np.ndarray, counts: np.ndarray) -> pd.DataFrame:
        n, k = values.shape
        return pd.DataFrame({
            "iteration": np.repeat(at.astype(np.int64), k),
            "layer": np.tile(np.asarray(w.layers, dtype=object), n),
            "layer_index": np.tile(w.layer_index, n),
            "group": np.tile(np.asarray(w.groups, dtype=object), n),
            "value": values.reshape(-1),
            "n_iterations": np.repeat(counts.astype(np.int64), k),
        })

    snap_at, snap_vals, snap_n = [], [], []
    for p in points:
        lo = np.searchsorted(iters, max(p - window, 0) if p > 0 else 0, side="left")
        hi = np.searchsorted(iters, p, side="left") if p > 0 else lo + int(lo < len(iters) and iters[lo] == 0)
        if hi > lo:
            snap_at.append(p)
            snap_vals.append(np.nanmean(wide[lo:hi], axis=0))
            snap_n.append(hi - lo)
    snaps = (tidy(np.asarray(snap_at), np.vstack(snap_vals), np.asarray(snap_n)) if snap_at
             else pd.DataFrame(columns=cols))

    width = max(1, math.ceil((int(iters[-1]) + 1) / max(1, max_points)))
    bins = iters // width
    starts = np.flatnonzero(np.r_[True, np.diff(bins) != 0])
    counts = np.diff(np.r_[starts, len(iters)])
    sums = np.add.reduceat(wide, starts, axis=0)
    if np.isfinite(sums).all():  # NaN and inf propagate into sums, so every value was finite: one pass
        means = sums / counts[:, None]
    else:  # a missing layer (NaN from the pivot) or a diverged step: mean over the finite values
        finite = np.isfinite(wide)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = (np.add.reduceat(np.where(finite, wide, 0.0), starts, axis=0)
                     / np.add.reduceat(finite.astype(np.int64), starts, axis=0))
    centers = np.rint(np.add.reduceat(iters.astype(np.float64), starts) / counts)
    return snaps, tidy(centers, means, counts)


# --------------------------------------------------------------------------- aggregation


def aggregate(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per model: n_seeds, seeds, run ids/names and mean/std of each final metric.

    ``std`` is the sample standard deviation over seeds (ddof=1), NaN for one seed
    (:func:`analysis.stats.mean_sd_n`). Sorted plain first, then residual, each by depth.
    """
    from .stats import mean_sd_n

    metrics = [c for c in METRIC_COLUMNS if c in runs]
    rows = []
    for model, g in runs.groupby("model", sort=False):
        g = g.sort_values("seed")
        row: dict[str, Any] = {"model": model, "arch": g["arch"].iloc[0], "depth": g["depth"].iloc[0],
                               "n_seeds": len(g), "seeds": list(g["seed"]), "run_ids": list(g["run_id"]),
                               "run_names": list(g["run_name"])}
        for c in metrics:
            row[f"{c}_mean"], row[f"{c}_std"], row[f"{c}_n"] = mean_sd_n(g[c])
        rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out["_a"] = (out["arch"] != "plain").astype(int)
    return out.sort_values(["_a", "depth"]).drop(columns="_a").reset_index(drop=True)


def seed_mean(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Mean and std over seeds (runs) of ``value``, grouped by ``by`` (which should hold ``model``)."""
    if df.empty:
        return pd.DataFrame(columns=[*by, "value", "std", "n"])
    g = df.groupby(by, sort=True, observed=True)["value"]
    return g.agg(value="mean", std="std", n="count").reset_index()
