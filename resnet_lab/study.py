"""Running a depth study (``resnet-lab study FILE``): every run of a study file as an MLflow
child run under one parent run per study and scale.

The order matters for "bad input leaves no trace": validate the file and the options, make
sure the data is there, and only then create the MLflow store, experiment and parent run,
once, in this process (concurrent first writers would race on the SQLite schema). Then skip
children already FINISHED with the same ``config_hash``, and train the rest inline, in worker
processes (``--jobs``) or as Ray tasks; ``train`` resumes a run from its checkpoint by itself.
The study file format is in ``resnet_lab.studyfile``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import checkpoint_path
from .config import TrainConfig
from .errors import UserError
from .studyfile import SCALES, Study, StudyRun, load_scales, load_study  # noqa: F401 - load_study re-exported

DEBIAN_PACKAGE = "dataset-fashion-mnist"


# ---------------------------------------------------------------- data

def ensure_data(study: Study) -> None:
    """Make sure every dataset the study needs is here (download, else Debian's package), and
    check each run's sizes against it, so data problems are one UserError before any run."""
    from .data import load_dataset

    groups: dict[tuple[str, str | None, str], list[TrainConfig]] = {}
    for run in study.runs:
        groups.setdefault((run.cfg.dataset, run.cfg.data_dir, run.cfg.data_root), []).append(run.cfg)
    for (dataset, data_dir, data_root), cfgs in groups.items():
        try:
            data = load_dataset(dataset, data_dir=data_dir, data_root=data_root, download=True)
        except UserError as e:
            if not _may_install(dataset, data_dir):
                raise UserError(f"{study.path}: {e}") from None
            _install_fashion_mnist()
            data = load_dataset(dataset, data_dir=data_dir, data_root=data_root, download=False)
        for cfg in cfgs:
            _check_sizes(study, cfg, len(data.train))


def _may_install(dataset: str, data_dir: str | None) -> bool:
    """Fashion-MNIST found nowhere and no explicit directory given: Debian's package can help."""
    from .data import DEBIAN_FASHION_MNIST_DIR

    return dataset == "fashion-mnist" and data_dir is None and not os.environ.get("FASHION_MNIST_DIR") \
        and not any(DEBIAN_FASHION_MNIST_DIR.glob("train-images-idx3-ubyte*"))


def _install_prefix() -> list[str] | None:
    """[] when root, ['sudo', '-n'] when passwordless sudo works, None when installing is not allowed."""
    if shutil.which("apt-get") is None:
        return None
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        return ["sudo", "-n"]
    return None


def _install_fashion_mnist() -> None:
    """``apt-get install dataset-fashion-mnist`` (after ``apt-get update`` if the first try fails)."""
    manual = f"sudo apt-get install {DEBIAN_PACKAGE}"
    prefix = _install_prefix()
    if prefix is None:
        raise UserError(f"Fashion-MNIST is not on this machine and could not be downloaded: run '{manual}' "
                        "(or set FASHION_MNIST_DIR / data_dir in [train]) and start the study again")
    install = [*prefix, "apt-get", "install", "-y", "-q", DEBIAN_PACKAGE]
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    print(f"resnet-lab study: Fashion-MNIST is not on this machine and could not be downloaded; "
          f"installing Debian's {DEBIAN_PACKAGE}: {' '.join(install)}", file=sys.stderr, flush=True)
    result = subprocess.run(install, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        subprocess.run([*prefix, "apt-get", "update", "-q"], capture_output=True, text=True, env=env)
        result = subprocess.run(install, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1][:200]
        raise UserError(f"installing {DEBIAN_PACKAGE} failed ({tail}): run '{manual}' by hand "
                        "(or set FASHION_MNIST_DIR) and start the study again")


def _check_sizes(study: Study, cfg: TrainConfig, full_train: int) -> None:
    """val_size, train_size, batch_size and an epoch schedule against the dataset's real size."""
    from .train import total_iterations

    where = f"{study.path}: {cfg.name}{' (cpu scale)' if study.scale == 'cpu' else ''}:"
    if cfg.val_size >= full_train:
        raise UserError(f"{where} val_size {cfg.val_size} leaves none of the {full_train} {cfg.dataset} "
                        "training examples for training")
    left = full_train - cfg.val_size
    if cfg.train_size is not None and cfg.train_size > left:
        raise UserError(f"{where} train_size {cfg.train_size} exceeds the {left} {cfg.dataset} training "
                        f"examples left after val_size {cfg.val_size}")
    examples = cfg.train_size or left
    if cfg.batch_size > examples:
        raise UserError(f"{where} batch_size {cfg.batch_size} is larger than the {examples} training examples")
    try:
        cfg.resolved(total_iterations(cfg, examples))
    except UserError as e:
        raise UserError(f"{where} {e}") from None


# ---------------------------------------------------------------- MLflow bookkeeping

def absolute_uri(uri: str) -> str:
    """``sqlite:///rel.db`` -> ``sqlite:////abs/rel.db``, so workers in other directories agree."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def _search_all(client: Any, experiment_id: str, filter_string: str) -> list[Any]:
    """Every active run matching ``filter_string``, newest first."""
    from .tracking import search_all_runs

    return search_all_runs(client, experiment_id, filter_string, order_by=["attributes.start_time DESC"])


def _children_filter(study: Study) -> str:
    return f"tags.kind = 'train' and tags.study = '{study.name}' and tags.scale = '{study.scale}'"


def open_parent(client: Any, experiment_id: str, study: Study) -> tuple[str, bool]:
    """Create the study's parent run, or reopen the existing one of this study+scale (RUNNING).

    MLflow params cannot change, so a reopened parent keeps its first params (new keys are
    added) and says which changed; the study file artifact is always the current one.
    """
    from mlflow.entities import Param

    tags = {"kind": "study", "study": study.name, "scale": study.scale, "study_file": str(study.path)}
    if study.description:
        tags["mlflow.note.content"] = study.description
    existing = _search_all(client, experiment_id, f"tags.kind = 'study' and tags.study = '{study.name}' "
                                                  f"and tags.scale = '{study.scale}'")
    params = study.params()
    if not existing:
        run_id = client.create_run(experiment_id, run_name=study.name, tags=tags).info.run_id
        reused = False
    else:
        run_id = existing[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        old = existing[0].data.params
        changed = sorted(k for k, v in params.items() if k in old and old[k] != v)
        if changed:
            print(f"resnet-lab study: the study's settings changed since parent run {run_id} was created "
                  f"({', '.join(changed[:8])}); the run keeps its first params, the study file artifact "
                  "is the current one", file=sys.stderr)
        params = {k: v for k, v in params.items() if k not in old}
        reused = True
    items = [Param(k, v) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100], synchronous=True)
    client.log_artifact(run_id, str(study.path), "study")
    return run_id, reused


@dataclass
class Plan:
    """What a (re)run does: runs to train, runs already done, and what was found left over."""

    todo: list[StudyRun]
    done: dict[int, Any]  # run index -> its FINISHED MLflow run
    resume: dict[int, str]  # run index -> "resuming run <id> from iteration <n>"
    killed: list[str]  # run ids left RUNNING by a dead study process, now marked KILLED


def _checkpointed_run(cfg: TrainConfig) -> tuple[str, int] | None:
    """(MLflow run id, iteration) of the checkpoint ``train`` would resume ``cfg`` from, if any."""
    import torch

    from .checkpoint import load

    path = checkpoint_path(cfg)
    if path is None or not path.exists():
        return None
    try:
        state = load(path, torch.device("cpu"))
    except UserError:
        return None  # train() reports the unreadable checkpoint when it gets there
    if state.get("config_hash") != cfg.config_hash():
        return None
    return state["run_id"], int(state["iteration"])


def plan_runs(client: Any, experiment_id: str, study: Study) -> Plan:
    """Skip runs FINISHED with the same config_hash. A run left RUNNING is a dead study process's:
    the one its checkpoint names is resumed by ``train``; any other is marked KILLED."""
    by_hash: dict[str, list[Any]] = {}
    for run in _search_all(client, experiment_id, _children_filter(study)):  # newest first
        by_hash.setdefault(run.data.tags.get("config_hash", ""), []).append(run)
    plan = Plan([], {}, {}, [])
    for sr in study.runs:
        runs = by_hash.get(sr.config_hash, [])
        finished = [r for r in runs if r.info.status == "FINISHED"]
        if finished:
            plan.done[sr.index] = finished[0]
            continue
        ckpt = _checkpointed_run(sr.cfg)
        if ckpt and any(r.info.run_id == ckpt[0] for r in runs):
            plan.resume[sr.index] = f"resuming run {ckpt[0]} from its checkpoint at iteration {ckpt[1]}"
        for r in runs:
            if r.info.status == "RUNNING" and (ckpt is None or r.info.run_id != ckpt[0]):
                client.set_tag(r.info.run_id, "failure_reason",
                               "left RUNNING by a study process that died before its first checkpoint; "
                               "the study trains it afresh")
                client.set_terminated(r.info.run_id, "KILLED")
                plan.killed.append(r.info.run_id)
        plan.todo.append(sr)
    return plan


def settle_failed(client: Any, experiment_id: str, study: Study, run: StudyRun, reason: str) -> str | None:
    """After a run ended with an exception or its worker died: its MLflow run, if still RUNNING,
    ends FAILED with ``reason``. Returns the run's id (None if it never got one)."""
    runs = _search_all(client, experiment_id, f"{_children_filter(study)} and tags.config_hash = '{run.config_hash}'")
    for r in runs:
        if r.info.status == "RUNNING":
            client.set_tag(r.info.run_id, "failure_reason", reason[:5000])
            client.set_terminated(r.info.run_id, "FAILED")
    return runs[0].info.run_id if runs else None


# ---------------------------------------------------------------- running

@dataclass
class Outcome:
    run: StudyRun
    status: str  # FINISHED / FAILED / KILLED / SKIPPED
    run_id: str | None
    metrics: dict[str, float]
    reason: str | None
    seconds: float


@dataclass
class StudyResult:
    study: Study
    parent_run_id: str
    outcomes: list[Outcome]
    seconds: float

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status not in ("FINISHED", "SKIPPED")]


def fmt_seconds(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _errors(metrics: dict[str, float]) -> str:
    parts = [f"{split} {metrics[f'{split}/error']:.1f} %" for split in ("train", "test") if f"{split}/error" in metrics]
    return ", ".join(parts) or "no error metrics"


def parse_devices(text: str | None) -> list[str] | None:
    """``"0,1"`` -> ``["cuda:0", "cuda:1"]``, checked against the GPUs present."""
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items or not all(t.isdigit() for t in items):
        raise UserError(f"--devices expects GPU indices like 0,1, got {text!r}")
    if len(set(items)) < len(items):
        raise UserError(f"--devices lists a GPU twice: {text!r}")
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"--devices {text} asks for GPUs but CUDA is not available here; leave --devices out "
                        "to train on CPU")
    count = torch.cuda.device_count()
    bad = [t for t in items if int(t) >= count]
    if bad:
        raise UserError(f"--devices {text}: GPU {bad[0]} does not exist, this machine has {count} (0..{count - 1})")
    return [f"cuda:{t}" for t in items]


def run_study(path: str | Path, *, scale: str = "auto", jobs: int | None = None, devices: str | None = None,
              launcher: str = "local", address: str | None = None, gpus_per_run: float | None = None,
              tracking_uri: str | None = None, progress: bool = True, dry_run: bool = False) -> StudyResult | None:
    """Validate, get the data, open the parent run, train what is not done yet, report.

    Every UserError (bad file, bad option, missing data, unreachable store) is raised before
    the MLflow store, experiment or parent run is created.
    """
    from . import launch
    from .tracking import resolve_tracking_uri

    if scale not in ("auto", *SCALES):
        raise UserError(f"--scale must be auto, cpu or full, got {scale!r}")
    if launcher not in ("local", "ray"):
        raise UserError(f"--launcher must be local or ray, got {launcher!r}")
    if jobs is not None and jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")
    if launcher == "ray" and devices is not None:
        raise UserError("--devices is for the local launcher; with --launcher ray, Ray assigns the GPUs "
                        "(see --gpus-per-run)")
    if launcher == "local" and (address is not None or gpus_per_run is not None):
        raise UserError(f"{'--address' if address is not None else '--gpus-per-run'} is for --launcher ray")
    gpus_per_run = 1.0 if gpus_per_run is None else gpus_per_run
    if not (0 < gpus_per_run <= 64):
        raise UserError(f"--gpus-per-run must be a positive number of GPUs (e.g. 1 or 0.25), got {gpus_per_run}")
    scales = load_scales(path)  # validates both scales
    uri = absolute_uri(resolve_tracking_uri(tracking_uri))
    device_list = parse_devices(devices) if launcher == "local" else None
    if launcher == "ray" and address and not uri.startswith(("http://", "https://")):
        print(f"resnet-lab study: warning: Ray workers on other nodes cannot reach the tracking store {uri}; "
              "use an MLflow server (--tracking-uri http://HOST:5000)", file=sys.stderr)

    ray_pool = launch.RayLauncher.connect(address, gpus_per_run) if launcher == "ray" and not dry_run else None
    try:
        return _run(scales, path, scale, jobs, device_list, ray_pool, uri, progress, dry_run)
    finally:
        if ray_pool is not None:
            ray_pool.close()


def _pick_scale(scales: dict[str, Study], path: str | Path, scale: str, ray_pool: Any) -> Study:
    """``auto``: full where CUDA is (here, or in the Ray cluster), else the file's [cpu] scale, said loudly."""
    if scale != "auto":
        return scales[scale]
    if ray_pool is not None:
        has_gpu = ray_pool.gpus > 0
    else:
        import torch

        has_gpu = torch.cuda.is_available()
    if has_gpu:
        return scales["full"]
    where = "in the Ray cluster" if ray_pool is not None else "here"
    cpu, full = scales["cpu"], scales["full"]
    if [r.config_hash for r in cpu.runs] == [r.config_hash for r in full.runs]:
        what = "its [cpu] table changes nothing, so these are the full study's runs, tagged scale cpu"
    else:
        what = f"{len(cpu.runs)} runs with the file's reduced [cpu] settings, not the " + \
            (f"{len(full.runs)} runs of the full study" if len(full.runs) != len(cpu.runs) else "full settings")
    print(f"resnet-lab study: no CUDA device {where}, so this runs the CPU scale of {path} ({what}); "
          "force the full study with --scale full", file=sys.stderr, flush=True)
    return scales["cpu"]


def _run(scales: dict[str, Study], path: str | Path, scale: str, jobs: int | None, device_list: list[str] | None,
         ray_pool: Any, uri: str, progress: bool, dry_run: bool) -> StudyResult | None:
    from . import launch
    from .tracking import connect, get_or_create_experiment

    study = _pick_scale(scales, path, scale, ray_pool)
    if jobs is None:
        jobs = len(device_list) if device_list else 1
    if ray_pool is None:
        import torch

        default_device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        default_device = "cuda" if ray_pool.gpus > 0 else "cpu"
    devices = device_list or [default_device]
    absolute = ray_pool is not None  # Ray workers may start in another directory
    study.runs = [dataclasses.replace(r, cfg=dataclasses.replace(
        r.cfg, tracking_uri=uri, progress=progress and jobs == 1 and ray_pool is None, device=default_device,
        **({"checkpoint_dir": str(Path(r.cfg.checkpoint_dir).resolve()),
            "data_root": str(Path(r.cfg.data_root).resolve())} if absolute else {}))) for r in study.runs]
    if dry_run:
        print(f"study {study.name} ({study.scale} scale, {study.path}): {len(study.runs)} runs")
        for r in study.runs:
            print(f"  [{r.index}/{len(study.runs)}] {r.name}  config_hash {r.config_hash}")
        return None

    ensure_data(study)
    client = connect(uri)  # from here on the store exists
    experiment_id = get_or_create_experiment(client, study.name, uri)
    parent_id, reused = open_parent(client, experiment_id, study)
    started = time.perf_counter()
    outcomes: dict[int, Outcome] = {}
    try:
        plan = plan_runs(client, experiment_id, study)
        for index, run in plan.done.items():
            outcomes[index] = Outcome(study.runs[index - 1], "SKIPPED", run.info.run_id, dict(run.data.metrics),
                                      "already finished", 0.0)
        _banner(study, uri, parent_id, reused, plan, jobs, ray_pool, devices)
        in_flight = jobs if jobs > 1 else None
        slots = ray_pool.slots(in_flight) if ray_pool is not None else jobs
        reporter = launch.Reporter(study.runs, set(plan.done), study.name, progress, slots, notes=plan.resume)
        for index in sorted(plan.done):
            reporter.line(f"[{index}/{len(study.runs)}] {study.runs[index - 1].name} skipped: already finished "
                          f"(run {plan.done[index].info.run_id})")

        def on_done(o: Outcome) -> None:
            if o.status != "FINISHED" and o.run_id is None:
                o.run_id = settle_failed(client, experiment_id, study, o.run, o.reason or o.status)
            outcomes[o.run.index] = o
            head = f"[{o.run.index}/{len(study.runs)}] {o.run.name}"
            if o.status == "FINISHED":
                reporter.done(o.run, f"{head} finished in {fmt_seconds(o.seconds)}: {_errors(o.metrics)}")
            else:
                reporter.done(o.run, f"{head} {o.status} after {fmt_seconds(o.seconds)}: {o.reason}")

        tags = {"kind": "train", "study": study.name, "scale": study.scale}
        if ray_pool is not None:
            ray_pool.run(plan.todo, parent_id, tags, reporter, on_done, max_in_flight=in_flight)
        elif jobs == 1:
            launch.run_inline(plan.todo, parent_id, tags, reporter, on_done, devices[0])
        else:
            launch.run_processes(plan.todo, parent_id, tags, reporter, on_done, jobs, devices)
        reporter.close()
    except KeyboardInterrupt:
        client.set_tag(parent_id, "failed_runs", str(sum(o.status not in ("FINISHED", "SKIPPED")
                                                         for o in outcomes.values())))
        client.set_terminated(parent_id, "KILLED")
        raise
    except BaseException as e:
        client.set_tag(parent_id, "failure_reason", f"{type(e).__name__}: {e}"[:5000])
        client.set_terminated(parent_id, "FAILED")
        raise
    result = StudyResult(study, parent_id, [outcomes[r.index] for r in study.runs if r.index in outcomes],
                         time.perf_counter() - started)
    client.set_tag(parent_id, "failed_runs", str(len(result.failed)))
    client.set_terminated(parent_id, "FINISHED")
    print_summary(result)
    return result


def _banner(study: Study, uri: str, parent_id: str, reused: bool, plan: Plan, jobs: int,
            ray_pool: Any, devices: list[str]) -> None:
    where = f"Ray ({ray_pool.describe()})" if ray_pool is not None else \
        f"{jobs} job{'s' if jobs > 1 else ''} on {', '.join(devices)}"
    resuming = f" ({len(plan.resume)} resuming from checkpoints)" if plan.resume else ""
    print(f"study {study.name} ({study.scale} scale, {study.path}): {len(study.runs)} runs, "
          f"{len(plan.done)} already finished, {len(plan.todo)} to train{resuming}; {where}; "
          f"tracking {uri}, parent run {parent_id}{' (reused)' if reused else ''}", flush=True)
    if plan.killed:
        print(f"marked {len(plan.killed)} run(s) left RUNNING without a checkpoint KILLED: {', '.join(plan.killed)}",
              flush=True)


def print_summary(result: StudyResult) -> None:
    study = result.study
    counts = {s: sum(o.status == s for o in result.outcomes) for s in ("FINISHED", "SKIPPED")}
    print(f"study {study.name} ({study.scale} scale) done in {fmt_seconds(result.seconds)}: "
          f"{len(result.outcomes)} runs, {counts['FINISHED']} trained, {counts['SKIPPED']} already finished, "
          f"{len(result.failed)} failed; parent run {result.parent_run_id}")
    width = max([len(o.run.name) for o in result.outcomes] + [3])
    print(f"  {'run':{width}s}  {'status':9s} {'train err':>9s} {'test err':>9s} {'time':>7s}  run id")
    for o in result.outcomes:
        err = [f"{o.metrics[k]:7.2f} %" if k in o.metrics else f"{'-':>9s}" for k in ("train/error", "test/error")]
        print(f"  {o.run.name:{width}s}  {o.status.lower():9s} {err[0]} {err[1]} "
              f"{fmt_seconds(o.seconds) if o.status != 'SKIPPED' else '-':>7s}  {o.run_id or '-'}")
    for o in result.failed:
        print(f"  {o.run.name} {o.status.lower()}: {o.reason}")


# ---------------------------------------------------------------- command line

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
    p.add_argument("--launcher", default="local", choices=["local", "ray"],
                   help="local (default): this machine; ray: one Ray task per run (pip install '.[ray]')")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else start a local Ray instance)")
    p.add_argument("--gpus-per-run", type=float, help="GPUs each Ray task asks for, e.g. 0.25 (default 1)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db); "
                                          "use an http:// server for Ray clusters")
    p.add_argument("--no-progress", action="store_true", help="no progress bars, one line per run start/finish")
    p.add_argument("--dry-run", action="store_true", help="validate the file and list its runs; train nothing")
    p.set_defaults(func=cmd_study)


def cmd_study(args: argparse.Namespace) -> int:
    """Exit code: 0 all runs finished, 1 some failed (UserError -> 2 via the CLI)."""
    result = run_study(args.file, scale=args.scale, jobs=args.jobs, devices=args.devices, launcher=args.launcher,
                       address=args.address, gpus_per_run=args.gpus_per_run, tracking_uri=args.tracking_uri,
                       progress=not args.no_progress, dry_run=args.dry_run)
    if result is None:
        return 0
    if result.failed:
        print(f"resnet-lab: {len(result.failed)} of {len(result.outcomes)} runs of study {result.study.name} failed: "
              f"{', '.join(o.run.name for o in result.failed)}", file=sys.stderr)
        return 1
    return 0
