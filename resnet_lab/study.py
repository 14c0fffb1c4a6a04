"""Running a depth study (``resnet-lab study FILE``): every run of a study file as an MLflow
child run under one parent run per study and scale.

The order matters for "bad input leaves no trace": validate the file and the options, make
sure the data is there, and only then create the MLflow store, experiment and parent run,
once, in this process (concurrent first writers would race on the SQLite schema). Then skip
children already FINISHED with the same ``config_hash``, group the rest by shape (``group_runs``:
each group trained as one fused model), and train the groups inline, in worker processes
(``--jobs``) or as Ray tasks; ``train_group`` resumes each run from its checkpoint by itself.
The study file format is in ``resnet_lab.studyfile``; how runs are launched in ``resnet_lab.launch``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import launch, slurm
from .checkpoint import checkpoint_path
from .checkpoint import load as load_checkpoint
from .config import TrainConfig
from .data import check_sizes, load_dataset
from .device import accelerator, auto_scale, visible_gpus
from .devicecheck import check_device
from .errors import UserError
from .fused import fusion_key
from .launch import Group, Outcome, Reporter
from .models import build_model
from .speed import FUSE_CHOICES, choose_fuse
from .studyfile import SCALES, Study, StudyRun, load_scales, load_study  # noqa: F401 - load_study re-exported
from .tracking import (RunTracker, absolute_uri, connect, describe_study, display_uri, get_or_create_experiment,
                       is_server, resolve_tracking_uri, search_all_runs)
from .train import total_iterations


# ---------------------------------------------------------------- data

def ensure_data(study: Study) -> None:
    """Make sure every dataset the study needs is here (found or downloaded), and check each
    run's sizes against it, so data problems are one UserError before any run.

    Installing Debian's ``dataset-fashion-mnist`` is the Makefile's ``data`` target: a library
    does not install system packages.
    """
    groups: dict[tuple[str, str | None, str], list[TrainConfig]] = {}
    for run in study.runs:
        groups.setdefault((run.cfg.dataset, run.cfg.data_dir, run.cfg.data_root), []).append(run.cfg)
    for (dataset, data_dir, data_root), cfgs in groups.items():
        try:
            data = load_dataset(dataset, data_dir=data_dir, data_root=data_root, download=True)
        except UserError as e:
            raise UserError(f"{study.path}: {e}") from None
        for cfg in cfgs:
            _check_sizes(study, cfg, len(data.train), len(data.test))


def _check_sizes(study: Study, cfg: TrainConfig, full_train: int, full_test: int) -> None:
    """val_size, train_size, test_size, batch_size and an epoch schedule against the dataset's real size."""
    where = f"{study.path}: {cfg.name}{' (cpu scale)' if study.scale == 'cpu' else ''}:"
    try:
        examples = check_sizes(full_train, val_size=cfg.val_size, train_size=cfg.train_size,
                               batch_size=cfg.batch_size, full_test=full_test, test_size=cfg.test_size)
        cfg.resolved(total_iterations(cfg, examples))
    except UserError as e:
        raise UserError(f"{where} {cfg.dataset}: {e}") from None


# ---------------------------------------------------------------- MLflow bookkeeping

def _search_all(client: Any, experiment_id: str, filter_string: str) -> list[Any]:
    """Every active run matching ``filter_string``, newest first."""
    return search_all_runs(client, experiment_id, filter_string, order_by=["attributes.start_time DESC"])


def _children_filter(study: Study) -> str:
    return f"tags.kind = 'train' and tags.study = '{study.name}' and tags.scale = '{study.scale}'"


def _study_note(study: Study) -> str:
    """``describe_study`` of the runs this scale trains; at full scale the study file's description follows."""
    nets = list(dict.fromkeys(r.cfg.model for r in study.runs))
    lengths = [f"{c.iterations} iterations" if c.iterations is not None else f"{c.epochs} epochs"
               for c in (r.cfg for r in study.runs)]
    text = describe_study(study.name, study.scale, nets, [r.cfg.seed for r in study.runs], lengths,
                          ", ".join(sorted({r.cfg.dataset for r in study.runs})))
    return text + (f"\n\n{study.description}" if study.description and study.scale == "full" else "")


def open_parent(client: Any, experiment_id: str, study: Study, uri: str) -> tuple[RunTracker, bool]:
    """Create the study's parent run, or reopen the existing one of this study+scale (RUNNING);
    True when reopened. The study file artifact is always the current one.
    """
    tags = {"kind": "study", "study": study.name, "scale": study.scale, "study_file": str(study.path),
            "mlflow.note.content": _study_note(study)}
    existing = _search_all(client, experiment_id, f"tags.kind = 'study' and tags.study = '{study.name}' "
                                                  f"and tags.scale = '{study.scale}'")
    parent = RunTracker.reopen(uri, existing[0].info.run_id, client, finished_too=True) if existing else None
    if parent is None:
        parent = RunTracker.create(uri, study.name, study.name, params=study.params(), tags=tags, client=client)
    else:
        parent.set_tags(tags)
        parent.log_params(_new_params(existing[0], study))
    parent.log_artifacts([(Path(study.path), "study")])
    return parent, bool(existing)


def _new_params(parent: Any, study: Study) -> dict[str, str]:
    """The study's params the parent run does not have yet. MLflow params cannot change, so a
    reopened parent keeps its first values; say which ones changed."""
    old, params = parent.data.params, study.params()
    changed = sorted(k for k, v in params.items() if k in old and old[k] != v)
    if changed:
        print(f"resnet-lab study: the study's settings changed since parent run {parent.info.run_id} was created "
              f"({', '.join(changed[:8])}); the run keeps its first params, the study file artifact "
              "is the current one", file=sys.stderr)
    return {k: v for k, v in params.items() if k not in old}


@dataclass
class Plan:
    """What a (re)run does: runs to train, runs already done, and what was found left over."""

    todo: list[StudyRun]
    done: dict[int, Any]  # run index -> its FINISHED MLflow run
    resume: dict[int, str]  # run index -> "resuming run <id> from iteration <n>"
    killed: list[str]  # run ids left RUNNING by a dead study process, now marked KILLED
    start: dict[int, int] = dataclasses.field(default_factory=dict)  # run index -> its checkpoint's iteration


def _checkpointed_run(cfg: TrainConfig) -> tuple[str, int] | None:
    """(MLflow run id, iteration) of the checkpoint ``train`` would resume ``cfg`` from, if any."""
    path = checkpoint_path(cfg)
    if path is None or not path.exists():
        return None
    try:
        saved = load_checkpoint(path)
    except UserError:
        return None  # train() reports the unreadable checkpoint when it gets there
    if saved.get("config_hash") != cfg.config_hash():
        return None
    return saved["run_id"], int(saved["iteration"])


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
        if ckpt:
            plan.start[sr.index] = ckpt[1]  # train_group resumes from it whether or not its run is still there
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


# ---------------------------------------------------------------- fusion

def group_runs(runs: list[StudyRun], start: dict[int, int], fuse: str, device: str,
               threads: int | None = None) -> list[Group]:
    """The runs to train, in groups that each train as one fused model (a group of one trains alone),
    in the order of each group's first run.

    Runs are grouped when one loop and one ``FusedResNet`` can train them: the same config apart
    from model, seed and run name (recipe, schedule, data, device: ``_recipe``), one
    ``fused.fusion_key`` (same shape; plain and residual nets of option A together), and the same
    starting iteration (``start``: each run's checkpoint, 0 without one). So finished runs are never
    in a group (``plan_runs`` skipped them), and a group interrupted at different points, or partly
    retrained, is regrouped by where each run stands: runs resuming from one iteration train
    together, a run standing alone trains alone. ``speed.choose_fuse`` says whether a group of its
    size is fused on ``device`` with ``threads`` CPU threads per training (``fuse``: auto, on or
    off); if not, its runs train one by one.
    """
    groups: dict[tuple, Group] = {}
    for run in runs:
        key = fusable_shape(run.cfg)
        if key is None:
            groups[("alone", run.index)] = [run]
        else:
            groups.setdefault((key, _recipe(run.cfg), start.get(run.index, 0)), []).append(run)
    out: list[Group] = []
    for group in groups.values():
        out += [group] if choose_fuse(torch.device(device), fuse, len(group), threads) else [[run] for run in group]
    return sorted(out, key=lambda g: g[0].index)


def fusable_shape(cfg: TrainConfig) -> tuple | None:
    """``fused.fusion_key`` of the net ``cfg`` builds (on the CPU: a CIFAR net in milliseconds, a
    ResNet-18 in a fraction of a second; not on the meta device, whose TorchFunctionMode broke under
    the tests' faked CUDA); the data's channels and classes are the same for runs of one
    ``_recipe`` (same dataset)."""
    return fusion_key(build_model(cfg.model, shortcut=cfg.shortcut, zero_init_residual=cfg.zero_init_residual))


def _recipe(cfg: TrainConfig) -> str:
    """Everything a group shares: the whole config but the net (model), its seed and its name."""
    return TrainConfig.to_json(dataclasses.replace(cfg, model="resnet-8", seed=0, run_name=None))


# ---------------------------------------------------------------- running

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
    count = len(visible_gpus())
    if not count:
        raise UserError(f"--devices {text} asks for GPUs but CUDA is not available here; leave --devices out "
                        f"to train on {accelerator()}")
    bad = [t for t in items if int(t) >= count]
    if bad:
        raise UserError(f"--devices {text}: GPU {bad[0]} does not exist, this machine has {count} (0..{count - 1})")
    return [f"cuda:{t}" for t in items]


def _check_options(scale: str, jobs: int | None, devices: str | None, launcher: str, address: str | None,
                   gpus_per_run: float | None, cluster: str | None = None, fuse: str | None = None) -> float:
    """The study command's options, each against the others; returns the GPUs per Ray run."""
    if fuse is not None and fuse not in FUSE_CHOICES:
        raise UserError(f"--fuse must be auto, on or off, got {fuse!r}")
    if scale not in ("auto", *SCALES):
        raise UserError(f"--scale must be auto, cpu or full, got {scale!r}")
    if launcher not in ("local", "ray", "submitit"):
        raise UserError(f"--launcher must be local, ray or submitit, got {launcher!r}")
    if launcher == "submitit":
        if cluster not in slurm.CLUSTERS:
            raise UserError(f"--cluster must be one of {', '.join(slurm.CLUSTERS)}, got {cluster!r}")
        if devices is not None or jobs is not None or address is not None or gpus_per_run is not None:
            raise UserError("--devices, --jobs, --address and --gpus-per-run are for the local and ray launchers; "
                            "with --launcher submitit each run is one array task (see --gpus-per-task, "
                            "--array-parallelism)")
        return 1.0
    if cluster is not None:
        raise UserError("--cluster is for --launcher submitit")
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
    return gpus_per_run


def run_study(path: str | Path, *, scale: str = "auto", jobs: int | None = None, devices: str | None = None,
              launcher: str = "local", address: str | None = None, gpus_per_run: float | None = None,
              tracking_uri: str | None = None, progress: bool = True, dry_run: bool = False,
              cluster: str | None = None, slurm_flags: dict[str, Any] | None = None,
              wait: bool = True, fuse: str | None = None) -> StudyResult | None:
    """Validate, get the data, open the parent run, train what is not done yet, report.

    ``fuse`` (auto, on, off; default the study file's ``fuse``, else auto): train the runs that share
    a shape as one fused model each (``group_runs``).

    Every UserError (bad file, bad option, missing data, unreachable store) is raised before
    the MLflow store, experiment or parent run is created. ``launcher="submitit"`` submits the
    runs as one job array on ``cluster`` (``resnet_lab.slurm``; ``slurm_flags`` over the file's
    ``[slurm]`` table), and without ``wait`` returns once it is submitted.
    """
    if launcher == "submitit":
        cluster = cluster or "slurm"
    gpus_per_run = _check_options(scale, jobs, devices, launcher, address, gpus_per_run, cluster, fuse)
    scales = load_scales(path)  # validates both scales
    uri = absolute_uri(resolve_tracking_uri(tracking_uri))
    if launcher == "submitit":
        slurm.check_tracking(uri, cluster)
        settings = slurm.with_flags(scales["full"].slurm, **({"sbatch": []} | (slurm_flags or {})))
        array = launch.SubmititLauncher(cluster, settings, wait=wait)
        return _run_array(scales, path, scale, uri, array, dry_run)
    device_list = parse_devices(devices) if launcher == "local" else None
    if launcher == "ray" and address and not is_server(uri):
        print(f"resnet-lab study: warning: Ray workers on other nodes cannot reach the tracking store "
              f"{display_uri(uri)}; use an MLflow server (--tracking-uri http://HOST:5000)", file=sys.stderr)

    # A dry run joins Ray too: the scale and the device come from the cluster's GPUs, as in the real run.
    ray_pool = launch.RayLauncher.connect(address, gpus_per_run) if launcher == "ray" else None
    try:
        study = _pick_scale(scales, path, scale, ray_pool)
        jobs = jobs or (len(device_list) if device_list else 1)
        default_device = _default_device(ray_pool)
        device_list = worker_devices(device_list, jobs, default_device) if ray_pool is None else [default_device]
        study.runs = _placed(study.runs, uri, default_device, progress=progress and jobs == 1 and ray_pool is None,
                             absolute_paths=ray_pool is not None)
        if dry_run:
            _print_runs(study)
            return None
        ensure_data(study)
        if ray_pool is None and default_device != "cpu":
            check_device(device_list[0])  # a device that computes wrong gradients trains nothing (one line, exit 2)
        return _train_study(study, uri, jobs, device_list, ray_pool, progress, fuse or study.fuse)
    finally:
        if ray_pool is not None:
            ray_pool.close()


def _run_array(scales: dict[str, Study], path: str | Path, scale: str, uri: str, array: "launch.SubmititLauncher",
               dry_run: bool) -> StudyResult | None:
    """The study as one submitit job array: on SLURM, the full scale on the GPUs the tasks ask
    for (a CPU-only array, gpus_per_task 0, picks the [cpu] scale like a machine without CUDA);
    the local and debug clusters run here, so they take this machine's device."""
    on_gpus = array.settings.gpus_per_task > 0 if array.cluster == "slurm" else accelerator() == "cuda"
    device = "cuda" if on_gpus else ("cpu" if array.cluster == "slurm" else accelerator())
    study = scales[scale] if scale != "auto" else scales[auto_scale("cuda" if on_gpus else "cpu")]
    if scale == "auto" and not on_gpus:
        print(f"resnet-lab study: the array tasks have no GPU, so this runs the CPU scale of {path}; "
              "force the full study with --scale full", file=sys.stderr, flush=True)
    study.runs = _placed(study.runs, uri, device, progress=False, absolute_paths=True)
    if dry_run:
        _print_runs(study)
        return None
    ensure_data(study)
    return _train_study(study, uri, 1, [device], None, False, "off", array=array)


def _pick_scale(scales: dict[str, Study], path: str | Path, scale: str, ray_pool: Any) -> Study:
    """``auto``: full where CUDA is (here, or in the Ray cluster), else the file's [cpu] scale, said loudly."""
    if scale != "auto":
        return scales[scale]
    if auto_scale(_default_device(ray_pool)) == "full":
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


def _default_device(ray_pool: Any) -> str:
    """``device.accelerator()`` here; in a Ray cluster cuda where it has GPUs, else cpu."""
    if ray_pool is not None:
        return "cuda" if ray_pool.gpus > 0 else "cpu"
    return accelerator()


def worker_devices(asked: list[str] | None, jobs: int, default: str) -> list[str]:
    """Where a local study's runs go: the ``--devices`` GPUs; else, with ``--jobs N`` on CUDA, every
    GPU this process sees (the workers take the least busy one, so round-robin); else ``default``."""
    if asked:
        return asked
    gpus = visible_gpus() if default == "cuda" and jobs > 1 else []
    return gpus or [default]


def _placed(runs: list[StudyRun], uri: str, device: str, *, progress: bool, absolute_paths: bool) -> list[StudyRun]:
    """The runs with this study's store, device and progress bars; with absolute folders for Ray
    workers, which may start in another directory. None of these change a run's config_hash."""
    def place(cfg: TrainConfig) -> TrainConfig:
        folders = {"checkpoint_dir": str(Path(cfg.checkpoint_dir).resolve()),
                   "data_root": str(Path(cfg.data_root).resolve())} if absolute_paths else {}
        return dataclasses.replace(cfg, tracking_uri=uri, progress=progress, device=device, **folders)

    return [dataclasses.replace(r, cfg=place(r.cfg)) for r in runs]


def _print_runs(study: Study) -> None:
    print(f"study {study.name} ({study.scale} scale, {study.path}): {len(study.runs)} runs")
    for r in study.runs:
        print(f"  [{r.index}/{len(study.runs)}] {r.name}  config_hash {r.config_hash}")


def _train_study(study: Study, uri: str, jobs: int, devices: list[str], ray_pool: Any,
                 progress: bool, fuse: str, array: "launch.SubmititLauncher | None" = None) -> StudyResult:
    """Open the parent run, plan, train what is left under it, and close it with how the study ended."""
    client = connect(uri)  # from here on the store exists
    experiment_id = get_or_create_experiment(client, study.name, uri)
    parent, reused = open_parent(client, experiment_id, study, uri)
    if array is not None and reused:
        tags = parent.tags()
        slurm.refuse_if_running(tags.get("submitit_jobs"), tags.get("submitit_cluster", ""),
                                Path(array.settings.folder) / study.name / "%j")
    started = time.perf_counter()
    ledger = _Ledger(study, client, experiment_id)
    try:
        plan = plan_runs(client, experiment_id, study)
        # A worker's CPU threads: a share of the cores (launch.run_processes), one per Ray task (num_cpus=1).
        threads = 1 if ray_pool is not None else max(1, launch.cpu_count() // jobs) if jobs > 1 else None
        # a SLURM array trains one run per task (unfused): each task is its own job on its own node
        groups = group_runs(plan.todo, plan.start, "off" if array is not None else fuse,
                            devices[0] if ray_pool is None else _default_device(ray_pool), threads)
        _banner(study, uri, parent.run_id, reused, plan, jobs, ray_pool, devices, groups, array)
        in_flight = jobs if jobs > 1 else None
        slots = ray_pool.slots(in_flight) if ray_pool is not None else jobs
        slots = array.slots(len(plan.todo)) if array is not None else slots
        ledger.start(plan, Reporter(study.runs, set(plan.done), study.name, progress, slots, notes=plan.resume))
        tags = {"kind": "train", "study": study.name, "scale": study.scale}
        if array is not None:
            job_ids = array.run(study.name, plan.todo, parent.run_id, tags, ledger.reporter, ledger.on_done)
            if job_ids and not array.wait:
                ledger.reporter.close()
                return _submitted(study, parent, job_ids, array, uri, started)
        elif ray_pool is not None:
            ray_pool.run(groups, parent.run_id, tags, ledger.reporter, ledger.on_done, max_in_flight=in_flight)
        elif jobs == 1:
            launch.run_inline(groups, parent.run_id, tags, ledger.reporter, ledger.on_done, devices[0])
        else:
            launch.run_processes(groups, parent.run_id, tags, ledger.reporter, ledger.on_done, jobs, devices)
        ledger.reporter.close()
    except KeyboardInterrupt:
        parent.set_tags({"failed_runs": str(len(ledger.failed()))})
        parent.finish("KILLED")
        raise
    except BaseException as e:
        parent.finish("FAILED", reason=f"{type(e).__name__}: {e}")
        raise
    result = StudyResult(study, parent.run_id, ledger.in_order(), time.perf_counter() - started)
    parent.set_tags({"failed_runs": str(len(result.failed))})
    parent.finish("FINISHED")
    print_summary(result)
    return result


def _submitted(study: Study, parent: RunTracker, job_ids: list[str], array: "launch.SubmititLauncher", uri: str,
               started: float) -> StudyResult:
    """``--no-wait``: the array is queued; the parent run stays RUNNING (a rerun reopens it); say how to finish."""
    first, last = job_ids[0], job_ids[-1]
    parent.set_tags({"submitit_jobs": ",".join(job_ids)[:5000], "submitit_cluster": array.cluster})
    again = f"resnet-lab study {study.path} --launcher submitit --cluster {array.cluster} --tracking-uri {uri}"
    print(f"submitted {len(job_ids)} array task(s) ({first}{f' .. {last}' if last != first else ''}) on "
          f"{array.cluster}; logs under {Path(array.settings.folder) / study.name}. When the array has ended "
          f"(squeue lists none of them), finish with: make depth-study STUDY={study.path} "
          f"STUDY_ARGS='--launcher submitit --cluster {array.cluster} --tracking-uri {uri}' (or: {again}; "
          f"resnet-lab diagnose {study.path}; resnet-lab report {study.path}); finished runs are skipped, "
          "an interrupted one resumes from its checkpoint", flush=True)
    return StudyResult(study, parent.run_id, [], time.perf_counter() - started)


class _Ledger:
    """The study's outcomes as they come in: skipped runs first, then each ended run, reported
    one line each; a run that failed without an MLflow run id is looked up and settled FAILED."""

    def __init__(self, study: Study, client: Any, experiment_id: str) -> None:
        self.study, self.client, self.experiment_id = study, client, experiment_id
        self.outcomes: dict[int, Outcome] = {}
        self.reporter: Reporter | None = None

    def start(self, plan: Plan, reporter: Reporter) -> None:
        self.reporter = reporter
        total = len(self.study.runs)
        for index, run in sorted(plan.done.items()):
            self.outcomes[index] = Outcome(self.study.runs[index - 1], "SKIPPED", run.info.run_id,
                                           dict(run.data.metrics), "already finished", 0.0)
            reporter.line(f"[{index}/{total}] {self.study.runs[index - 1].name} skipped: already finished "
                          f"(run {run.info.run_id})")

    def on_done(self, o: Outcome) -> None:
        if o.status != "FINISHED" and o.run_id is None:
            o.run_id = settle_failed(self.client, self.experiment_id, self.study, o.run, o.reason or o.status)
        self.outcomes[o.run.index] = o
        head = f"[{o.run.index}/{len(self.study.runs)}] {o.run.name}"
        if o.status == "FINISHED":
            self.reporter.done(o.run, f"{head} finished in {fmt_seconds(o.seconds)}: {_errors(o.metrics)}")
        else:
            self.reporter.done(o.run, f"{head} {o.status} after {fmt_seconds(o.seconds)}: {o.reason}")

    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes.values() if o.status not in ("FINISHED", "SKIPPED")]

    def in_order(self) -> list[Outcome]:
        return [self.outcomes[r.index] for r in self.study.runs if r.index in self.outcomes]


def _banner(study: Study, uri: str, parent_id: str, reused: bool, plan: Plan, jobs: int,
            ray_pool: Any, devices: list[str], groups: list[Group], array: Any = None) -> None:
    where = f"Ray ({ray_pool.describe()})" if ray_pool is not None else \
        f"{jobs} job{'s' if jobs > 1 else ''} on {', '.join(devices)}"
    where = array.describe() if array is not None else where
    resuming = f" ({len(plan.resume)} resuming from checkpoints)" if plan.resume else ""
    fused = [len(g) for g in groups if len(g) > 1]
    fusion = (f" ({sum(fused)} of them as {len(fused)} fused model{'s' if len(fused) > 1 else ''} of "
              f"{', '.join(map(str, fused))} nets)") if fused else ""
    print(f"study {study.name} ({study.scale} scale, {study.path}): {len(study.runs)} runs, "
          f"{len(plan.done)} already finished, {len(plan.todo)} to train{resuming}{fusion}; {where}; "
          f"tracking {display_uri(uri)}, parent run {parent_id}{' (reused)' if reused else ''}", flush=True)
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
