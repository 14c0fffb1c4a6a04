"""Resumable training state, checkpoints that are never half-written, and a stop flag for Ctrl-C / SIGTERM.

``TrainState`` is everything the next iteration depends on; a checkpoint is its ``capture()``.
A checkpoint is written to a temporary file in the same directory, fsynced, then renamed
over the old one: a crash or a full disk at any moment leaves either the previous
checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import signal
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import TrainConfig
from .data import DeviceLoader
from .errors import UserError
from .probes import Probes

FORMAT_VERSION = 2  # 2: tensors and plain containers only (weights_only), the run's own CUDA RNG state


@dataclass
class TrainState:
    """Everything the next training iteration depends on, in one place.

    A checkpoint is ``capture()`` of it and a resumed run ``restore()``s every piece (weights,
    optimiser momentum, data order, RNG, probe history and the half-done log window), which
    is why a resumed run's metrics equal an uninterrupted run's on CPU.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DeviceLoader  # the train loader: its (epoch, batch) is the data order
    probes: Probes
    window: torch.Tensor  # (loss sum, errors) since the last log point, kept on the device
    iteration: int = 0  # iterations done
    window_iters: int = 0  # iterations since the last log point
    last: dict[str, float] = field(default_factory=dict)  # the last value of each logged metric
    # Where the probes' grad-norm rows go (``history_path``), appended, instead of into every checkpoint:
    # they grow by one row per step, so a checkpoint holding them grew, and took longer, all run long.
    history: Path | None = None
    history_rows: int = 0  # rows of ``history`` written so far by this process or found there on resume

    def capture(self, run_id: str, config_hash: str) -> dict[str, Any]:
        """The checkpoint: this state plus the run it belongs to and the config it trains.

        Only tensors, numbers, strings and plain containers, so ``load`` can refuse anything else.
        With ``history`` set, the grad-norm rows not yet in that file are appended to it first
        (fsynced) and the checkpoint records only their count.
        """
        probes = self.probes.state_dict(rows_elsewhere=self.history is not None)
        if self.history is not None:
            iterations, rows = self.probes.grad_history()
            append_rows(self.history, self.history_rows, iterations[self.history_rows:], rows[self.history_rows:])
            self.history_rows = len(iterations)
        return {"version": FORMAT_VERSION, "run_id": run_id, "config_hash": config_hash, "iteration": self.iteration,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "loader": self.loader.state_dict(), "probes": probes, "stats": self.window.clone(),
                "window_iters": self.window_iters, "last": dict(self.last), "rng": torch.get_rng_state(),
                "cuda_rng": _own_cuda_rng(self.window.device)}

    def end_window(self, lr: float, seconds: float) -> list[tuple[str, float, int]]:
        """Close the log window: its mean train loss, error %, lr and images/s as metric points at the
        current iteration. The window's sums are read back here, once per window."""
        examples = self.window_iters * self.loader.batch_size
        loss_sum, errors = self.window.tolist()  # the one host read per log window
        self.window.zero_()
        self.window_iters = 0
        return [("train/loss", loss_sum / examples, self.iteration), ("train/error", 100.0 * errors / examples,
                self.iteration), ("lr", lr, self.iteration), ("perf/images_per_s", examples / seconds, self.iteration)]

    def restore(self, saved: dict[str, Any]) -> None:
        """Put back every piece of a ``capture()`` (loaded on the CPU: each piece is copied to the device)."""
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.loader.load_state_dict(saved["loader"])
        probes = saved["probes"]
        rows = None
        if probes["grad_rows"] is None and probes.get("grad_count"):
            rows = read_rows(self.history, probes["grad_count"], probes["grad_columns"])
            self.history_rows = probes["grad_count"]
        self.probes.load_state_dict(probes, rows)
        self.window.copy_(saved["stats"])
        self.iteration, self.window_iters, self.last = saved["iteration"], saved["window_iters"], dict(saved["last"])
        torch.set_rng_state(saved["rng"].cpu())
        if self.window.device.type == "cuda" and saved["cuda_rng"] is not None:
            torch.cuda.set_rng_state(saved["cuda_rng"].cpu(), self.window.device)


def _own_cuda_rng(device: torch.device) -> torch.Tensor | None:
    """The global CUDA generator's state of the run's own GPU; None off CUDA.

    Not ``get_rng_state_all()``: that is one state per visible GPU, and restoring it raises
    IndexError in a process that sees fewer (``--devices`` workers, Ray, a smaller node).
    Nothing in training draws from this generator today (the loader has its own), so this is
    only for a future random layer, and only the run's own GPU could matter to it.
    """
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def checkpoint_path(cfg: TrainConfig) -> Path | None:
    """``<checkpoint_dir>/<experiment>/<run name>-<config hash>.pt``; None when checkpoints are off."""
    if cfg.checkpoint_every == 0:
        return None
    return Path(cfg.checkpoint_dir) / cfg.experiment / f"{cfg.name}-{cfg.config_hash()}.pt"


def history_path(checkpoint: Path | None) -> Path | None:
    """The file beside a checkpoint that holds its run's grad-norm rows (``TrainState.history``)."""
    return None if checkpoint is None else checkpoint.with_name(f"{checkpoint.name}.grad_rows")


def remove_checkpoint(path: Path) -> None:
    """A finished run's checkpoint, its rows file and any temp file of a killed writer."""
    path.unlink(missing_ok=True)
    history_path(path).unlink(missing_ok=True)
    remove_stale_temps(path)


def _row_dtype(columns: int) -> np.dtype:
    return np.dtype([("iteration", "<i8"), ("row", "<f4", (columns,))])


def append_rows(path: Path, start: int, iterations: list[int], rows: np.ndarray) -> None:
    """Write rows ``start..`` of the rows file (anything after ``start``: rows of a process killed
    before its next checkpoint, now rewritten), fsynced. Rows before ``start`` are never touched, so
    the checkpoint on disk, which counts at most ``start`` of them, stays whole whatever happens here."""
    if not len(iterations):
        return
    records = np.empty(len(iterations), _row_dtype(rows.shape[1]))
    records["iteration"], records["row"] = iterations, rows
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "r+b" if path.exists() else "wb") as f:
            f.seek(start * records.dtype.itemsize)
            f.truncate()
            f.write(records.tobytes())
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        why = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise CheckpointError(f"could not write checkpoint rows {path}: {why}; the previous checkpoint is kept") from e


def read_rows(path: Path | None, count: int, columns: int) -> tuple[list[int], np.ndarray]:
    """The first ``count`` rows of a rows file, as (iterations, rows); one line if they are not there."""
    dtype = _row_dtype(columns)
    try:
        records = np.fromfile(path, dtype=dtype, count=count) if path is not None else None
    except (OSError, ValueError):
        records = None
    if records is None or len(records) < count:
        raise UserError(f"the checkpoint's gradient-norm rows ({path}) are missing or short of the {count} it "
                        "counts; delete the checkpoint to start the run afresh")
    return records["iteration"].tolist(), records["row"].copy()


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` via temp file + fsync + rename; on failure the old file survives."""
    tmp = path.with_name(f".{path.name}.{_writer_id()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        why = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise CheckpointError(f"could not write checkpoint {path}: {why}; the previous checkpoint is kept") from e


def _writer_id() -> str:
    """``<host>-<pid>``: a checkpoint folder may be shared by machines (Ray), and pids are per host."""
    return f"{socket.gethostname().replace('.', '_')}-{os.getpid()}"


def remove_stale_temps(path: Path) -> None:
    """Delete temp files of writers on this host that were killed mid-write (SIGKILL leaves them).

    A temp file of a live process, or of another host, is left alone.
    """
    host = socket.gethostname().replace(".", "_")
    for tmp in path.parent.glob(f".{path.name}.{host}-*.tmp"):
        pid = tmp.name[len(f".{path.name}.{host}-"):-len(".tmp")]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load(path: Path) -> dict[str, Any]:
    """A checkpoint, every tensor on the CPU (whichever GPU wrote it: ``restore`` copies each piece
    to the run's device), unpickled with ``weights_only`` so a file in a shared folder cannot run code.

    Deletion is advised only for a file that is not a checkpoint; a file that cannot be read
    (permissions, I/O) is reported as such, since it may be a good checkpoint.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise UserError(f"cannot read checkpoint {path}: {e.strerror or e}; fix its permissions or storage and "
                        "rerun to resume") from None
    except pickle.UnpicklingError as e:
        unsafe = re.search(r"GLOBAL (\S+)", str(e))
        if unsafe:
            raise UserError(f"checkpoint {path} holds an object of type {unsafe.group(1)}, not only tensors, numbers "
                            "and strings: refused, as unpickling it could run code; delete it to start the run afresh"
                            ) from None
        raise UserError(f"checkpoint {path} is not a readable checkpoint (torn or foreign file); delete it to start "
                        "the run afresh") from None
    except (RuntimeError, EOFError, ValueError) as e:  # a torn zip archive, a truncated or foreign file
        raise UserError(f"checkpoint {path} is not a readable checkpoint ({type(e).__name__}); delete it to start "
                        "the run afresh") from None
    if not isinstance(state, dict) or state.get("version") != FORMAT_VERSION:
        raise UserError(f"checkpoint {path} has an unknown format (written by another resnet_lab version?); "
                        "delete it to start the run afresh")
    return state


def refuse_other_hardware(path: Path, saved: dict[str, Any], device_type: str, precision: str) -> None:
    """A checkpoint resumes only on the device type and in the precision it was written in; otherwise
    one line naming what differs and how to resume it without changing the run's config (its hash).

    The precision can differ only under ``precision=auto`` (a set precision is the same everywhere),
    where ``speed.native_bf16`` picked it: so the way back is a machine that picks the same, or, on a
    CPU, ``RESNET_LAB_CPU_BF16`` answering that question as the writing machine did.
    """
    written, here = (saved["device_type"], saved["precision"]), (device_type, precision)
    if written == here:
        return
    what = f"checkpoint {path} was written on {written[0]} in {written[1]}, this run is on {here[0]} in {here[1]}"
    if written[0] != here[0]:
        raise UserError(f"{what} (the device differs): resume it with --device {written[0]}, or delete it to train "
                        "afresh here")
    why = f"precision=auto picks {here[1]} here"
    if here[0] == "cpu":
        has = "has no" if here[1] == "fp32" else "has"
        raise UserError(f"{what} ({why}: this CPU {has} native bf16): resume it with RESNET_LAB_CPU_BF16="
                        f"{int(written[1] == 'bf16')} in the environment (bf16 without native units is emulated: "
                        "slower, same numbers), or delete it to train afresh here")
    raise UserError(f"{what} ({why}): resume it on a {here[0]} device where precision=auto picks {written[1]}, or "
                    "delete it to train afresh here")


class CheckpointError(RuntimeError):
    """Writing a checkpoint failed (e.g. disk full); the previous one is intact."""


class Interrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM after checkpointing; ``signum`` says which."""

    def __init__(self, signum: int, iteration: int) -> None:
        super().__init__(f"{signal.Signals(signum).name} at iteration {iteration}")
        self.signum, self.iteration = signum, iteration


class StopFlag:
    """SIGINT/SIGTERM set a flag that the loop checks between iterations.

    Stopping between iterations (not inside ``optimizer.step()``) is what makes the
    interrupt checkpoint consistent. A second signal gets the previous handler, so a
    second Ctrl-C stops at once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.signum = signum
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __exit__(self, *_exc: object) -> None:
        self._restore()
