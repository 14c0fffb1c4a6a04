"""K nets of one shape trained as one model: horizontal fusion (HFTA, Wang et al., MLSys 2021).

A study is many small nets of a few shapes, and one small net leaves the hardware mostly idle: a
CIFAR ResNet's kernels are too small to fill a GPU, or to amortise a CPU kernel's overhead. Fused,
the K nets of a shape run as one model and every kernel does K times the work:

* activations are ``(B, K*C, H, W)``: net k owns the channel block ``[k*C, (k+1)*C)``;
* each convolution is one grouped convolution (``groups=K``): no channel of one net sees another's;
* each BatchNorm is one BatchNorm over K*C channels: its statistics are per channel, so per net;
* the option-A shortcut (subsample, zero-pad) pads inside each net's channel block, and a 0/1 mask
  per net adds it for residual nets only, so plain-n and resnet-n of any seed fuse together;
* the K linear heads are one batched matmul, in fp32 like ``ResNet.forward_head``.

Nothing else is fused. Every fused tensor is the K nets' tensors concatenated along dim 0
(``num_batches_tracked``, a 0-dim counter, stacked), and each net's own Parameter and buffer
objects are then pointed (``.data``) at their slice of it. So each net stays a whole, ordinary
``ResNet``: its ``state_dict``, checkpoints, probes, evaluation and an optimizer over its own
parameters (built before or after fusing) all read and write the fused storage.

Option B/C nets (projection shortcuts, the ImageNet-style default) are not fused: ``fusion_key``
returns None for them and they train one at a time.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models import BasicBlock, ResNet

FusionKey = tuple[str, int, tuple[int, ...], int, int]


def fusion_key(net: ResNet) -> FusionKey | None:
    """Nets with equal keys can be fused: same family, depth, widths, input channels and classes,
    option-A (or no) shortcuts. Plain and residual nets of option A share a key: the shortcut adds
    no parameters, so their tensors have the same shapes. Option B/C: None (not fusable)."""
    if net.shortcut_option != "A":
        return None
    widths = tuple(stage[0].conv1.out_channels for stage in net.stages())
    return (net.spec.family, net.spec.depth, widths, net.stem.conv.in_channels, net.fc.out_features)


def layout_of(t: Tensor) -> torch.memory_format:
    """channels_last where ``t`` is laid out so (and not also contiguous), else contiguous."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def concat(parts: Sequence[Tensor]) -> Tensor:
    """The K nets' tensors as one, along dim 0 (0-dim counters stacked), in the nets' layout."""
    if parts[0].dim() == 0:
        return torch.stack(list(parts))
    return torch.cat(list(parts)).contiguous(memory_format=layout_of(parts[0]))


def split(fused: Tensor, k: int, zero_dim: bool) -> tuple[Tensor, ...]:
    """Net i's part of a fused tensor (or of its gradient): a view, never a copy."""
    return fused.unbind(0) if zero_dim else fused.chunk(k)


def rebind(fused: Tensor, originals: Sequence[Tensor]) -> None:
    """Point each net's tensor at its slice of ``fused``, keeping the tensor object (a Parameter stays
    the same Parameter, so optimizers, probes and hooks that hold it see the fused storage)."""
    for t, part in zip(originals, split(fused.detach(), len(originals), originals[0].dim() == 0)):
        t.data = part


class FusedLayer(nn.Module):
    """A layer made of its K source layers' tensors; remembers whose they were, for ``share_grads``."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: dict[str, list[Tensor]] = {}

    def adopt_parameter(self, name: str, params: Sequence[nn.Parameter]) -> None:
        self.register_parameter(name, nn.Parameter(concat([p.detach() for p in params]),
                                                   requires_grad=params[0].requires_grad))
        rebind(getattr(self, name), params)
        self.sources[name] = list(params)

    def adopt_buffer(self, name: str, buffers: Sequence[Tensor]) -> None:
        self.register_buffer(name, concat(buffers))
        rebind(getattr(self, name), buffers)

    def share_grads(self) -> None:
        """Hand each net its part of the fused gradient (a view), and clear the fused one, so the next
        backward starts from zero however the nets' optimizers zero their grads."""
        for name, params in self.sources.items():
            fused = getattr(self, name)
            grads = [None] * len(params) if fused.grad is None else split(fused.grad, len(params), params[0].dim() == 0)
            for p, g in zip(params, grads):
                p.grad = g
            fused.grad = None


def same(values: Sequence[Any], what: str) -> Any:
    """The one value all K layers share; fusing layers that differ would silently train wrong nets."""
    if any(v != values[0] for v in values):
        raise ValueError(f"cannot fuse: the nets' {what} differ ({sorted(set(map(str, values)))})")
    return values[0]


class GroupedConv2d(FusedLayer):
    """K bias-free convolutions as one with ``groups=K``: net k's output channels see only its inputs."""

    def __init__(self, convs: Sequence[nn.Conv2d]) -> None:
        super().__init__()
        self.groups = len(convs)
        self.stride, self.padding = same([c.stride for c in convs], "stride"), same([c.padding for c in convs], "padding")
        same([(c.groups, c.dilation, c.bias is None, c.padding_mode) for c in convs], "conv settings")
        if convs[0].bias is not None or convs[0].groups != 1:
            raise ValueError("cannot fuse: only bias-free, ungrouped convolutions (the lab's) are fused")
        self.adopt_parameter("weight", [c.weight for c in convs])

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, None, self.stride, self.padding, 1, self.groups)


class FusedBatchNorm2d(FusedLayer):
    """K BatchNorms as one over K*C channels: mean, variance and running statistics are per channel,
    hence per net. Each net's ``num_batches_tracked`` counts its own batches, as ``nn.BatchNorm2d``'s."""

    def __init__(self, bns: Sequence[nn.BatchNorm2d]) -> None:
        super().__init__()
        self.eps, self.momentum = same([b.eps for b in bns], "BN eps"), same([b.momentum for b in bns], "BN momentum")
        if self.momentum is None or not all(b.affine and b.track_running_stats for b in bns):
            raise ValueError("cannot fuse: only affine BatchNorms with running statistics and a momentum are fused")
        self.adopt_parameter("weight", [b.weight for b in bns])
        self.adopt_parameter("bias", [b.bias for b in bns])
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.adopt_buffer(name, [getattr(b, name) for b in bns])

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.num_batches_tracked.add_(1)  # every net saw one more batch
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                            self.momentum, self.eps)


class FusedLinear(FusedLayer):
    """K linear heads as one batched matmul: features (B, K*C) -> logits (K, B, classes)."""

    def __init__(self, fcs: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.k = len(fcs)
        self.in_features = same([f.in_features for f in fcs], "head inputs")
        self.out_features = same([f.out_features for f in fcs], "classes")
        self.adopt_parameter("weight", [f.weight for f in fcs])  # (K*classes, C)
        self.adopt_parameter("bias", [f.bias for f in fcs])  # (K*classes,)

    def forward(self, x: Tensor) -> Tensor:
        features = x.unflatten(1, (self.k, self.in_features)).transpose(0, 1)  # (K, B, C)
        weight = self.weight.view(self.k, self.out_features, self.in_features)
        return torch.baddbmm(self.bias.view(self.k, 1, self.out_features), features, weight.transpose(1, 2))


class FusedShortcut(nn.Module):
    """Option A for K nets (``models.ZeroPadShortcut``): subsample, zero-pad inside each net's
    channel block, then multiply by 1 for residual nets and 0 for plain ones. x * 1 and out + 0 are
    exact, so each net gets exactly its unfused block; one op for all K keeps one kernel per step."""

    def __init__(self, k: int, in_ch: int, out_ch: int, stride: int, residual: Sequence[bool],
                 device: torch.device) -> None:
        super().__init__()
        self.k, self.in_ch, self.extra, self.stride = k, in_ch, out_ch - in_ch, stride
        mask = torch.tensor(residual, dtype=torch.float32, device=device).repeat_interleave(out_ch)
        self.mask: Tensor | None
        self.register_buffer("mask", None if all(residual) else mask.view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra > 0:
            # Pad each net's channels (dim 2 of (B, K, C, H, W)), not the end of all K*C.
            x = F.pad(x.unflatten(1, (self.k, self.in_ch)), (0, 0, 0, 0, 0, self.extra)).flatten(1, 2)
        if self.mask is not None:
            x = x * self.mask.to(x.dtype)
        return x

    def extra_repr(self) -> str:
        return f"k={self.k}, stride={self.stride}, pad_channels={self.extra}, plain_nets_masked={self.mask is not None}"


class FusedBasicBlock(nn.Module):
    """``models.BasicBlock`` for K nets, read the same way: the shortcut is the one difference."""

    def __init__(self, blocks: Sequence[BasicBlock], device: torch.device) -> None:
        super().__init__()
        self.conv1 = GroupedConv2d([b.conv1 for b in blocks])
        self.bn1 = FusedBatchNorm2d([b.bn1 for b in blocks])
        self.conv2 = GroupedConv2d([b.conv2 for b in blocks])
        self.bn2 = FusedBatchNorm2d([b.bn2 for b in blocks])
        residual = [b.shortcut is not None for b in blocks]
        c = blocks[0].conv1
        self.shortcut = (FusedShortcut(len(blocks), c.in_channels, c.out_channels, c.stride[0], residual, device)
                         if any(residual) else None)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return F.relu(out)


def compact_state_dict(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, local_metadata: Any) -> None:
    """A fused net's state_dict holds copies of its own slices: ``torch.save`` writes a view's whole
    storage, so without this each checkpoint of a fused net would hold all K nets' weights.
    ``state_dict(keep_vars=True)`` (live tensors, e.g. to restore weights through) is left alone."""
    if any(isinstance(v, nn.Parameter) for v in state_dict.values()):
        return
    for key, v in state_dict.items():
        if key.startswith(prefix) and v.untyped_storage().nbytes() > v.numel() * v.element_size():
            state_dict[key] = v.clone()


class FusedResNet(nn.Module):
    """K ResNets of one ``fusion_key`` as one model; see the module docstring for how.

    Takes over the nets' parameters and buffers (each net's tensors become views of the fused
    ones). Fuse after the nets are on their device and in their memory format, and never move the
    FusedResNet (``.to()`` would copy the fused tensors away from the nets' views: refused).
    """

    def __init__(self, nets: Sequence[ResNet]) -> None:
        super().__init__()
        keys = [fusion_key(n) for n in nets]
        if not nets or keys[0] is None or any(k != keys[0] for k in keys):
            raise ValueError(f"cannot fuse: nets must share one fusion key and not be option B/C, got {keys}")
        first = next(nets[0].parameters())
        same([(p.device, p.dtype) for n in nets for p in n.parameters()], "devices or dtypes")
        self.K, self.nets = len(nets), list(nets)
        self.residual = tuple(n.spec.residual for n in nets)
        self.memory_format = layout_of(nets[0].stage1.block0.conv1.weight)  # a 16-in 3x3 kernel: unambiguous
        stem = OrderedDict(conv=GroupedConv2d([n.stem.conv for n in nets]),
                           bn=FusedBatchNorm2d([n.stem.bn for n in nets]), relu=nn.ReLU(inplace=True))
        if hasattr(nets[0].stem, "pool"):  # ImageNet-style stem: max-pool is per channel, so per net
            stem["pool"] = nets[0].stem.pool
        self.stem = nn.Sequential(stem)
        self.stage_names = list(nets[0].stage_names)
        for s in self.stage_names:
            blocks = [list(getattr(n, s)) for n in nets]
            self.add_module(s, nn.Sequential(OrderedDict(
                (f"block{j}", FusedBasicBlock([b[j] for b in blocks], first.device)) for j in range(len(blocks[0])))))
        self.fc = FusedLinear([n.fc for n in nets])
        for n in nets:
            if not getattr(n, "_fused_state_dict_hook", False):
                n.register_state_dict_post_hook(compact_state_dict)
                n._fused_state_dict_hook = True

    def forward(self, x: Tensor) -> Tensor:
        """x: (K, B, C, H, W), net k's batch at x[k], in any layout -> logits (K, B, classes), in fp32
        under bf16 autocast too (as ``ResNet.forward_head``: bf16 logits would miscount errors)."""
        if x.dim() != 5 or x.shape[0] != self.K:
            raise ValueError(f"FusedResNet of {self.K} nets takes (K={self.K}, B, C, H, W), got {tuple(x.shape)}")
        # (K, B, C, H, W) -> (B, K*C, H, W): net k's channels are block k, in the nets' layout.
        x = x.transpose(0, 1).flatten(1, 2).contiguous(memory_format=self.memory_format)
        x = self.stem(x)
        for s in self.stage_names:
            x = getattr(self, s)(x)
        with torch.autocast(x.device.type, enabled=False):
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x.to(self.fc.weight.dtype), 1), 1))

    def fused_layers(self) -> Iterator[FusedLayer]:
        return (m for m in self.modules() if isinstance(m, FusedLayer))

    def share_grads(self) -> None:
        """After backward: each net's ``p.grad`` is its part of the fused gradient (a view), so per-net
        probes and per-net SGD see exactly that net's gradient; the fused grads are cleared. (Each
        net's ``num_batches_tracked`` is counted in ``forward`` already, as in ``nn.BatchNorm2d``.)"""
        for layer in self.fused_layers():
            layer.share_grads()

    def _apply(self, fn: Callable, recurse: bool = True) -> "FusedResNet":  # noqa: ARG002
        raise RuntimeError("a FusedResNet is never moved or cast (its nets' tensors are views of its own): "
                           "move the nets with .to() before fusing them")
