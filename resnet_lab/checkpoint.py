"""Checkpoints that are never half-written, and a stop flag for Ctrl-C / SIGTERM.

A checkpoint is written to a temporary file in the same directory, fsynced, then renamed
over the old one: a crash or a full disk at any moment leaves either the previous
checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from .config import TrainConfig
from .errors import UserError

FORMAT_VERSION = 1


def checkpoint_path(cfg: TrainConfig) -> Path | None:
    """``<checkpoint_dir>/<experiment>/<run name>-<config hash>.pt``; None when checkpoints are off."""
    if cfg.checkpoint_every == 0:
        return None
    return Path(cfg.checkpoint_dir) / cfg.experiment / f"{cfg.name}-{cfg.config_hash()}.pt"


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


def load(path: Path, device: torch.device) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint gets the same advice
        raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}); delete it to start the run afresh") from None
    if not isinstance(state, dict) or state.get("version") != FORMAT_VERSION:
        raise UserError(f"checkpoint {path} has an unknown format; delete it to start the run afresh")
    return state


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
