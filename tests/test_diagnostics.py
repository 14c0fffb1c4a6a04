"""The four diagnostics of issue 16 against closed forms and the papers' definitions.

Tiny nets (plain-8 / resnet-8 on 1x8x8 inputs) and synthetic tensors keep each test to
seconds; the claims are the issue's Checks: curvature of least squares (H = X^T X / N),
Li's filter normalisation, Veit's lesion of a zero branch, Balduzzi's rho for a linear map.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnet_lab.diagnostics.curvature import curvature
from resnet_lab.diagnostics.landscape import filter_normalised_direction, landscape
from resnet_lab.diagnostics.lesion import lesion, lesioned_forward
from resnet_lab.diagnostics.settings import (CPU, CurvatureSettings, LandscapeSettings, LesionSettings,
                                             ShatteringSettings)
from resnet_lab.diagnostics.shattering import depth_sweep, input_gradients, shattering
from resnet_lab.errors import UserError
from resnet_lab.models import build_model


def tiny(name: str, seed: int = 0, **kw: object) -> nn.Module:
    """A net with BN running stats that are not (0, 1), so eval mode is not a no-op."""
    torch.manual_seed(seed)
    model = build_model(name, in_channels=1, **kw)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                if not kw.get("zero_init_residual"):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.1)
    return model


def images(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


# ---------------------------------------------------------------- curvature

class HalfMSE(nn.MSELoss):
    """0.5 * mean squared error: for a linear map w.x its Hessian is exactly X^T X / N."""

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 0.5 * super().forward(out, target)


def test_curvature_of_least_squares_matches_xtx_over_n() -> None:
    g = torch.Generator().manual_seed(0)
    d, n, subsets = 12, 200, 3
    scales = torch.tensor([3.0, 1.5] + [1.0] * (d - 2))  # a clear top eigenvalue for power iteration
    x = torch.randn(subsets * n, d, generator=g) * scales
    y = torch.randn(subsets * n, 1, generator=g)
    model = nn.Linear(d, 1, bias=False)
    settings = CurvatureSettings(images=n, subsets=subsets, hutchinson_vectors=400, hutchinson_block=400,
                                 batch_size=n)
    df, metrics = curvature(model, x, y, settings, loss=HalfMSE())
    assert list(df.columns) == ["subset", "lambda_max", "trace", "iterations", "converged"] and len(df) == subsets
    for s, row in df.iterrows():
        xs = x[s * n:(s + 1) * n].double()
        h = xs.T @ xs / n
        # Hutchinson with Rademacher vectors: var = 2 * sum of squared off-diagonals / m; 5 % is > 3 sd here
        assert math.sqrt(2 * (h.square().sum() - h.diag().square().sum()) / 400) < 0.05 / 3 * h.trace()
        assert row.lambda_max == pytest.approx(torch.linalg.eigvalsh(h).max().item(), rel=0.01)
        assert row.trace == pytest.approx(h.trace().item(), rel=0.05)
        assert row.converged and row.iterations < settings.power_max_iterations
    assert metrics["diag/curvature/lambda_max"] == pytest.approx(df.lambda_max.mean())
    assert metrics == {"diag/curvature/lambda_max": pytest.approx(df.lambda_max.mean()),
                       "diag/curvature/trace": pytest.approx(df.trace.mean())}


def test_curvature_refuses_too_few_images_for_disjoint_subsets() -> None:
    x, y = images(10)
    with pytest.raises(UserError, match="disjoint subsets"):
        curvature(tiny("resnet-8"), x, y, CurvatureSettings(images=4, subsets=3))


# ---------------------------------------------------------------- landscape

def test_filter_normalised_direction_has_the_weight_filter_norms_and_zero_bn_and_bias() -> None:
    model = tiny("resnet-8")
    direction = filter_normalised_direction(model, torch.Generator().manual_seed(0))
    params = dict(model.named_parameters())
    assert direction.keys() == params.keys()
    modules = dict(model.named_modules())
    for name, d in direction.items():
        owner = modules[name.rpartition(".")[0]]
        if isinstance(owner, (nn.Conv2d, nn.Linear)) and name.endswith(".weight"):
            torch.testing.assert_close(d.flatten(1).norm(dim=1), params[name].detach().flatten(1).norm(dim=1))
            assert not torch.equal(d, params[name].detach())  # a random direction, not the weights
        else:
            assert isinstance(owner, (nn.BatchNorm2d, nn.Linear)) and not d.any(), name


def test_landscape_at_origin_is_the_models_loss_and_slices_have_the_issues_columns() -> None:
    model, init = tiny("plain-8"), tiny("plain-8", seed=5).state_dict()
    x, y = images(24)
    settings = LandscapeSettings(train_images=24, line_points=5, grid=3, path_points=4, batch_size=10)
    df, metrics = landscape(model, init, x, y, settings)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    loss, error = F.cross_entropy(logits, y).item(), 100 * (logits.argmax(1) != y).float().mean().item()
    assert list(df.columns) == ["kind", "x", "y", "loss", "error"]
    assert df.kind.value_counts().to_dict() == {"grid": 9, "line": 5, "path": 4}
    origin = df[(df.kind == "grid") & (df.x == 0) & (df.y == 0)].iloc[0]
    assert origin.loss == pytest.approx(loss, rel=1e-5) and origin.error == pytest.approx(error)
    assert df[(df.kind == "line") & (df.x == 0)].loss.item() == pytest.approx(loss, rel=1e-5)
    line = df[df.kind == "line"].set_index("x").loss
    assert metrics["diag/landscape/sharpness"] == pytest.approx((line[0.5] + line[-0.5]) / 2 - line[0.0])
    assert df[df.kind == "path"].x.tolist() == pytest.approx([-0.25, 0.25, 0.75, 1.25])


# ---------------------------------------------------------------- lesion

def test_deleting_a_zero_branch_residual_block_leaves_predictions_unchanged() -> None:
    model = tiny("resnet-8").eval()
    block = model.stage2.block0  # a downsampling block: its shortcut is option A's zero-pad
    with torch.no_grad():
        block.bn2.weight.zero_()
        block.bn2.bias.zero_()
    x, y = images(32)
    with torch.no_grad():
        full, stem = model(x), model.stem(x)
        torch.testing.assert_close(lesioned_forward(model, stem, (1,)), full)  # block 1 = stage2.block0
        assert not torch.allclose(lesioned_forward(model, stem, (0,)), full)  # a live branch does change them
    df, _ = lesion(model, x, y, LesionSettings(test_images=32, draws=2, batch_size=10))
    base = df[df.kind == "baseline"].error.item()
    assert df[(df.kind == "single") & (df.block == "stage2.block0")].error.item() == base


def test_plain_stage_entry_blocks_are_not_applicable_and_no_deletion_is_the_baseline() -> None:
    model = tiny("plain-14")
    x, y = images(40)
    df, metrics = lesion(model, x, y, LesionSettings(test_images=40, draws=3, batch_size=16))
    assert list(df.columns) == ["kind", "k", "block", "draw", "error"]
    na = df[df.kind == "not_applicable"]
    assert set(na.block) == {"stage2.block0", "stage3.block0"} and na.error.isna().all()
    singles = df[df.kind == "single"]
    assert len(singles) == 4 and not singles.error.isna().any()  # 6 blocks, 2 change shape
    assert sorted(df[df.kind == "k_blocks"].k.unique()) == [1, 2] and (df.kind == "k_blocks").sum() == 2 * 3
    model.eval()
    with torch.no_grad():
        baseline = 100 * int((model(x).argmax(1) != y).sum()) / len(y)
    assert df[df.kind == "baseline"].error.item() == pytest.approx(baseline)
    assert metrics["diag/lesion/baseline_error"] == pytest.approx(baseline)
    assert metrics["diag/lesion/single_max_increase"] == pytest.approx(singles.error.max() - baseline)


# ---------------------------------------------------------------- shattering

def test_linear_model_has_rho_one_at_every_lag() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x, y = images(4)
    df, metrics = shattering(model, x, y, None, ShatteringSettings(points=16, pairs=2, max_lag=5, batch_size=7),
                             moment="init")
    assert list(df.columns) == ["moment", "lag", "rho"] and df.lag.tolist() == [1, 2, 3, 4, 5]
    assert df.rho.tolist() == pytest.approx([1.0] * 5, abs=1e-6)
    assert metrics == {"diag/shattering/rho1/init": pytest.approx(1.0, abs=1e-6)}


class Quadratic(nn.Module):
    """logit_c(x) = sum_j W[c, j] x_j^2, so d logit_c / dx = 2 W[c] * x in closed form."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).square() @ self.w.T


def test_input_gradients_match_the_closed_form_and_per_sample_autograd() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(10, 64, generator=g)
    x, classes = images(9)
    grads = input_gradients(Quadratic(w), x, classes, batch_size=4)
    torch.testing.assert_close(grads.flatten(1), 2 * w[classes] * x.flatten(1))
    model = tiny("plain-8").eval()
    batched = input_gradients(model, x, classes, batch_size=4)
    for i in range(len(x)):
        xi = x[i:i + 1].clone().requires_grad_()
        torch.testing.assert_close(batched[i], torch.autograd.grad(model(xi)[0, classes[i]], xi)[0][0])


def test_depth_sweep_builds_both_archs_at_every_depth_and_seed() -> None:
    x, y = images(4)
    settings = ShatteringSettings(points=8, pairs=1, max_lag=2, sweep_depths=(8, 14), sweep_seeds=2, batch_size=8)
    state = torch.random.get_rng_state()
    df, metrics = depth_sweep(x, y, images(16, seed=3)[0], settings, in_channels=1, num_classes=10)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG stream is untouched
    assert len(df) == 2 * 2 * 2 * 2 and set(df.arch) == {"plain", "resnet"}
    assert set(metrics) == {f"diag/shattering/sweep/{a}-{d}/rho1" for a in ("plain", "resnet") for d in (8, 14)}


def test_reestimated_bn_statistics_are_the_exact_average_over_the_images() -> None:
    from resnet_lab.diagnostics.common import reestimate_bn
    bn = nn.BatchNorm2d(3)
    x = torch.randn(20, 3, 4, 4) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1) + 5
    reestimate_bn(bn, x, batch_size=20)  # one batch: the exact mean and (unbiased) variance
    torch.testing.assert_close(bn.running_mean, x.mean((0, 2, 3)))
    torch.testing.assert_close(bn.running_var, x.transpose(0, 1).flatten(1).var(1))
    assert not bn.training and bn.momentum == 0.1


# ---------------------------------------------------------------- every diagnostic leaves the model as it was

def test_every_diagnostic_leaves_weights_buffers_and_flags_untouched() -> None:
    model = tiny("resnet-8").train()
    model.stage1.block0.bn1.eval()  # a mixed set of flags must come back as it was
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    x, y = images(16)
    init = tiny("resnet-8", seed=3).state_dict()
    lesion(model, x, y, LesionSettings(test_images=16, draws=1, batch_size=8))
    landscape(model, init, x, y, LandscapeSettings(train_images=16, line_points=3, grid=2, path_points=2, batch_size=8))
    curvature(model, x, y, CurvatureSettings(images=4, subsets=2, power_max_iterations=2, hutchinson_vectors=2))
    shattering(model, x, y, x, ShatteringSettings(points=6, pairs=1, max_lag=2, bn_images=16, batch_size=6))
    assert [m.training for m in model.modules()] == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_bad_settings_are_one_line_user_errors() -> None:
    with pytest.raises(UserError, match="LesionSettings.draws must be a positive integer"):
        LesionSettings(draws=0)
    with pytest.raises(UserError, match="max_lag"):
        ShatteringSettings(points=8, max_lag=8)
    with pytest.raises(UserError, match="6n\\+2"):
        ShatteringSettings(sweep_depths=(8, 10))
    assert CPU.lesion.test_images < LesionSettings().test_images
