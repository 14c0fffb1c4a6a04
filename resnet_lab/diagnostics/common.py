"""What every diagnostic shares: an untouched model, fixed subsets, batched loss/error sums."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..data import DIAG_SUBSET_STREAM, Split, derive_seed
from ..device import sum_dtype
from ..errors import UserError

Forward = Callable[[torch.Tensor], torch.Tensor]

# What each fixed subset is for (``subset``'s ``purpose``): its own stream, so no two diagnostics
# share images by accident. Fixed values: changing one changes every subset drawn for it.
LESION_IMAGES, LANDSCAPE_IMAGES, CURVATURE_IMAGES, BN_IMAGES, SHATTERING_IMAGES = 1, 2, 3, 4, 5


@contextmanager
def untouched(model: nn.Module) -> Iterator[None]:
    """Eval mode inside; afterwards every weight, buffer and train flag is put back bitwise.

    Diagnostics move weights (landscape) or re-estimate BN statistics (shattering); restoring
    a clone of the state here, in one place, means none of them can leak into the run.
    """
    flags = [(m, m.training) for m in model.modules()]
    saved = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag
        with torch.no_grad():
            for k, v in model.state_dict(keep_vars=True).items():
                v.copy_(saved[k])


def subset(split: Split, n: int, *, seed: int, purpose: int, mean: tuple[float, ...], std: tuple[float, ...],
           device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed, seeded, unaugmented subset of ``n`` images, normalised as in training, on ``device``.

    Sorted back to file order so the subset is a set, not an order; ``purpose`` keeps the
    subsets of different diagnostics independent of each other for the same seed.
    """
    if n > len(split):
        raise UserError(f"diagnostics: asked for {n} images but the split has {len(split)}; use a smaller size")
    g = torch.Generator().manual_seed(derive_seed(seed, DIAG_SUBSET_STREAM, purpose))
    idx = torch.randperm(len(split), generator=g)[:n].sort().values
    shift = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255
    scale = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255
    x = (split.images[idx].float() - shift) / scale
    return x.to(device), split.labels[idx].to(device)


@torch.no_grad()
def loss_error_sums(forward: Forward, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    """[summed cross-entropy, misclassified count] over (x, y), float64 on the device (no host read;
    float32 on MPS, ``device.sum_dtype``)."""
    total = torch.zeros(2, dtype=sum_dtype(x.device), device=x.device)
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        logits = forward(xb).float()
        total += torch.stack([F.cross_entropy(logits, yb, reduction="sum"), (logits.argmax(1) != yb).sum()])
    return total


def check_inputs(x: torch.Tensor, y: torch.Tensor | None, what: str) -> None:
    """One line for the mistakes a caller can make with the tensors: empty, mismatched, unnormalised."""
    if x.dim() < 2 or len(x) == 0:
        raise UserError(f"{what}: needs a non-empty batch of inputs [N, ...], got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        raise UserError(f"{what}: images must be normalised floats (see diagnostics.common.subset), got uint8")
    if y is not None and y.shape[:1] != x.shape[:1]:
        raise UserError(f"{what}: {len(x)} images but labels of shape {tuple(y.shape)}")


@torch.no_grad()
def reestimate_bn(model: nn.Module, x: torch.Tensor, batch_size: int) -> None:
    """BN running stats := the average of per-batch statistics over x (momentum None; exact when
    x is one batch), then eval mode again.

    For weights whose stored statistics fit nothing: points on the init-to-final path, a net
    at init (callers restore the old statistics through ``untouched``)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for xb in x.split(batch_size):
            model(xb)
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
            m.eval()
