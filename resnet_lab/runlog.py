"""Each net's MLflow run: opened (new, or reopened from its checkpoint), tagged, checkpointed,
described and ended. The training loop (``resnet_lab.train``) trains; this module is all it says
to MLflow besides the metric points themselves (``RunTracker.log``).

A net trained in a fused group gets exactly the run it gets alone: the same params, tags, metrics,
artifacts and checkpoint file, so a run can be resumed fused or unfused.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import plateau, runmodel
from .checkpoint import TrainState, refuse_other_hardware, remove_checkpoint, save_atomic
from .checkpoint import load as load_checkpoint
from .models import count_parameters
from .tracking import RunTracker, git_commit, resolve_tracking_uri, system_metrics_enabled

if TYPE_CHECKING:
    from .config import TrainConfig
    from .data import Dataset
    from .models import ResNet
    from .speed import Speed


@dataclass
class Setup:
    """One net, built and checked against its data before any MLflow run exists.

    ``cfg`` is the resolved config (milestones filled in) and the only one training sees. The
    config as given is used for the run's identity alone, taken here before resolving: its
    ``config_hash`` (what a study matches finished runs on) and its checkpoint path.
    """

    cfg: TrainConfig
    config_hash: str
    checkpoint: Path | None  # None when checkpoints are off
    device: torch.device
    speed: Speed  # precision, layout and compile, decided once for this run
    data: Dataset
    model: ResNet
    iterations: int


def model_tags(setup: Setup) -> dict[str, str]:
    """What was built: model, arch, depth, family and the shortcut option (``none`` for plain nets)."""
    spec = setup.model.spec
    return {"model": spec.name, "arch": spec.arch, "depth": str(spec.depth), "family": spec.family,
            "shortcut": setup.model.shortcut_option if spec.residual else "none"}


def run_params(setup: Setup) -> dict[str, object]:
    """The config, plus depth, arch and the shortcut option built (A/B/C, "none" for plain nets;
    the config's ``shortcut`` is None for "the family default") as params, so the UI's
    parallel-coordinates and scatter views can use them as axes (they take params, not tags)."""
    tags = model_tags(setup)
    return setup.cfg.to_dict() | {"depth": tags["depth"], "arch": tags["arch"], "shortcut": tags["shortcut"]}


def run_tags(setup: Setup) -> dict[str, str]:
    commit, dirty = git_commit()
    cfg = setup.cfg
    device_name = torch.cuda.get_device_name(setup.device) if setup.device.type == "cuda" else setup.device.type
    return {
        "mlflow.runName": cfg.name, **model_tags(setup), "dataset": cfg.dataset, "seed": str(cfg.seed),
        "device": device_name, "torch_version": torch.__version__, "git_commit": commit,
        "git_dirty": str(dirty).lower(), "mlflow.source.git.commit": commit,
        "num_parameters": str(count_parameters(setup.model)), "train_examples": str(len(setup.data.train)),
        "data_source": setup.data.source, "total_iterations": str(setup.iterations), "config_hash": setup.config_hash,
    } | setup.speed.tags()


def resumable_checkpoint(setup: Setup) -> dict | None:
    """The checkpoint of this config, if any; one written on another device type or precision is refused."""
    path = setup.checkpoint
    if path is None or not path.exists():
        return None
    saved = load_checkpoint(path)
    if saved.get("config_hash") != setup.config_hash:
        return None
    # The rest of the run would switch precision, or the epoch's permutation would be redrawn by
    # another device's generator (some images repeated, others skipped): not the same training.
    refuse_other_hardware(path, saved, setup.device.type, setup.speed.precision)
    return saved


def open_run(setup: Setup, saved: dict | None, parent_run_id: str | None, extra_tags: dict[str, str],
             fused_nets: int = 1) -> RunTracker:
    """The MLflow run ``saved`` (its checkpoint) names, reopened; else a new run with params and tags.
    ``parent_run_id`` nests it under a study's parent run; ``extra_tags`` (study, scale) are added.
    The tag ``fused_nets`` says how many nets the run's net was (last) trained with as one fused
    model (1: alone)."""
    uri = resolve_tracking_uri(setup.cfg.tracking_uri)
    tracker = RunTracker.reopen(uri, saved["run_id"]) if saved else None
    if tracker is None:
        tags = run_tags(setup) | extra_tags | ({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})
        tracker = RunTracker.create(uri, setup.cfg.experiment, setup.cfg.name, params=run_params(setup),
                                    tags=tags | {"fused_nets": str(fused_nets)})
    else:
        tracker.set_tags({"fused_nets": str(fused_nets)})
    if system_metrics_enabled():
        tracker.start_system_metrics(resume=saved is not None)
    return tracker


def log_init_weights(tracker: RunTracker, model: torch.nn.Module) -> None:
    """``model/init_state_dict.pt``, the weights of iteration 0 (the diagnostics' init-to-final path
    and shattering at init need them). Logged before the first step and so before the first
    checkpoint: a resumed run continues a run that already has them."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "init_state_dict.pt"
        torch.save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, path)
        tracker.log_artifacts([(path, "model")])


def checkpoint(setup: Setup, state: TrainState, tracker: RunTracker) -> None:
    """Save the state, once MLflow has every point logged so far: a checkpoint records what was logged."""
    if setup.checkpoint is None:
        return
    tracker.flush()
    hardware = {"device_type": setup.device.type, "precision": setup.speed.precision}
    save_atomic(state.capture(tracker.run_id, setup.config_hash) | hardware, setup.checkpoint)


def end_run(setup: Setup, tracker: RunTracker, status: str, reason: str | None = None, *,
            keep_checkpoint: bool = False) -> None:
    """Close the run with ``status``. A run that ended by itself (finished, or diverged) leaves no
    checkpoint; a stopped or crashed one keeps it (``keep_checkpoint``), for the rerun to resume."""
    tracker.finish(status, reason)
    if setup.checkpoint is not None and not keep_checkpoint:
        remove_checkpoint(setup.checkpoint)


def final_errors(last: dict[str, float]) -> dict[str, float]:
    """``final/train_error``, ``final/test_error`` (and ``final/val_error``): the last value of each
    split's error, under one key each, so the runs table can show them as columns of their own."""
    return {f"final/{split}_error": last[f"{split}/error"] for split in ("train", "test", "val")
            if f"{split}/error" in last}


def log_final(setup: Setup, state: TrainState, tracker: RunTracker) -> None:
    """Everything a finished run gets at its end: the final errors, the weights (state dict and MLflow
    model), the data it trained on (dataset input), the resolved config, the probe tables, its figures
    and its description."""
    final = final_errors(state.last)
    # step 0: MLflow's chart view draws a key that never reaches step 1 as bars, one per run with its
    # value written on it (how final errors are compared); at step = iterations it drew lone dots
    tracker.log([(key, value, 0) for key, value in (final | final_plateau(tracker, setup.cfg)).items()])
    tracker.log_text(setup.cfg.to_json(), "config.json")
    runmodel.log_model(tracker, state.model, setup.cfg, setup.data)  # runs:/<id>/model, loadable with mlflow
    tracker.log_input(runmodel.dataset_input(setup.cfg, setup.data))  # which data: plain-n and resnet-n share it
    _log_figures(tracker, setup, state)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "state_dict.pt"
        torch.save({k: v.detach().cpu().clone() for k, v in state.model.state_dict().items()}, weights)
        files: list[tuple[Path, str | None]] = [(weights, "model")]
        files += [(p, "probes") for p in state.probes.write_tables(Path(tmp) / "probes")]
        tracker.log_artifacts(files)
    _describe_run(tracker, setup, final)


def final_plateau(tracker: RunTracker, cfg: TrainConfig) -> dict[str, float]:
    """``final/plateau``: 1.0 when the run's ``train_fixed/loss`` history (read back from MLflow, so a
    resumed run's earlier points count) meets ``plateau.verdict``, else 0.0; nothing when it is off."""
    if not cfg.plateau_images:
        return {}
    tracker.flush()
    history = tracker.history(plateau.HISTORY_KEY)
    return {plateau.FINAL_KEY: float(plateau.verdict([s for s, _ in history], [v for _, v in history]).reached)}


def _log_figures(tracker: RunTracker, setup: Setup, state: TrainState) -> None:
    """Its error curves (read back from MLflow, so a resumed run's earlier points are in) and its
    gradient flow at init and end, as PNGs under ``figures/``."""
    from . import runfigures

    name = setup.cfg.name
    tracker.flush()
    history = {key: tracker.history(key) for key in ("train/error", "test/error", "val/error")}
    tracker.log_figure(runfigures.error_curves(history, name), "figures/error_curves.png")
    flow = state.probes.tables()["grad_flow"]
    if not flow.empty:
        tracker.log_figure(runfigures.gradient_flow(flow, f"{name}: gradient flow"), "figures/gradient_flow.png")


def _describe_run(tracker: RunTracker, setup: Setup, final: dict[str, float]) -> None:
    """The run's description (``mlflow.note.content``, shown on its page): net, shortcut, seed,
    iterations, scale and final errors, one sentence."""
    cfg, tags = setup.cfg, model_tags(setup)
    scale = tracker.tags().get("scale")
    shortcut = "no shortcut" if tags["shortcut"] == "none" else f"shortcut option {tags['shortcut']}"
    errors = ", ".join(f"{key.split('/')[1].replace('_', ' ')} {value:.2f} %" for key, value in final.items())
    tracker.set_tags({"mlflow.note.content": (
        f"{cfg.model} ({tags['arch']}, {shortcut}), seed {cfg.seed}, {setup.iterations} iterations on "
        f"{cfg.dataset}{f', {scale} scale' if scale else ''}: final {errors or 'errors not measured'}.")})
