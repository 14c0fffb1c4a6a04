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

from .config import TrainConfig
from .data import Dataset, DeviceLoader, load_dataset
from .errors import UserError, check_can_create
from .models import ResNet, build_model, count_parameters
from .probes import Probes
from .checkpoint import FORMAT_VERSION, Interrupted, StopFlag, checkpoint_path, remove_stale_temps, save_atomic
from .checkpoint import load as load_checkpoint
from .tracking import RunTracker, git_commit, resolve_tracking_uri


@dataclass
class TrainResult:
    run_id: str
    status: str  # FINISHED / FAILED / KILLED
    iterations: int
    metrics: dict[str, float] = field(default_factory=dict)  # last value of each logged scalar
    reason: str | None = None


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for but CUDA is not available here; use --device cpu or auto")
    return torch.device(name)


def total_iterations(cfg: TrainConfig, train_examples: int) -> int:
    """``iterations``, or ``epochs`` x full batches per epoch (the d2l form)."""
    if cfg.epochs is None:
        assert cfg.iterations is not None
        return cfg.iterations
    per_epoch = train_examples // cfg.batch_size
    if per_epoch == 0:
        raise UserError(f"batch_size {cfg.batch_size} is larger than the {train_examples} training examples; lower it")
    return cfg.epochs * per_epoch


def lr_at(cfg: TrainConfig, iteration: int) -> float:
    """Warm-up lr before ``warmup_iterations``, then lr x decay^(milestones passed)."""
    if iteration < cfg.warmup_iterations:
        return cfg.warmup_lr
    return cfg.lr * cfg.lr_decay ** sum(iteration >= m for m in cfg.milestones or [])


@torch.no_grad()
def evaluate(model: nn.Module, loader: DeviceLoader, amp: bool) -> tuple[float, float]:
    """(mean loss, error %) over the whole split; sums stay on the device until the end."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=loader.device)
    n = 0  # counted on the host: sizes are known without asking the device
    for x, y in loader:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        total += torch.stack([F.cross_entropy(logits.float(), y, reduction="sum"), (logits.argmax(1) != y).sum()])
        n += len(y)
    model.train(was_training)
    loss_sum, errors = total.tolist()
    return loss_sum / n, 100.0 * errors / n


@dataclass
class Setup:
    """Everything built and validated before an MLflow run exists."""

    cfg: TrainConfig
    device: torch.device
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
                        seed=cfg.seed, resize=cfg.resize, train_size=cfg.train_size)
    iterations = total_iterations(cfg, len(data.train))
    cfg = cfg.resolved(iterations)
    if len(data.train) < cfg.batch_size:
        raise UserError(f"batch_size {cfg.batch_size} is larger than the {len(data.train)} training examples; lower it")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, in_channels=data.in_channels, num_classes=data.num_classes,
                        shortcut=cfg.shortcut, zero_init_residual=cfg.zero_init_residual)
    return Setup(cfg, device, data, model, iterations)  # cfg here is the resolved copy


def run_tags(s: Setup) -> dict[str, str]:
    commit, dirty = git_commit()
    spec = s.model.spec
    device_name = torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else "cpu"
    return {
        "mlflow.runName": s.cfg.name, "model": spec.name, "arch": spec.arch, "depth": str(spec.depth),
        "family": spec.family, "shortcut": s.model.shortcut_option if spec.residual else "none",
        "dataset": s.cfg.dataset, "seed": str(s.cfg.seed), "device": device_name,
        "torch_version": torch.__version__, "git_commit": commit, "git_dirty": str(dirty).lower(),
        "mlflow.source.git.commit": commit, "num_parameters": str(count_parameters(s.model)),
        "train_examples": str(len(s.data.train)), "data_source": s.data.source,
        "total_iterations": str(s.iterations),
    }


def train(cfg: TrainConfig, *, parent_run_id: str | None = None, extra_tags: dict[str, str] | None = None) -> TrainResult:
    """Train one net and log it as one MLflow run; returns how it ended.

    ``parent_run_id`` nests the run under a study's parent run; ``extra_tags`` (e.g. study,
    scale) are added to the run's tags. The run is tagged with ``config_hash`` of ``cfg`` as
    given (before milestones are resolved), which is what a study matches finished runs on.
    If a checkpoint of the same config exists, the run continues from it in the same MLflow
    run; metric steps already stored are not logged again.
    """
    s = prepare(cfg)
    uri = resolve_tracking_uri(cfg.tracking_uri)
    ckpt_path = checkpoint_path(cfg)
    state = _resumable_state(ckpt_path, cfg.config_hash(), s.device)
    tracker = RunTracker.reopen(uri, state["run_id"]) if state else None
    if tracker is None:
        state = None
        tags = run_tags(s) | {"config_hash": cfg.config_hash()} | (extra_tags or {})
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        tracker = RunTracker.create(uri, s.cfg.experiment, s.cfg.name, params=s.cfg.to_dict(), tags=tags)
    try:
        with StopFlag() as stop:
            result = _loop(s, tracker, stop, ckpt_path, cfg.config_hash(), state)
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
    if ckpt_path is not None:
        ckpt_path.unlink(missing_ok=True)
        remove_stale_temps(ckpt_path)
    return result


def _resumable_state(path: Path | None, config_hash: str, device: torch.device) -> dict | None:
    if path is None or not path.exists():
        return None
    state = load_checkpoint(path, device)
    return state if state.get("config_hash") == config_hash else None


def _loop(s: Setup, tracker: RunTracker, stop: StopFlag, ckpt_path: Path | None, config_hash: str,
          state: dict | None) -> TrainResult:
    cfg, device, model, data = s.cfg, s.device, s.model, s.data
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    fmt = torch.channels_last if cuda else torch.contiguous_format
    model.to(device, memory_format=fmt).train()
    step_model = torch.compile(model) if cfg.compile else model  # the step only: probes and eval stay eager
    opt = torch.optim.SGD(model.parameters(), lr=lr_at(cfg, 0), momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    train_loader = DeviceLoader(data.train, batch_size=cfg.batch_size, device=device, mean=data.mean, std=data.std,
                                train=True, augment=cfg.augment, seed=cfg.seed)
    eval_loaders = {name: DeviceLoader(split, batch_size=cfg.eval_batch_size, device=device, mean=data.mean,
                                       std=data.std, train=False)
                    for name, split in (("test", data.test), ("val", data.val)) if split is not None}
    probes = make_probes(cfg, model, device, eval_loaders["test"])
    stats = torch.zeros(2, device=device)  # loss sum and errors since the last log, kept on the device
    start, window_iters, last, logged_upto = 0, 0, {}, -1

    def snapshot(done: int) -> dict:
        return {"version": FORMAT_VERSION, "run_id": tracker.run_id, "config_hash": config_hash, "iteration": done,
                "model": model.state_dict(), "optimizer": opt.state_dict(), "loader": train_loader.state_dict(),
                "probes": probes.state_dict(), "stats": stats.clone(), "window_iters": window_iters, "last": dict(last),
                "rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state_all() if cuda else None}

    if state:  # resume: every piece of state that the next iteration depends on
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        train_loader.load_state_dict(state["loader"])
        probes.load_state_dict(state["probes"])
        stats.copy_(state["stats"])
        start, window_iters, last = state["iteration"], state["window_iters"], state["last"]
        torch.set_rng_state(state["rng"].cpu())
        if cuda and state["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda_rng"]])
        logged_upto = tracker.last_step("train/loss")  # log events up to here reached the store already
    else:
        probes.on_eval(0)

    batches = train_loader.batches()
    bar = tqdm(total=s.iterations, initial=start, desc=cfg.name, unit="it", disable=not cfg.progress, dynamic_ncols=True)
    window_start = time.perf_counter()
    for it in range(start, s.iterations):
        x, y = next(batches)
        lr = train_step(step_model, opt, probes, stats, cfg, it, x, y, amp=cuda, fmt=fmt)
        window_iters += 1

        done = it + 1
        if done % cfg.log_every == 0 or done == s.iterations:
            loss_sum, errors = stats.tolist()  # the one host read per log interval
            stats.zero_()
            elapsed = time.perf_counter() - window_start
            points = [("train/loss", loss_sum / (window_iters * cfg.batch_size), done),
                      ("train/error", 100.0 * errors / (window_iters * cfg.batch_size), done),
                      ("lr", lr, done), ("perf/images_per_s", window_iters * cfg.batch_size / elapsed, done)]
            diverged = not math.isfinite(loss_sum)
            if not diverged and (done % cfg.eval_every == 0 or done == s.iterations):
                for name, loader in eval_loaders.items():
                    loss_v, err_v = evaluate(model, loader, cuda)
                    points += [(f"{name}/loss", loss_v, done), (f"{name}/error", err_v, done)]
                probes.on_eval(done)
            points += probes.drain()
            if done > logged_upto:
                tracker.log(points)
            _latest(last, points)
            bar.update(window_iters)
            bar.set_postfix(loss=f"{last['train/loss']:.3f}", err=f"{last['train/error']:.1f}%",
                            img_s=f"{last['perf/images_per_s']:.0f}", refresh=False)
            if diverged:
                bar.close()
                reason = f"diverged: non-finite training loss between iterations {done - window_iters} and {done}"
                return TrainResult(tracker.run_id, "FAILED", done, last, reason)
            window_start, window_iters = time.perf_counter(), 0
            if ckpt_path is not None and done % cfg.checkpoint_every == 0 and done < s.iterations:
                tracker.flush()  # what the checkpoint says was logged must be in the store first
                save_atomic(snapshot(done), ckpt_path)
        if stop.signum is not None:
            bar.close()
            if ckpt_path is not None:
                tracker.flush()
                save_atomic(snapshot(done), ckpt_path)
            raise Interrupted(stop.signum, done)
    bar.close()
    _log_final_artifacts(tracker, model, cfg, probes)
    return TrainResult(tracker.run_id, "FINISHED", s.iterations, last)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, probes: Probes, stats: torch.Tensor, cfg: TrainConfig,
               it: int, x: torch.Tensor, y: torch.Tensor, *, amp: bool, fmt: torch.memory_format) -> float:
    """One SGD iteration; adds (loss sum, errors) to ``stats`` on the device and returns the lr.

    Nothing here reads a value back to the host, so on CUDA the next step is queued at once.
    Shared with ``benchmarks/`` so the benchmarks time exactly this step.
    """
    lr = lr_at(cfg, it)
    for group in opt.param_groups:
        group["lr"] = lr
    x = x.contiguous(memory_format=fmt)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    probes.on_backward(it)
    opt.step()
    stats += torch.stack([loss.detach() * len(y), (logits.argmax(1) != y).sum()])
    return lr


def make_probes(cfg: TrainConfig, model: ResNet, device: torch.device, test_loader: DeviceLoader) -> Probes:
    """Gradient flow on a fixed test batch; responses over a fixed test subset (the first
    eval batch), so each probe point costs one small forward/backward, not a test pass."""
    first = next(iter(test_loader))
    probe_batch = (first[0][: cfg.batch_size], first[1][: cfg.batch_size])
    return Probes(model, device=device, grad_every=cfg.grad_every, log_every=cfg.log_every,
                  probe_batch=probe_batch, response_batches=lambda: [first], enabled=cfg.probes)


def _latest(last: dict[str, float], points: list[tuple[str, float, int]]) -> dict[str, float]:
    last.update({name: value for name, value, _ in points})
    return last


def _log_final_artifacts(tracker: RunTracker, model: ResNet, cfg: TrainConfig, probes: Probes) -> None:
    """Weights (state_dict), the resolved config, and the probe tables."""
    tracker.log_text(cfg.to_json(), "config.json")
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "state_dict.pt"
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, weights)
        files: list[tuple[Path, str | None]] = [(weights, "model")]
        files += [(p, "probes") for p in probes.write_tables(Path(tmp) / "probes")]
        tracker.log_artifacts(files)
