"""Shared by the benchmarks: the lab's training step, window timing, and the header a report needs."""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from resnet_lab.checkpoint import TrainState
from resnet_lab.config import TrainConfig
from resnet_lab.speed import Speed
from resnet_lab.train import train_step


def lab_step(model: torch.nn.Module, state: TrainState, cfg: TrainConfig, batch: tuple[torch.Tensor, torch.Tensor],
             speed: Speed) -> float:
    """The training loop's own step (``resnet_lab.train.train_step``) for one net: a group of one."""
    return train_step(model, [state], cfg, [batch], speed)


def log_point(state: TrainState) -> None:
    """What the loop reads back once per ``log_every`` steps: the loss/error sums and the grad norms."""
    state.window.tolist()
    state.window.zero_()
    state.window_iters = 0
    state.probes.drain()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for ``fn`` including all device work it queued (synchronised clocks)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def median(values: list[float]) -> float:
    return statistics.median(values)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {os.cpu_count()} cores ({cpu_name()}), {torch.get_num_threads()} torch threads"


def pick_devices(asked: list[str] | None, prog: str) -> list[torch.device]:
    """The asked devices, or cpu plus cuda when present; a missing cuda is a one-line exit 2."""
    names = asked or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" in names and not torch.cuda.is_available():
        print(f"{prog}: --device cuda asked for but torch.cuda.is_available() is False here", file=sys.stderr)
        sys.exit(2)
    return [torch.device(n) for n in names]


def add_threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, help="torch intra-op CPU threads (default: torch's, one per core); "
                   "1 is far steadier on a machine that other jobs keep busy")


def set_threads(n: int | None, p: argparse.ArgumentParser) -> None:
    if n is not None:
        if n < 1:
            p.error("--threads must be >= 1")
        torch.set_num_threads(n)


def load() -> str:
    try:
        return "load average %.2f %.2f %.2f (1/5/15 min)" % os.getloadavg()
    except OSError:
        return "load average unknown"


def header(devices: list[torch.device]) -> str:
    """Date, command, versions, devices and machine load: everything a results table needs beside it."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"date: {now}", f"command: python {' '.join(sys.argv)}",
             f"torch {torch.__version__}, python {platform.python_version()}, cuda build {torch.version.cuda}"]
    lines += [f"device {d.type}: {device_name(d)}" for d in devices]
    lines.append(f"{load()} at start")
    return "\n".join(lines)


def write_csv(path: str | Path, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
