"""Plain and residual networks that differ in one place: the shortcut.

Two families, both built from the same ``BasicBlock``:

* CIFAR (He et al. 2016, Sec. 4.2): 6n+2 layers, stem conv3x3(16), three stages of n
  blocks at 16/32/64 channels, global average pool, linear. Default shortcut option A.
* ImageNet-style (He et al. Table 1, the d2l.ai ResNet-18 seed): 18 or 34 layers,
  7x7/2 stem + 3x3/2 max-pool, four stages at 64..512 channels. Default option B.

A *plain* net is the same net whose blocks have ``shortcut=None``; with option A the
shortcut has no parameters, so plain-n and resnet-n have identical parameter counts and,
for the same seed, identical initial weights.

Layer names are stable and used by probes and plots: ``stem.conv``,
``stage1.block0.conv1``, ``stage3.block8.conv2``, ``stage2.block0.shortcut.conv``, ``fc``.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError

Shortcut = Literal["A", "B", "C"]
SHORTCUTS: tuple[str, ...] = ("A", "B", "C")
IMAGENET_BLOCKS: dict[int, tuple[int, ...]] = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
CIFAR_WIDTHS: tuple[int, ...] = (16, 32, 64)
IMAGENET_WIDTHS: tuple[int, ...] = (64, 128, 256, 512)


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1; no bias because BN follows."""
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution for projection shortcuts (options B and C)."""
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option A: subsample by the stride and zero-pad the new channels. No parameters.

    He et al. Sec. 3.3: "the shortcut still performs identity mapping, with extra zero
    entries padded for increasing dimensions". Subsampling takes every stride-th pixel,
    which is what a 1x1 stride-2 identity would see.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.stride, self.extra = stride, out_ch - in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra > 0:
            # Pad the channel dim (dims are listed last-first: W, H, C).
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra))
        return x

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad_channels={self.extra}"


class Projection(nn.Sequential):
    """Options B/C: 1x1 conv + BN, named ``shortcut.conv`` / ``shortcut.bn``."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__(OrderedDict(conv=conv1x1(in_ch, out_ch, stride), bn=nn.BatchNorm2d(out_ch)))


def make_shortcut(option: Shortcut | None, in_ch: int, out_ch: int, stride: int) -> nn.Module | None:
    """The one thing that makes a block residual. ``None`` makes it plain."""
    if option is None:
        return None
    same_shape = stride == 1 and in_ch == out_ch
    if option == "C" or (option == "B" and not same_shape):
        return Projection(in_ch, out_ch, stride)
    if same_shape:
        return nn.Identity()
    return ZeroPadShortcut(in_ch, out_ch, stride)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, then (+ shortcut) and ReLU.

    The only difference between a plain and a residual block is ``self.shortcut``.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, shortcut: Shortcut | None) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = make_shortcut(shortcut, in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return F.relu(out)

    def zero_init_last(self) -> None:
        """Zero the last BN's gamma: the residual branch starts at 0, the block at ReLU(x)."""
        nn.init.zeros_(self.bn2.weight)


@dataclass(frozen=True)
class ModelSpec:
    """What a model name like ``plain-56`` or ``resnet-18`` means."""

    name: str
    residual: bool
    depth: int
    family: Literal["cifar", "imagenet"]

    @property
    def arch(self) -> str:
        return "residual" if self.residual else "plain"

    @property
    def blocks_per_stage(self) -> tuple[int, ...]:
        if self.family == "imagenet":
            return IMAGENET_BLOCKS[self.depth]
        n = (self.depth - 2) // 6
        return (n, n, n)

    @property
    def default_shortcut(self) -> Shortcut:
        return "A" if self.family == "cifar" else "B"


def canonical_name(name: str) -> str:
    """``" ResNet-20"`` -> ``"resnet-20"``: the one spelling a config, its run, tags and a study's plan use."""
    return name.strip().lower()


def parse_model_name(name: str) -> ModelSpec:
    """Parse ``plain-N`` / ``resnet-N``; N is 6n+2 (CIFAR family) or 18/34 (ImageNet family)."""
    m = re.fullmatch(r"(plain|resnet)-(\d+)", canonical_name(name))
    if not m:
        raise UserError(
            f"unknown model {name!r}: use plain-N or resnet-N with N = 6n+2 (20, 32, 44, 56, 110, 1202, ...) or 18/34"
        )
    kind, depth = m.group(1), int(m.group(2))
    if depth in IMAGENET_BLOCKS:
        family: Literal["cifar", "imagenet"] = "imagenet"
    elif depth >= 8 and (depth - 2) % 6 == 0:
        family = "cifar"
    else:
        raise UserError(
            f"depth {depth} in {name!r} is not 6n+2 (CIFAR family: 8, 14, 20, 26, 32, 44, 56, 110, ...) "
            "nor 18/34 (ImageNet family); pick a depth of that form"
        )
    return ModelSpec(name=f"{kind}-{depth}", residual=kind == "resnet", depth=depth, family=family)


class ResNet(nn.Module):
    """Stem, stages of BasicBlocks, global average pool, linear head.

    ``forward_features`` / ``forward_head`` are split (as in timm) so probes can take
    the pooled features or hook any stage without re-implementing the forward pass.
    """

    def __init__(
        self,
        spec: ModelSpec,
        *,
        in_channels: int = 3,
        num_classes: int = 10,
        shortcut: Shortcut | None = None,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        option = shortcut or spec.default_shortcut
        if option not in SHORTCUTS:
            raise UserError(f"unknown shortcut option {option!r}: use A (zero-pad), B (projection where shape changes) or C (projection everywhere)")
        if zero_init_residual and not spec.residual:
            raise UserError(f"zero_init_residual needs a residual net; {spec.name} has no shortcut to fall back on (use resnet-{spec.depth})")
        self.spec, self.shortcut_option = spec, option
        block_shortcut: Shortcut | None = option if spec.residual else None

        if spec.family == "cifar":
            widths = CIFAR_WIDTHS
            self.stem = nn.Sequential(OrderedDict(
                conv=conv3x3(in_channels, widths[0]), bn=nn.BatchNorm2d(widths[0]), relu=nn.ReLU(inplace=True)))
        else:
            widths = IMAGENET_WIDTHS
            self.stem = nn.Sequential(OrderedDict(
                conv=nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False),
                bn=nn.BatchNorm2d(widths[0]), relu=nn.ReLU(inplace=True),
                pool=nn.MaxPool2d(3, stride=2, padding=1)))

        in_ch = widths[0]
        self.stage_names: list[str] = []
        for i, (width, n_blocks) in enumerate(zip(widths, spec.blocks_per_stage), start=1):
            stride = 1 if i == 1 else 2
            self.add_module(f"stage{i}", self._make_stage(in_ch, width, n_blocks, stride, block_shortcut))
            self.stage_names.append(f"stage{i}")
            in_ch = width
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        self._init_weights(zero_init_residual)

    @staticmethod
    def _make_stage(in_ch: int, out_ch: int, n_blocks: int, stride: int, shortcut: Shortcut | None) -> nn.Sequential:
        """n blocks; the first changes width/resolution, named block0..block{n-1}."""
        blocks = [BasicBlock(in_ch if j == 0 else out_ch, out_ch, stride if j == 0 else 1, shortcut) for j in range(n_blocks)]
        return nn.Sequential(OrderedDict((f"block{j}", b) for j, b in enumerate(blocks)))

    def _init_weights(self, zero_init_residual: bool) -> None:
        """He init (He et al. 2015, forward case: std = sqrt(2 / (k*k*c_in))), BN at (1, 0).

        Module creation order is the same for plain and residual, and option A has no
        parameters, so the same seed gives plain-n and resnet-n identical weights.
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for block in self.blocks():
                block.zero_init_last()

    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, n) for n in self.stage_names]

    def blocks(self) -> list[BasicBlock]:
        """All blocks in forward order."""
        return [b for stage in self.stages() for b in stage]

    def named_blocks(self) -> list[tuple[str, BasicBlock]]:
        """``("stage1.block0", block), ...`` in forward order."""
        return [(f"{s}.{n}", b) for s in self.stage_names for n, b in getattr(self, s).named_children()]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages():
            x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Pool + fc in the weights' dtype (fp32) even under bf16 autocast: bf16 logits (8 bits of
        mantissa) tie or swap the argmax on ~0.5 % of rows, which would count errors wrongly (issue 15);
        the head is tiny. (A net cast to float64, as in the fusion tests, computes it in float64.)"""
        with torch.autocast(x.device.type, enabled=False):
            return self.fc(torch.flatten(self.pool(x.to(self.fc.weight.dtype)), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build_model(
    name: str,
    *,
    in_channels: int = 3,
    num_classes: int = 10,
    shortcut: Shortcut | None = None,
    zero_init_residual: bool = False,
) -> ResNet:
    """Build ``plain-N`` or ``resnet-N``; ``shortcut`` None means the family default."""
    return ResNet(parse_model_name(name), in_channels=in_channels, num_classes=num_classes,
                  shortcut=shortcut, zero_init_residual=zero_init_residual)


def device_of(model: nn.Module) -> torch.device:
    """Where the model's weights live (the probes and the diagnostics put their inputs there)."""
    return next(model.parameters()).device


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def layer_table(model: ResNet, input_shape: tuple[int, int, int]) -> list[tuple[str, str, tuple[int, ...], int]]:
    """(name, type, output shape without batch, own parameters) for each leaf layer.

    Runs one forward pass in eval mode with hooks, so shapes are what the net really
    produces for ``input_shape`` (C, H, W); hooks are removed afterwards.
    """
    rows: list[tuple[str, str, tuple[int, ...], int]] = []
    handles = []
    for name, mod in model.named_modules():
        if name and not list(mod.children()) and not isinstance(mod, (nn.Identity, nn.ReLU)):
            def hook(m: nn.Module, _inp: tuple, out: torch.Tensor, name: str = name) -> None:
                rows.append((name, type(m).__name__, tuple(out.shape[1:]), sum(p.numel() for p in m.parameters(recurse=False))))
            handles.append(mod.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return rows
