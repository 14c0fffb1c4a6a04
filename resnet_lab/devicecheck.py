"""``resnet-lab check-device``: does this accelerator compute the training step's gradients right?

A young backend (MPS) can run a step without an error and still return wrong gradients (BatchNorm
with channels_last on MPS, PyTorch issue 175189). So before a study trains on a device other than
the CPU, one SGD step of a tiny residual net runs there and on the CPU, from the same weights and
the same batch, in the layout the run would use and in fp32; gradients further apart than
``TOLERANCE`` refuse the device with one line. The study runs it once (``study.run_study``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .device import select_device
from .errors import UserError
from .models import build_model
from .speed import choose_memory_format

# Relative L2 distance of a parameter's gradient on the device from the CPU's. fp32 on both sides,
# but CUDA convolutions may run in TF32 (10-bit mantissa, ~1e-3 relative); a wrong kernel is off by O(1).
TOLERANCE = 1e-2
MODEL, BATCH, SIZE = "resnet-8", 16, 16  # stem, one block per stage, both downsampling shortcuts


def tiny_problem(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small residual net (BatchNorm, option-A shortcuts, every layer kind of the lab) and one batch."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the caller's RNG (a run about to be seeded) is left alone
        torch.manual_seed(seed)
        model = build_model(MODEL, in_channels=3, num_classes=10)
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=g)
    y = torch.randint(0, 10, (BATCH,), generator=g)
    return model, x, y


def step_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """One training-mode forward/backward of a copy of ``model`` on ``device``; its gradients, on the CPU."""
    layout = choose_memory_format(device)
    net = _copy(model).to(device, memory_format=layout).train()
    loss = F.cross_entropy(net(x.to(device).contiguous(memory_format=layout)), y.to(device))
    loss.backward()
    return {name: p.grad.detach().float().cpu() for name, p in net.named_parameters() if p.grad is not None}


def _copy(model: nn.Module) -> nn.Module:
    twin = build_model(MODEL, in_channels=3, num_classes=10)
    twin.load_state_dict(model.state_dict())
    return twin


def gradient_gap(device: torch.device) -> tuple[float, str]:
    """The largest relative gradient difference device vs CPU, and the parameter it is in."""
    model, x, y = tiny_problem()
    on_cpu = step_gradients(model, x, y, torch.device("cpu"))
    on_device = step_gradients(model, x, y, device)
    if on_cpu.keys() != on_device.keys():
        missing = sorted(on_cpu.keys() ^ on_device.keys())
        return float("inf"), missing[0]
    gaps = {name: float((on_device[name] - g).norm() / g.norm().clamp_min(1e-12)) for name, g in on_cpu.items()}
    worst = max(gaps, key=lambda n: gaps[n] if gaps[n] == gaps[n] else float("inf"))  # NaN counts as worst
    return gaps[worst], worst


def check_device(name: str) -> str:
    """Refuse (UserError) a device whose training-step gradients differ from the CPU's beyond
    ``TOLERANCE``; else one line saying how close they were. The CPU is the reference: nothing to check."""
    device = select_device(name)
    if device.type == "cpu":
        return "check-device: the CPU is the reference; nothing to compare"
    gap, where = gradient_gap(device)
    if not gap <= TOLERANCE:
        raise UserError(f"device {device} computes wrong gradients: one training step of {MODEL} differs from the "
                        f"CPU's by {gap:.2g} (relative, in {where}; tolerance {TOLERANCE:g}); train with --device "
                        "cpu, or update torch")
    return (f"check-device: one training step of {MODEL} on {device} matches the CPU's "
            f"(largest relative gradient difference {gap:.2g}, in {where}; tolerance {TOLERANCE:g})")
