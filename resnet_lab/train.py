"""One training run: data on the device, an iteration-based SGD schedule, MLflow logging.

The loop is deliberately plain (nanoGPT / airbench style): the step fits on one screen, the
learning rate is a pure function of the iteration (so resuming needs no scheduler state),
and loss/error are summed on the device and read back only when logging, so the GPU never
waits for the host between steps.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import plateau, runmodel
from .checkpoint import (Interrupted, StopFlag, TrainState, checkpoint_path, history_path, refuse_other_hardware,
                         remove_checkpoint, save_atomic)
from .checkpoint import load as load_checkpoint
from .config import TrainConfig
from .data import Dataset, DeviceLoader, check_sizes, load_dataset, plateau_subset
from .device import select_device, sum_dtype
from .errors import UserError, check_can_create
from .models import ResNet, build_model, count_parameters
from .probes import Probes
from .speed import CompiledStep, Speed, plan
from .speed import step_model as make_step_model
from .tracking import RunTracker, git_commit, resolve_tracking_uri, system_metrics_enabled


@dataclass
class TrainResult:
    run_id: str
    status: str  # FINISHED / FAILED / KILLED
    iterations: int
    metrics: dict[str, float] = field(default_factory=dict)  # last value of each logged scalar
    reason: str | None = None


def total_iterations(cfg: TrainConfig, train_examples: int) -> int:
    """``iterations``, or ``epochs`` x full batches per epoch (the d2l form).

    ``train_examples`` has passed ``data.check_sizes`` (at least one batch), so an epoch has a step.
    """
    return cfg.iterations if cfg.epochs is None else cfg.epochs * (train_examples // cfg.batch_size)


def lr_at(cfg: TrainConfig, iteration: int) -> float:
    """Warm-up lr before ``warmup_iterations``, then lr x decay^(milestones passed)."""
    if iteration < cfg.warmup_iterations:
        return cfg.warmup_lr
    return cfg.lr * cfg.lr_decay ** sum(iteration >= m for m in cfg.milestones or [])


@torch.no_grad()
def evaluate(model: nn.Module, loader: DeviceLoader, speed: Speed) -> tuple[float, float]:
    """(mean loss, error %) over the whole split, in the run's precision and layout (the head, so
    the logits, in fp32); sums stay on the device until the end."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=sum_dtype(loader.device), device=loader.device)
    n = 0  # counted on the host: sizes are known without asking the device
    for x, y in loader:
        with speed.autocast():
            logits = model(speed.layout(x))
        total += torch.stack([F.cross_entropy(logits, y, reduction="sum"), (logits.argmax(1) != y).sum()])
        n += len(y)
    model.train(was_training)
    loss_sum, errors = total.tolist()
    return loss_sum / n, 100.0 * errors / n


@dataclass
class Setup:
    """Everything built and validated before an MLflow run exists.

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


def prepare(cfg: TrainConfig) -> Setup:
    """Validate, load data, build the model. Any UserError is raised here, before any run."""
    cfg.validate()
    if cfg.checkpoint_every:
        check_can_create(Path(cfg.checkpoint_dir), "checkpoint_dir", "pass --set checkpoint_dir=DIR, or "
                         "--set checkpoint_every=0 to train without checkpoints")
    device = select_device(cfg.device)
    data = load_dataset(cfg.dataset, data_dir=cfg.data_dir, data_root=cfg.data_root, val_size=cfg.val_size,
                        seed=cfg.seed, resize=cfg.resize, train_size=cfg.train_size,
                        test_size=cfg.test_size)
    check_sizes(len(data.train), batch_size=cfg.batch_size)
    iterations = total_iterations(cfg, len(data.train))
    resolved = cfg.resolved(iterations)
    torch.manual_seed(cfg.seed)  # the same seed gives plain-n and resnet-n the same initial weights
    model = build_model(cfg.model, in_channels=data.in_channels, num_classes=data.num_classes,
                        shortcut=cfg.shortcut, zero_init_residual=cfg.zero_init_residual)
    speed = plan(device, cfg.precision, cfg.compile, iterations, cfg.compile_mode)
    return Setup(resolved, cfg.config_hash(), checkpoint_path(cfg), device, speed, data, model, iterations)


def run_params(setup: Setup) -> dict[str, object]:
    """The config, plus depth, arch and the shortcut option built (A/B/C, "none" for plain nets;
    the config's ``shortcut`` is None for "the family default") as params, so the UI's
    parallel-coordinates and scatter views can use them as axes (they take params, not tags)."""
    tags = run_tags_of_model(setup)
    return setup.cfg.to_dict() | {"depth": tags["depth"], "arch": tags["arch"], "shortcut": tags["shortcut"]}


def run_tags_of_model(setup: Setup) -> dict[str, str]:
    spec = setup.model.spec
    return {"model": spec.name, "arch": spec.arch, "depth": str(spec.depth), "family": spec.family,
            "shortcut": setup.model.shortcut_option if spec.residual else "none"}


def run_tags(setup: Setup) -> dict[str, str]:
    commit, dirty = git_commit()
    cfg = setup.cfg
    device_name = torch.cuda.get_device_name(setup.device) if setup.device.type == "cuda" else setup.device.type
    return {
        "mlflow.runName": cfg.name, **run_tags_of_model(setup), "dataset": cfg.dataset, "seed": str(cfg.seed), "device": device_name,
        "torch_version": torch.__version__, "git_commit": commit, "git_dirty": str(dirty).lower(),
        "mlflow.source.git.commit": commit, "num_parameters": str(count_parameters(setup.model)),
        "train_examples": str(len(setup.data.train)), "data_source": setup.data.source,
        "total_iterations": str(setup.iterations), "config_hash": setup.config_hash,
    } | setup.speed.tags()


def train(cfg: TrainConfig, *, parent_run_id: str | None = None, extra_tags: dict[str, str] | None = None) -> TrainResult:
    """Train one net and log it as one MLflow run; returns how it ended.

    ``parent_run_id`` nests the run under a study's parent run; ``extra_tags`` (e.g. study,
    scale) are added to the run's tags. The run is tagged with ``config_hash`` of ``cfg`` as
    given (before milestones are resolved), which is what a study matches finished runs on.
    If a checkpoint of the same config exists, the run continues from it in the same MLflow
    run; metric steps already stored are not logged again.
    """
    setup = prepare(cfg)  # from here on only setup.cfg, the resolved config, is used
    tracker, saved = _open_run(setup, parent_run_id, extra_tags or {})
    if system_metrics_enabled():
        tracker.start_system_metrics(resume=saved is not None)
    try:
        with StopFlag() as stop:
            result = _loop(setup, tracker, stop, saved)
    except Interrupted as e:
        tracker.finish("KILLED", reason=f"interrupted by {e}; rerun to resume from the checkpoint")
        raise
    except KeyboardInterrupt:
        tracker.finish("KILLED", reason="interrupted")
        raise
    except Exception as e:
        tracker.finish("FAILED", reason=f"{type(e).__name__}: {e}")
        raise
    tracker.finish(result.status, result.reason)
    if setup.checkpoint is not None:
        remove_checkpoint(setup.checkpoint)
    return result


def _open_run(setup: Setup, parent_run_id: str | None, extra_tags: dict[str, str]) -> tuple[RunTracker, dict | None]:
    """The MLflow run a checkpoint of this config names (reopened, with the checkpoint), else a new run."""
    uri = resolve_tracking_uri(setup.cfg.tracking_uri)
    saved = _resumable_checkpoint(setup)
    tracker = RunTracker.reopen(uri, saved["run_id"]) if saved else None
    if tracker is not None:
        return tracker, saved
    tags = run_tags(setup) | extra_tags | ({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})
    tracker = RunTracker.create(uri, setup.cfg.experiment, setup.cfg.name, params=run_params(setup), tags=tags)
    return tracker, None


def _resumable_checkpoint(setup: Setup) -> dict | None:
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


def _loop(setup: Setup, tracker: RunTracker, stop: StopFlag, saved: dict | None) -> TrainResult:
    cfg, total = setup.cfg, setup.iterations
    state, step_model, eval_loaders = _start(setup)
    speed = setup.speed
    # Resume exactly where the checkpoint left off (steps MLflow already has are not logged again),
    # or take the probes' first point, at initialisation.
    logged_upto = -1
    if saved:
        state.restore(saved)
        logged_upto = tracker.last_step("train/loss")
    else:
        _log_init_weights(tracker, state.model)
        state.probes.measure(0)
    batches = state.loader.batches()
    bar = tqdm(total=total, initial=state.iteration, desc=cfg.name, unit="it", disable=not cfg.progress,
               dynamic_ncols=True)
    window_start = time.perf_counter()
    while state.iteration < total:
        # One SGD step; nothing is read back to the host, so a GPU never waits for Python.
        lr = train_step(step_model, state, cfg, next(batches), speed)
        done = state.iteration
        # Every log_every iterations: one host read, the evaluation when due, one batch of metrics to MLflow.
        if done % cfg.log_every == 0 or done == total:
            steps = state.window_iters
            diverged = log_and_evaluate(state, eval_loaders, tracker, lr, time.perf_counter() - window_start, speed,
                                        evaluate_now=done % cfg.eval_every == 0 or done == total,
                                        log=done > logged_upto)
            _show(bar, state.last, steps)
            if diverged:
                bar.close()
                reason = f"diverged: non-finite training loss between iterations {done - steps} and {done}"
                return TrainResult(tracker.run_id, "FAILED", done, state.last, reason)
            # A checkpoint every checkpoint_every iterations (the last one is the finished run).
            if setup.checkpoint is not None and done % cfg.checkpoint_every == 0 and done < total:
                _checkpoint(setup, state, tracker)
            window_start = time.perf_counter()  # after the checkpoint: its write is no training time
        # Ctrl-C / SIGTERM: stop between iterations, checkpointed, so a rerun continues from here.
        if stop.signum is not None:
            bar.close()
            _checkpoint(setup, state, tracker)
            raise Interrupted(stop.signum, done)
    bar.close()
    final = final_errors(state.last)
    # step 0: MLflow's chart view draws a key that never reaches step 1 as bars, one per run with its
    # value written on it (how final errors are compared); at step = iterations it drew lone dots
    tracker.log([(key, value, 0) for key, value in (final | final_plateau(tracker, cfg)).items()])
    _log_final_artifacts(tracker, state.model, cfg, state.probes, setup.data)
    _describe_run(tracker, setup, final)
    return TrainResult(tracker.run_id, "FINISHED", total, state.last)


def _start(setup: Setup) -> tuple[TrainState, nn.Module | CompiledStep, dict[str, DeviceLoader]]:
    """A fresh state on the device, the model the step runs (compiled or not) and the eval loaders."""
    cfg, device, data = setup.cfg, setup.device, setup.data
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = setup.model.to(device, memory_format=setup.speed.memory_format).train()
    step_model = make_step_model(model, setup.speed)  # the step only: probes and eval stay eager
    optimizer = setup.speed.sgd(model.parameters(), lr=lr_at(cfg, 0), momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)  # fused on CUDA, the exact loop on CPU
    loader = DeviceLoader(data.train, batch_size=cfg.batch_size, device=device, mean=data.mean, std=data.std,
                          train=True, augment=cfg.augment, seed=cfg.seed)
    eval_loaders = {name: DeviceLoader(split, batch_size=cfg.eval_batch_size, device=device, mean=data.mean,
                                       std=data.std, train=False)
                    for name, split in (("test", data.test), ("val", data.val)) if split is not None}
    if cfg.plateau_images:  # the plateau's curve: fixed training images, unaugmented (resnet_lab.plateau)
        eval_loaders["train_fixed"] = DeviceLoader(plateau_subset(data.train, cfg.plateau_images),
                                                   batch_size=cfg.eval_batch_size, device=device, mean=data.mean,
                                                   std=data.std, train=False)
    probes = make_probes(cfg, model, device, eval_loaders["test"])
    state = TrainState(model, optimizer, loader, probes, window=torch.zeros(2, device=device),
                       history=history_path(setup.checkpoint))
    return state, step_model, eval_loaders


def train_step(model: nn.Module | CompiledStep, state: TrainState, cfg: TrainConfig,
               batch: tuple[torch.Tensor, torch.Tensor], speed: Speed) -> float:
    """One SGD iteration on ``batch`` in ``speed``'s precision and layout: the state's window gets
    (loss sum, errors) on the device, its iteration count advances, and the lr used is returned.
    ``model`` is ``state.model`` or its compiled twin (``speed.make_step_model``).

    Nothing here reads a value back to the host, so on CUDA the next step is queued at once.
    Shared with ``benchmarks/`` so the benchmarks time exactly this step.
    """
    x, y = batch
    lr = lr_at(cfg, state.iteration)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    with speed.autocast():
        logits = model(speed.layout(x))  # fp32: the head runs outside autocast (models.ResNet.forward_head)
    loss = F.cross_entropy(logits, y)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.probes.on_backward(state.iteration)
    state.optimizer.step()
    state.window += torch.stack([loss.detach() * len(y), (logits.argmax(1) != y).sum()])
    state.iteration += 1
    state.window_iters += 1
    return lr


def log_and_evaluate(state: TrainState, eval_loaders: dict[str, DeviceLoader], tracker: RunTracker, lr: float,
                     seconds: float, speed: Speed, *, evaluate_now: bool, log: bool) -> bool:
    """End a log window: its train loss/error/lr/speed, the eval splits and probe points when
    ``evaluate_now``, all as one batch to MLflow (unless ``log`` is false: a resumed run's
    steps MLflow already has). Returns True when the training loss diverged (then no evaluation)."""
    done, examples = state.iteration, state.window_iters * state.loader.batch_size
    loss_sum, errors = state.window.tolist()  # the one host read per log window
    state.window.zero_()
    state.window_iters = 0
    points = [("train/loss", loss_sum / examples, done), ("train/error", 100.0 * errors / examples, done),
              ("lr", lr, done), ("perf/images_per_s", examples / seconds, done)]
    diverged = not math.isfinite(loss_sum)
    if evaluate_now and not diverged:
        for name, loader in eval_loaders.items():
            loss, error = evaluate(state.model, loader, speed)
            points.append((f"{name}/loss", loss, done))
            if name != "train_fixed":  # the plateau's curve is its loss alone: the 30-key budget (issue 14)
                points.append((f"{name}/error", error, done))
        state.probes.measure(done)
    points += state.probes.drain()
    if log:
        tracker.log(points)
    state.last.update({name: value for name, value, _ in points})
    return diverged


def _checkpoint(setup: Setup, state: TrainState, tracker: RunTracker) -> None:
    """Save the state, once MLflow has every point logged so far: a checkpoint records what was logged."""
    if setup.checkpoint is None:
        return
    tracker.flush()
    hardware = {"device_type": setup.device.type, "precision": setup.speed.precision}
    save_atomic(state.capture(tracker.run_id, setup.config_hash) | hardware, setup.checkpoint)


def _show(bar: tqdm, last: dict[str, float], steps: int) -> None:
    bar.update(steps)
    bar.set_postfix(loss=f"{last['train/loss']:.3f}", err=f"{last['train/error']:.1f}%",
                    img_s=f"{last['perf/images_per_s']:.0f}", refresh=False)


def make_probes(cfg: TrainConfig, model: ResNet, device: torch.device, test_loader: DeviceLoader) -> Probes:
    """Gradient flow on a fixed test batch; responses over a fixed test subset (the first
    eval batch), so each probe point costs one small forward/backward, not a test pass."""
    first = next(iter(test_loader))
    probe_batch = (first[0][: cfg.batch_size], first[1][: cfg.batch_size])
    return Probes(model, device=device, grad_every=cfg.grad_every, log_every=cfg.log_every,
                  probe_batch=probe_batch, response_batches=lambda: [first], enabled=cfg.probes,
                  layer_metrics=cfg.log_layer_metrics)


def final_errors(last: dict[str, float]) -> dict[str, float]:
    """``final/train_error``, ``final/test_error`` (and ``final/val_error``): the last value of each
    split's error, under one key each, so the runs table can show them as columns of their own."""
    return {f"final/{split}_error": last[f"{split}/error"] for split in ("train", "test", "val")
            if f"{split}/error" in last}


def final_plateau(tracker: RunTracker, cfg: TrainConfig) -> dict[str, float]:
    """``final/plateau``: 1.0 when the run's ``train_fixed/loss`` history (read back from MLflow, so a
    resumed run's earlier points count) meets ``plateau.verdict``, else 0.0; nothing when it is off."""
    if not cfg.plateau_images:
        return {}
    tracker.flush()
    history = tracker.history(plateau.HISTORY_KEY)
    return {plateau.FINAL_KEY: float(plateau.verdict([s for s, _ in history], [v for _, v in history]).reached)}


def _describe_run(tracker: RunTracker, setup: Setup, final: dict[str, float]) -> None:
    """The run's description (``mlflow.note.content``, shown on its page): net, shortcut, seed,
    iterations, scale and final errors, one sentence."""
    cfg, tags = setup.cfg, run_tags_of_model(setup)
    scale = tracker.tags().get("scale")
    shortcut = "no shortcut" if tags["shortcut"] == "none" else f"shortcut option {tags['shortcut']}"
    errors = ", ".join(f"{key.split('/')[1].replace('_', ' ')} {value:.2f} %" for key, value in final.items())
    tracker.set_tags({"mlflow.note.content": (
        f"{cfg.model} ({tags['arch']}, {shortcut}), seed {cfg.seed}, {setup.iterations} iterations on "
        f"{cfg.dataset}{f', {scale} scale' if scale else ''}: final {errors or 'errors not measured'}.")})


def _log_init_weights(tracker: RunTracker, model: ResNet) -> None:
    """``model/init_state_dict.pt``, the weights of iteration 0 (the diagnostics' init-to-final path
    and shattering at init need them). Logged before the first step and so before the first
    checkpoint: a resumed run continues a run that already has them."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "init_state_dict.pt"
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
        tracker.log_artifacts([(path, "model")])


def _log_final_artifacts(tracker: RunTracker, model: ResNet, cfg: TrainConfig, probes: Probes, data: Dataset) -> None:
    """Weights (state_dict, and the MLflow model ``runs:/<id>/model``), the data trained on (dataset
    input), the resolved config, the probe tables, and the run's own figures."""
    tracker.log_text(cfg.to_json(), "config.json")
    runmodel.log_model(tracker, model, cfg, data)
    tracker.log_input(runmodel.dataset_input(cfg, data))
    _log_figures(tracker, cfg, probes)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "state_dict.pt"
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, weights)
        files: list[tuple[Path, str | None]] = [(weights, "model")]
        files += [(p, "probes") for p in probes.write_tables(Path(tmp) / "probes")]
        tracker.log_artifacts(files)


def _log_figures(tracker: RunTracker, cfg: TrainConfig, probes: Probes) -> None:
    """Its error curves (read back from MLflow, so a resumed run's earlier points are in) and its
    gradient flow at init and end, as PNGs under ``figures/``."""
    from . import runfigures

    tracker.flush()
    history = {key: tracker.history(key) for key in ("train/error", "test/error", "val/error")}
    tracker.log_figure(runfigures.error_curves(history, cfg.name), "figures/error_curves.png")
    flow = probes.tables()["grad_flow"]
    if not flow.empty:
        tracker.log_figure(runfigures.gradient_flow(flow, f"{cfg.name}: gradient flow"), "figures/gradient_flow.png")
