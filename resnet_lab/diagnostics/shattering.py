"""Gradient structure / shattering (Balduzzi et al. 2017).

On the straight line from test image a to test image b, at M evenly spaced points x(t),
g(t) = d logit_{class of a}(x(t)) / d x(t); rho(lag) = mean over t of cos(g(t), g(t + lag)),
averaged over ``pairs`` image pairs. rho near 1 means the gradient changes smoothly along
the line; "shattered" gradients decorrelate (rho -> 0) after a lag of one point.

BN runs in eval mode with running statistics re-estimated from one fixed batch of real
training images (``common.reestimate_bn``). At init the stored statistics are (0, 1) and describe no
real activation, so without this an untrained deep net's activations blow up or vanish and
rho says nothing; the same procedure is used at the end of training so the two moments
differ only in the weights. Metrics ``diag/shattering/rho1/init`` and
``diag/shattering/rho1/final`` name the moment; ``moment`` is a column of the table.

``depth_sweep`` builds plain and residual nets at several depths itself (init only, no
training needed) to draw rho(1) against depth.
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from ..errors import UserError
from ..models import build_model, device_of
from .common import check_inputs, reestimate_bn, untouched
from .settings import ShatteringSettings

MOMENTS = ("init", "final")


def input_gradients(model: nn.Module, x: torch.Tensor, classes: torch.Tensor, batch_size: int) -> torch.Tensor:
    """d logit_{classes[i]}(x[i]) / d x[i] for every i, batched: in eval mode samples are
    independent, so the gradient of the summed logits w.r.t. the batch is every per-sample one."""
    out = []
    for xb, cb in zip(x.split(batch_size), classes.split(batch_size)):
        xb = xb.detach().requires_grad_()
        with torch.enable_grad():
            picked = model(xb).gather(1, cb.view(-1, 1)).sum()
            out.append(torch.autograd.grad(picked, xb)[0])
    return torch.cat(out)


def correlation_by_lag(g: torch.Tensor, max_lag: int) -> torch.Tensor:
    """rho(lag) for lag 1..max_lag from gradients g [M, ...] along one line (on the device)."""
    unit = g.flatten(1)
    unit = unit / unit.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return torch.stack([(unit[:-lag] * unit[lag:]).sum(1).mean() for lag in range(1, max_lag + 1)])


def line_points(a: torch.Tensor, b: torch.Tensor, m: int) -> torch.Tensor:
    """M evenly spaced points from a to b, both ends included: [M, *a.shape]."""
    t = torch.linspace(0, 1, m, device=a.device).view(-1, *[1] * a.dim())
    return (1 - t) * a + t * b


def shattering(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bn_images: torch.Tensor | None,
               settings: ShatteringSettings, moment: str = "final") -> tuple[pd.DataFrame, dict[str, float]]:
    """rho(lag) on ``settings.pairs`` lines between test images (x[2i], x[2i+1]), class of x[2i].

    ``bn_images``: the fixed batch of training images for BN statistics (None: keep the
    model's own, e.g. for a net without BN). Table columns (moment, lag, rho).
    """
    check_inputs(x, y, "shattering")
    if moment not in MOMENTS:
        raise UserError(f"shattering: moment must be one of {', '.join(MOMENTS)}, got {moment!r}")
    if len(x) < 2 * settings.pairs:
        raise UserError(f"shattering: {settings.pairs} pairs need {2 * settings.pairs} test images, got {len(x)}")
    rho = torch.zeros(settings.max_lag, device=device_of(model))
    with untouched(model):
        if bn_images is not None:
            reestimate_bn(model, bn_images, settings.batch_size)
        for i in range(settings.pairs):
            pts = line_points(x[2 * i], x[2 * i + 1], settings.points)
            classes = y[2 * i].expand(settings.points)
            rho += correlation_by_lag(input_gradients(model, pts, classes, settings.batch_size), settings.max_lag)
    values = (rho / settings.pairs).tolist()  # one host read
    df = pd.DataFrame({"moment": moment, "lag": range(1, settings.max_lag + 1), "rho": values})
    return df, {f"diag/shattering/rho1/{moment}": values[0]}


def depth_sweep(x: torch.Tensor, y: torch.Tensor, bn_images: torch.Tensor, settings: ShatteringSettings, *,
                in_channels: int, num_classes: int) -> tuple[pd.DataFrame, dict[str, float]]:
    """rho(lag) at init for plain and resnet at every sweep depth and seed (nets built here).

    Each (depth, seed) builds plain and resnet after the same ``torch.manual_seed(seed)`` (in a forked RNG), so
    they start from identical weights, as in training. Columns (arch, depth, seed, lag, rho);
    metrics ``diag/shattering/sweep/{plain|resnet}-{depth}/rho1``, mean over seeds.
    """
    device = x.device
    frames = []
    for depth in settings.sweep_depths:
        for seed in range(settings.sweep_seeds):
            for arch in ("plain", "resnet"):
                with torch.random.fork_rng(devices=[]):  # seed the build without touching the caller's RNG
                    torch.manual_seed(seed)
                    model = build_model(f"{arch}-{depth}", in_channels=in_channels, num_classes=num_classes)
                model = model.to(device)
                df, _ = shattering(model, x, y, bn_images, settings, moment="init")
                frames.append(df.drop(columns="moment").assign(arch=arch, depth=depth, seed=seed))
    out = pd.concat(frames, ignore_index=True)[["arch", "depth", "seed", "lag", "rho"]]
    rho1 = out[out.lag == 1].groupby(["arch", "depth"]).rho.mean()
    return out, {f"diag/shattering/sweep/{a}-{d}/rho1": float(v) for (a, d), v in rho1.items()}
