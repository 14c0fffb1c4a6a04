"""Curvature (the method of PyHessian, Yao et al. 2020): top Hessian eigenvalue and trace.

Loss = mean cross-entropy over N unaugmented training images, BN in eval mode (so the
Hessian is that of a fixed function of the weights, not of batch statistics), all
parameters. Repeated on disjoint subsets; the metrics are the mean over subsets, with
the sd beside them.

* lambda_max: power iteration on Hessian-vector products, stopped when the Rayleigh
  quotient changes by less than ``power_tolerance`` (relative) or after
  ``power_max_iterations``. Like PyHessian, it finds the eigenvalue of largest magnitude.
* trace: Hutchinson's estimator mean(v^T H v) over Rademacher vectors v, drawn from a
  seeded generator and multiplied ``hutchinson_block`` columns at a time (one vmapped
  pass per block: amortises the forward pass, bounds memory).

Hessian-vector products are hand-written double backprop (reverse-over-reverse, as in
PyHessian), a block of columns in one vmapped backward (``is_grads_batched``). Chosen over
curvlinops-for-pytorch 3.0.1's ``HessianLinearOperator`` after measuring both on resnet-8,
BN in eval mode, 128 images, 1 CPU thread (benchmarks/diagnostics_cost.py --compare-hvp):
they agree to 3e-7 relative and a single product costs the same (2.0 s vs 2.1 s), but a
block of 8 took 45 s through curvlinops' forward-over-reverse ``vmap(jvp(jacrev))`` against
16 s here, and the Hutchinson blocks are most of the products; it also saves six packages
and ~5 s of import.
"""

from __future__ import annotations

import math

import pandas as pd
import torch
from torch import nn

from ..data import CURVATURE_STREAM, derive_seed
from ..device import sum_dtype
from ..errors import UserError
from ..models import device_of
from .common import check_inputs, untouched
from .settings import CurvatureSettings


class Hessian:
    """The Hessian of ``loss`` (mean reduction) over (x, y) w.r.t. all trainable parameters, as
    ``H @ v`` for a flat vector v [D] or a block of columns [D, k]; nothing leaves the device."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, loss: nn.Module) -> None:
        if getattr(loss, "reduction", None) != "mean":
            raise ValueError(f"curvature: the loss must be a module with reduction='mean', got {loss!r}")
        self.model, self.loss, self.n = model, loss, len(x)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.dim = sum(p.numel() for p in self.params)
        self.batches = list(zip(x.split(batch_size), y.split(batch_size)))

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        cols = v if v.dim() == 2 else v[:, None]
        k, out = cols.shape[1], torch.zeros_like(cols)
        tangents = [c.T.reshape(k, *p.shape) for c, p in zip(cols.split([p.numel() for p in self.params]), self.params)]
        tangents = tangents if k > 1 else [t[0] for t in tangents]
        for xb, yb in self.batches:  # each batch's mean loss weighted by its share of the n images
            with torch.enable_grad():
                scaled = self.loss(self.model(xb), yb) * (len(xb) / self.n)
                g = torch.autograd.grad(scaled, self.params, create_graph=True)
                hv = torch.autograd.grad(g, self.params, grad_outputs=tangents, is_grads_batched=k > 1,
                                         materialize_grads=True)
            out += torch.cat([h.reshape(k, -1) for h in hv], 1).T
        return out if v.dim() == 2 else out[:, 0]


def power_iteration(H: Hessian, settings: CurvatureSettings, generator: torch.Generator,
                    device: torch.device) -> tuple[float, int, bool]:
    """(eigenvalue of largest magnitude, iterations used, whether the stopping rule was met)."""
    v = torch.randn(H.dim, generator=generator).to(device)
    v /= v.norm()
    lam_prev = math.nan
    for it in range(1, settings.power_max_iterations + 1):
        hv = H @ v
        lam = float(v @ hv)  # one host read per iteration: the stopping rule needs it
        if abs(lam - lam_prev) < settings.power_tolerance * (abs(lam_prev) + 1e-12):
            return lam, it, True
        lam_prev, v = lam, hv / hv.norm().clamp_min(1e-30)
    return lam_prev, settings.power_max_iterations, False


def hutchinson_trace(H: Hessian, vectors: int, block: int, generator: torch.Generator,
                     device: torch.device) -> float:
    """mean over Rademacher v of v^T H v, the products done ``block`` columns at a time."""
    total = torch.zeros((), dtype=sum_dtype(device), device=device)
    for start in range(0, vectors, block):
        k = min(block, vectors - start)
        V = (torch.randint(0, 2, (H.dim, k), generator=generator) * 2 - 1).float().to(device)
        total += ((H @ V) * V).sum().to(total.dtype)
    return float(total) / vectors


def curvature(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: CurvatureSettings,
              loss: nn.Module | None = None) -> tuple[pd.DataFrame, dict[str, float]]:
    """lambda_max and trace on ``settings.subsets`` disjoint subsets of ``settings.images`` of (x, y).

    ``loss`` defaults to mean cross-entropy; it must be a module with ``reduction="mean"``.
    """
    check_inputs(x, y, "curvature")
    need = settings.subsets * settings.images
    if len(x) < need:
        raise UserError(f"curvature: {settings.subsets} disjoint subsets of {settings.images} images need {need} "
                        f"images, got {len(x)}; pass more or lower CurvatureSettings.images")
    loss = loss if loss is not None else nn.CrossEntropyLoss()
    device = device_of(model)
    rows = []
    with untouched(model):
        for s in range(settings.subsets):
            part = slice(s * settings.images, (s + 1) * settings.images)
            H = Hessian(model, x[part], y[part], settings.batch_size, loss)
            g = torch.Generator().manual_seed(derive_seed(settings.seed, CURVATURE_STREAM, s))
            lam, its, converged = power_iteration(H, settings, g, device)
            trace = hutchinson_trace(H, settings.hutchinson_vectors, settings.hutchinson_block, g, device)
            rows.append((s, lam, trace, its, converged))
    df = pd.DataFrame(rows, columns=["subset", "lambda_max", "trace", "iterations", "converged"])
    # The spread over subsets stays in the table (the report draws it): a run has room for 8 diag/* keys (issue 14).
    return df, {"diag/curvature/lambda_max": float(df.lambda_max.mean()), "diag/curvature/trace": float(df.trace.mean())}
