"""Training K >= 1 nets at once, each its own MLflow run: data on the device, an iteration-based
SGD schedule, the loop on one screen (``_loop``).

K = 1 is one net (``resnet-lab train``); K > 1 are nets of one shape trained as one
``fused.FusedResNet`` (a study's group, ``study.group_runs``), each with its own data order,
optimizer, probes, checkpoint and run, so each net trains and logs exactly as it would alone.
The loop is deliberately plain (nanoGPT / airbench style): the learning rate is a pure function of
the iteration (so resuming needs no scheduler state), and loss/error are summed on the device and
read back only when logging, so the GPU never waits for the host between steps. What is said to
MLflow (opening, tagging, checkpointing, describing, ending runs) is in ``resnet_lab.runlog``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import runlog
from .runlog import Setup
from .checkpoint import Interrupted, StopFlag, TrainState, checkpoint_path, history_path
from .config import TrainConfig
from .data import Dataset, DeviceLoader, load_dataset, plateau_subset
from .device import select_device, sum_dtype
from .errors import check_can_create
from .fused import FusedResNet
from .models import ResNet, build_model
from .probes import Probes
from .speed import CompiledStep, Speed, plan
from .speed import step_model as make_step_model
from .tracking import RunTracker


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


def prepare(cfg: TrainConfig, datasets: dict[tuple, Dataset] | None = None) -> Setup:
    """Load the data (sizes checked against it there), build the model. ``cfg`` was validated where
    it was built (``cli.build_config``, ``studyfile``; ``TrainConfig.validate`` for Python callers), so
    only what needs the data or the machine is asked here, each a UserError before any run.
    ``datasets`` shares one load between the nets of a group that ask for the same data."""
    if cfg.checkpoint_every:
        check_can_create(Path(cfg.checkpoint_dir), "checkpoint_dir", "pass --set checkpoint_dir=DIR, or "
                         "--set checkpoint_every=0 to train without checkpoints")
    device = select_device(cfg.device)
    what = dict(data_dir=cfg.data_dir, data_root=cfg.data_root, val_size=cfg.val_size, seed=cfg.seed,
                resize=cfg.resize, train_size=cfg.train_size, test_size=cfg.test_size, batch_size=cfg.batch_size)
    key = (cfg.dataset, *what.values())
    datasets = {} if datasets is None else datasets
    data = datasets[key] = datasets.get(key) or load_dataset(cfg.dataset, **what)
    iterations = total_iterations(cfg, len(data.train))
    resolved = cfg.resolved(iterations)  # an epochs-form schedule is checked here, once the data size is known
    torch.manual_seed(cfg.seed)  # the same seed gives plain-n and resnet-n the same initial weights
    model = build_model(cfg.model, in_channels=data.in_channels, num_classes=data.num_classes,
                        shortcut=cfg.shortcut, zero_init_residual=cfg.zero_init_residual)
    speed = plan(device, cfg.precision, cfg.compile, iterations, cfg.compile_mode)
    return Setup(resolved, cfg.config_hash(), checkpoint_path(cfg), device, speed, data, model, iterations)


@dataclass
class Group:
    """K >= 1 nets on their device, ready to step: per net its training state and eval splits
    (name -> loader), and the one model the step runs: the net itself for K = 1, the nets'
    ``FusedResNet`` (``fused``) for K > 1; compiled or not (``speed.step_model``)."""

    setups: list[Setup]
    states: list[TrainState]
    eval_loaders: list[dict[str, DeviceLoader]]
    model: nn.Module | CompiledStep
    fused: FusedResNet | None


def start(setups: Sequence[Setup]) -> Group:
    """Each net on the device with its own SGD, train loader (its own seed: its own data order and
    augmentation), eval loaders and probes; then, for K > 1, the nets fused (after moving them: the
    fused model's tensors are the nets' own, as views)."""
    device, speed = setups[0].device, setups[0].speed
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    states, eval_loaders = [], []
    for setup in setups:
        cfg, data = setup.cfg, setup.data
        model = setup.model.to(device, memory_format=speed.memory_format).train()
        optimizer = speed.sgd(model.parameters(), lr=lr_at(cfg, 0), momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)  # fused on CUDA, the exact loop on CPU
        loader = DeviceLoader(data.train, batch_size=cfg.batch_size, device=device, mean=data.mean, std=data.std,
                              train=True, augment=cfg.augment, seed=cfg.seed)
        evals = {name: DeviceLoader(split, batch_size=cfg.eval_batch_size, device=device, mean=data.mean,
                                    std=data.std, train=False)
                 for name, split in (("test", data.test), ("val", data.val)) if split is not None}
        if cfg.plateau_images:  # the plateau's curve: fixed training images, unaugmented (resnet_lab.plateau)
            evals["train_fixed"] = DeviceLoader(plateau_subset(data.train, cfg.plateau_images),
                                                batch_size=cfg.eval_batch_size, device=device, mean=data.mean,
                                                std=data.std, train=False)
        probes = make_probes(cfg, model, device, evals["test"])
        states.append(TrainState(model, optimizer, loader, probes, window=torch.zeros(2, device=device),
                                 history=history_path(setup.checkpoint)))
        eval_loaders.append(evals)
    fused = FusedResNet([s.model for s in setups]) if len(setups) > 1 else None
    step_model = make_step_model(fused or setups[0].model, speed)  # the step only: probes and eval stay eager
    return Group(list(setups), states, eval_loaders, step_model, fused)


def train(cfg: TrainConfig, *, parent_run_id: str | None = None, extra_tags: dict[str, str] | None = None) -> TrainResult:
    """Train one net and log it as one MLflow run; returns how it ended (``train_group`` of one)."""
    return train_group([cfg], parent_run_id=parent_run_id, extra_tags=extra_tags)[0]


def train_group(cfgs: Sequence[TrainConfig], *, parent_run_id: str | None = None,
                extra_tags: dict[str, str] | None = None) -> list[TrainResult]:
    """Train K >= 1 nets at once, each logged as its own MLflow run; returns how each ended.

    ``parent_run_id`` nests the runs under a study's parent run; ``extra_tags`` (e.g. study,
    scale) are added to their tags. Each run is tagged with ``config_hash`` of its config as given
    (before milestones are resolved), which is what a study matches finished runs on. A net with a
    checkpoint of the same config continues from it in the same MLflow run; metric steps already
    stored are not logged again.

    The nets of a group share one schedule (run length, lr schedule, batch size, log, eval and
    checkpoint intervals), device and precision, and one ``fused.fusion_key``: ``study.group_runs``
    groups only such runs. They must also start from the same iteration (0, or each from its own
    checkpoint at the same iteration); nets at different iterations are never grouped. A net that
    diverges ends FAILED at that log point while the others train on; an exception or Ctrl-C ends
    every open run of the group (FAILED / KILLED) with its checkpoint kept, so a rerun resumes all.
    """
    datasets: dict[tuple, Dataset] = {}
    setups = [prepare(cfg, datasets) for cfg in cfgs]  # from here on only setup.cfg, the resolved config, is used
    saved = [runlog.resumable_checkpoint(setup) for setup in setups]
    if len({s["iteration"] if s else 0 for s in saved}) > 1:
        raise ValueError("the nets of a group must start from one iteration (study.group_runs), got "
                         f"{[s['iteration'] if s else 0 for s in saved]}")
    group = start(setups)
    trackers: list[RunTracker] = []
    ended: dict[int, TrainResult] = {}  # the nets whose run is over, by position
    try:
        for setup, resume in zip(setups, saved):
            trackers.append(runlog.open_run(setup, resume, parent_run_id, extra_tags or {}, len(setups)))
        with StopFlag() as stop:
            _loop(group, trackers, saved, stop, ended)
    except BaseException as e:
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        reason = (f"interrupted by {e}; rerun to resume from the checkpoint" if isinstance(e, Interrupted) else
                  "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}")
        for k, tracker in enumerate(trackers):
            if k not in ended:
                runlog.end_run(setups[k], tracker, status, reason, keep_checkpoint=True)
        raise
    return [ended[k] for k in range(len(setups))]


def _loop(group: Group, trackers: list[RunTracker], saved: list[dict | None], stop: StopFlag,
          ended: dict[int, TrainResult]) -> None:
    """The training loop of a group (K = 1: one net); ``ended`` gets each net's result as its run ends."""
    setups, states, evals = group.setups, group.states, group.eval_loaders
    cfg, speed, total = setups[0].cfg, setups[0].speed, setups[0].iterations  # one schedule for the group
    # Resume each net exactly where its checkpoint left off (steps MLflow already has are not logged
    # again), or log its initial weights and take the probes' first point, at initialisation.
    for state, tracker, resume in zip(states, trackers, saved):
        if resume:
            state.restore(resume)
        else:
            runlog.log_init_weights(tracker, state.model)
            state.probes.measure(0)
    logged_upto = [tracker.last_step("train/loss") if resume else -1 for tracker, resume in zip(trackers, saved)]
    batches = [state.loader.batches() for state in states]
    it = states[0].iteration
    bar = tqdm(total=total, initial=it, desc=_names(setups), unit="it", disable=not cfg.progress, dynamic_ncols=True)
    window_start = time.perf_counter()
    while it < total and len(ended) < len(states):
        # One SGD step of every net (an ended net still rides along in the fused model, unlogged);
        # nothing is read back to the host, so a GPU never waits for Python.
        lr = train_step(group.model, states, cfg, [next(b) for b in batches], speed, group.fused)
        it += 1
        # Every log_every iterations, per running net: one host read, the evaluation when due, one batch to MLflow.
        if it % cfg.log_every == 0 or it == total:
            seconds, steps = time.perf_counter() - window_start, states[0].window_iters
            running = [k for k in range(len(states)) if k not in ended]
            for k in running:
                points = states[k].end_window(lr, seconds)
                diverged = not math.isfinite(points[0][1])
                if (it % cfg.eval_every == 0 or it == total) and not diverged:
                    for name, loader in evals[k].items():
                        loss, error = evaluate(states[k].model, loader, speed)
                        points.append((f"{name}/loss", loss, it))
                        if name != "train_fixed":  # the plateau's curve is its loss alone: the 30-key budget
                            points.append((f"{name}/error", error, it))
                    states[k].probes.measure(it)
                points += states[k].probes.drain()
                if it > logged_upto[k]:
                    trackers[k].log(points)
                states[k].last.update({name: value for name, value, _ in points})
                # A diverged net's run ends FAILED here; the rest of its group trains on.
                if diverged:
                    reason = f"diverged: non-finite training loss between iterations {it - steps} and {it}"
                    runlog.end_run(setups[k], trackers[k], "FAILED", reason)
                    ended[k] = TrainResult(trackers[k].run_id, "FAILED", it, states[k].last, reason)
            # The bar: the group's mean loss and error, its images/s; the values before the count, so
            # that its last line is drawn once, with the final values.
            last = [states[k].last for k in running]
            bar.set_postfix(loss=f"{sum(m['train/loss'] for m in last) / len(last):.3f}", refresh=False,
                            err=f"{sum(m['train/error'] for m in last) / len(last):.1f}%",
                            img_s=f"{sum(m['perf/images_per_s'] for m in last):.0f}")
            bar.update(steps)
            # A checkpoint every checkpoint_every iterations (the last one is the finished run).
            if cfg.checkpoint_every and it % cfg.checkpoint_every == 0 and it < total:
                for k in (k for k in running if k not in ended):
                    runlog.checkpoint(setups[k], states[k], trackers[k])
            window_start = time.perf_counter()  # after the checkpoint: its write is no training time
        # Ctrl-C / SIGTERM: stop between iterations, checkpointed, so a rerun continues from here.
        if stop.signum is not None:
            bar.close()
            for k in (k for k in range(len(states)) if k not in ended):
                runlog.checkpoint(setups[k], states[k], trackers[k])
            raise Interrupted(stop.signum, it)
    bar.close()
    # The end: each run still open logs its final errors, weights, probe tables, figures and description.
    for k in (k for k in range(len(states)) if k not in ended):
        runlog.log_final(setups[k], states[k], trackers[k])
        runlog.end_run(setups[k], trackers[k], "FINISHED")
        ended[k] = TrainResult(trackers[k].run_id, "FINISHED", total, states[k].last)


def train_step(model: nn.Module | CompiledStep, states: Sequence[TrainState], cfg: TrainConfig,
               batches: Sequence[tuple[torch.Tensor, torch.Tensor]], speed: Speed,
               fused: FusedResNet | None = None) -> float:
    """One SGD iteration of each net of ``states`` on its batch of ``batches``, in ``speed``'s precision
    and layout: each state's window gets (loss sum, errors) on the device, its iteration count
    advances, and the lr used is returned.

    K = 1: ``model`` is ``states[0].model`` or its compiled twin (``speed.step_model``). K > 1: it is
    ``fused`` (or its twin), which takes the K batches stacked; the loss is the sum of the nets' losses,
    so each net's gradient is its own, and ``fused.share_grads`` hands each net its part before its
    probes and its own SGD step (SGD acts per element: exactly the net's unfused update).
    Nothing here reads a value back to the host, so on CUDA the next step is queued at once.
    Shared with ``benchmarks/`` so the benchmarks time exactly this step.
    """
    lr = lr_at(cfg, states[0].iteration)  # once per iteration: one schedule for the group
    xs, ys = zip(*batches)
    with speed.autocast():  # fp32 logits: the head runs outside autocast (ResNet.forward_head, FusedResNet)
        logits = model(speed.layout(xs[0])).unsqueeze(0) if fused is None else model(torch.stack(xs))
    losses = [F.cross_entropy(logits[k], y) for k, y in enumerate(ys)]
    for state in states:
        state.optimizer.zero_grad(set_to_none=True)
    (losses[0] if len(losses) == 1 else torch.stack(losses).sum()).backward()
    if fused is not None:
        fused.share_grads()
    for k, state in enumerate(states):
        for param_group in state.optimizer.param_groups:
            param_group["lr"] = lr
        state.probes.on_backward(state.iteration)
        state.optimizer.step()
        state.window += torch.stack([losses[k].detach() * len(ys[k]), (logits[k].argmax(1) != ys[k]).sum()])
        state.iteration += 1
        state.window_iters += 1
    return lr


def _names(setups: Sequence[Setup]) -> str:
    """The progress bar's label: the run's name, or a group's first name and how many more, fused."""
    names = [s.cfg.name for s in setups]
    return names[0] if len(names) == 1 else f"{names[0]} +{len(names) - 1} fused"


def make_probes(cfg: TrainConfig, model: ResNet, device: torch.device, test_loader: DeviceLoader) -> Probes:
    """Gradient flow on a fixed test batch; responses over a fixed test subset (the first
    eval batch), so each probe point costs one small forward/backward, not a test pass."""
    first = next(iter(test_loader))
    probe_batch = (first[0][: cfg.batch_size], first[1][: cfg.batch_size])
    return Probes(model, device=device, grad_every=cfg.grad_every, log_every=cfg.log_every,
                  probe_batch=probe_batch, response_batches=lambda: [first], enabled=cfg.probes,
                  layer_metrics=cfg.log_layer_metrics)
