"""Loss landscape (Li et al. 2018): filter-normalised random slices and the init-to-final path.

Directions are Gaussian with filter normalisation: each output filter (dim 0) of every
conv/linear weight is rescaled to the norm of that filter in the trained weights; BN
parameters and biases get direction 0, and BN runs in eval mode with the trained running
statistics, so the slices move only the weights the normalisation is about.

Along the linear path from the initial to the final weights, theta(t) = (1-t) theta_0 + t
theta_1 for t in [-0.25, 1.25], every parameter (BN's gamma and beta too) is interpolated,
and BN's running statistics are re-estimated at each point from the landscape subset (one
train-mode pass, ``common.reestimate_bn``) before evaluating in eval mode. Neither end's statistics fit
the weights in between, and the init statistics (0, 1) fit nothing, so this (as in
Garipov et al. 2018 for curves between solutions) is what makes each point a usable net;
hence t = 1 is close to, not identical with, the grid's (0, 0).

Weights are set in place for each point and restored bitwise afterwards; loss and error
sums for all points stay on the device and are read back once.
Table columns (kind, x, y, loss, error): kind ``line`` (x = alpha, y NaN), ``grid`` (x, y),
``path`` (x = t, y NaN); loss is mean cross-entropy, error in %.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..errors import UserError
from ..device import sum_dtype
from ..models import device_of
from .common import check_inputs, loss_error_sums, reestimate_bn, untouched
from .settings import LandscapeSettings

PATH_RANGE = (-0.25, 1.25)
SHARPNESS_ALPHA = 0.5


def filter_normalised_direction(model: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A Gaussian direction per parameter name: conv/linear weights filter-normalised, the rest 0."""
    weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    direction = {}
    for name, p in model.named_parameters():
        if name not in weights:
            direction[name] = torch.zeros_like(p)
            continue
        d = torch.randn(p.shape, generator=generator, device=generator.device, dtype=p.dtype).to(p.device)
        w_norm = p.detach().flatten(1).norm(dim=1) if p.dim() > 1 else p.detach().norm().view(1)
        d_norm = d.flatten(1).norm(dim=1) if p.dim() > 1 else d.norm().view(1)
        direction[name] = d * (w_norm / d_norm.clamp_min(1e-12)).view(-1, *[1] * (p.dim() - 1))
    return direction


def _set_weights(params: list[nn.Parameter], base: list[torch.Tensor], dirs: list[list[torch.Tensor]],
                 coeffs: list[float]) -> None:
    """params = base + sum_i coeffs[i] * dirs[i], in place, with fused foreach kernels."""
    with torch.no_grad():
        torch._foreach_copy_(params, base)
        for c, d in zip(coeffs, dirs):
            if c:
                torch._foreach_add_(params, d, alpha=c)


def landscape(model: nn.Module, init_state: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
              settings: LandscapeSettings) -> tuple[pd.DataFrame, dict[str, float]]:
    """1D and 2D filter-normalised slices around the trained weights, and the init-to-final path."""
    check_inputs(x, y, "landscape")
    names = [n for n, _ in model.named_parameters()]
    missing = [n for n in names if n not in init_state]
    if missing:
        raise UserError(f"landscape: the initial state_dict lacks {missing[0]} (and {len(missing) - 1} more); "
                        "pass the run's model/init_state_dict.pt for this same architecture")
    device = device_of(model)
    g = torch.Generator(device="cpu").manual_seed(settings.seed)
    params = list(model.parameters())
    final = [p.detach().clone() for p in params]
    d1, d2 = (list(filter_normalised_direction(model, g).values()) for _ in range(2))
    init = [init_state[n].to(device, p.dtype) for n, p in zip(names, params)]
    alphas = np.union1d(np.linspace(-1, 1, settings.line_points), [-SHARPNESS_ALPHA, 0.0, SHARPNESS_ALPHA])
    axis = np.linspace(-1, 1, settings.grid)
    ts = np.linspace(*PATH_RANGE, settings.path_points)
    points = [("line", a, np.nan) for a in alphas] + [("grid", a, b) for a in axis for b in axis]
    sums = torch.zeros(len(points) + len(ts), 2, dtype=sum_dtype(device), device=device)
    with untouched(model):
        for i, (_, a, b) in enumerate(points):
            _set_weights(params, final, [d1, d2], [float(a), 0.0 if np.isnan(b) else float(b)])
            sums[i] = loss_error_sums(model, x, y, settings.batch_size)
        delta = torch._foreach_sub(final, init)
        for j, t in enumerate(ts):
            _set_weights(params, init, [delta], [float(t)])
            reestimate_bn(model, x, settings.batch_size)
            sums[len(points) + j] = loss_error_sums(model, x, y, settings.batch_size)
    loss, err = (sums / torch.tensor([1.0, 0.01], dtype=sums.dtype, device=device) / len(y)).T.tolist()
    points += [("path", t, np.nan) for t in ts]
    df = pd.DataFrame({"kind": [p[0] for p in points], "x": [float(p[1]) for p in points],
                       "y": [float(p[2]) for p in points], "loss": loss, "error": err})
    line = df[df.kind == "line"].set_index("x")["loss"]
    sharpness = (line[SHARPNESS_ALPHA] + line[-SHARPNESS_ALPHA]) / 2 - line[0.0]
    return df, {"diag/landscape/sharpness": float(sharpness)}
