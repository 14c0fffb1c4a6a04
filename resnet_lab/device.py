"""Which device a run uses: the one rule, asked by the config, training, the study, its launchers
and the diagnostics (the device used to be decided in five places and set four times on the way
from a study file to a run).

``auto`` picks CUDA, then Apple's MPS, then the CPU. The study's ``auto`` scale follows from the
same answer (the full study where CUDA is, the file's ``[cpu]`` scale elsewhere), and so do the
few MPS exceptions that are about tensors rather than speed (``sum_dtype``). The speed rules
(precision, layout) for each device type live in ``resnet_lab.speed``.
"""

from __future__ import annotations

import re

import torch

from .errors import UserError

DEVICE_FORMS = "auto, cpu, mps, cuda or cuda:N"


def check_device_name(name: str) -> None:
    """The form of a device name (whether that device is here is ``select_device``'s question)."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", name):
        raise UserError(f"device must be {DEVICE_FORMS}, got {name!r}")


def mps_available() -> bool:
    """Apple-silicon GPU through Metal (MPS), built into this torch and usable on this machine."""
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def accelerator() -> str:
    """The device type ``auto`` means here: cuda, else mps, else cpu."""
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if mps_available() else "cpu"


def select_device(name: str) -> torch.device:
    """``auto`` -> ``accelerator()``; a named device must exist here (one line if not)."""
    check_device_name(name)
    if name == "auto":
        return torch.device(accelerator())
    device = torch.device(name)
    if device.type == "mps" and not mps_available():
        raise UserError("device 'mps' asked for but MPS (Apple-silicon GPU) is not available here; "
                        "use --device cpu or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for but CUDA is not available here; use --device cpu or auto")
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.index is not None and device.index >= count:
        have = "1 GPU (cuda:0)" if count == 1 else f"{count} GPUs (cuda:0..cuda:{count - 1})"
        raise UserError(f"device {name!r} does not exist: this machine has {have}; use --device cuda or one of those")
    return device


def auto_scale(device_type: str) -> str:
    """The study scale ``--scale auto`` means on ``device_type``: the full study on CUDA, the file's
    reduced ``[cpu]`` scale elsewhere (an Apple GPU trains the paper's 50 runs in days, not hours)."""
    return "full" if device_type == "cuda" else "cpu"


def visible_gpus() -> list[str]:
    """Every CUDA device this process sees, ``cuda:0..cuda:N-1`` (empty without CUDA): where
    ``--jobs N`` spreads its workers when ``--devices`` is not given."""
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def sum_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype of sums kept on ``device`` (losses, error counts, statistics): float64, except on
    MPS, which has no float64; there float32 (exact for counts up to 2**24, ~7 digits for sums)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64
