"""Fused nets train exactly like separate ones (resnet_lab.fused): K = 4 nets, 2 seeds x plain/resnet-8
on CPU, fused and unfused side by side, compared per net and step, in float64 over 24 steps and in
float32 (the lab's precision) over 2; and each comparison is shown to catch a swapped seed, a
BatchNorm statistic shared across nets and a missing (or extra) shortcut."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

import pytest
import torch
import torch.nn.functional as F

from resnet_lab.fused import FusedBatchNorm2d, FusedResNet, fusion_key
from resnet_lab.models import ResNet, build_model, count_parameters

SEEDS, ARCHS = (0, 1), ("plain", "resnet")
BATCH, SIZE = 8, 8  # 8x8 images: stages at 8, 4, 2 pixels; both option-A transitions run
CL = torch.channels_last  # the lab's layout (speed.choose_memory_format)


@dataclass(frozen=True)
class Tolerance:
    """How far fused may be from unfused: relative (to the larger magnitude), plus an absolute floor."""

    steps: int
    loss: float
    grads: float
    state: float
    atol: float


# Why two precisions. The claim is about the wiring (per-net channel blocks, BN statistics, shortcut
# masks, heads, gradients, updates), and fp32 training cannot show it over a few dozen steps: an
# unfused fp32 run with its initial weights nudged by one ulp departs from itself by 2e-3 to 3e-1 in
# some gradient norm within 1-22 steps (measured here on 4 data draws): a ReLU input within rounding of
# zero flips, the norm of a BN parameter's gradient (a sum of strongly cancelling terms) jumps ~1e-3,
# and SGD at lr 0.1 amplifies it. The fused fp32 run departs at the same rate, from the same cause.
# * float64, 24 steps: fused and unfused agree to 1e-14 relative (measured, 30 steps); a ReLU tie at
#   1e-16 is ~1e9 times rarer. 1e-9 keeps 1e5 of margin and is 1e8 below the smallest fault effect.
# * float32, as the lab trains (oneDNN's grouped and channels_last kernels), 2 steps: losses agree to
#   ~1e-7 (1e-5 allowed), weights and BN statistics to ~1e-6 (1e-4 allowed); gradient norms to ~1e-6
#   unless a ReLU tie flips, which moves one by up to ~5e-3 (1e-2 allowed).
# Every fault below moves some loss, gradient norm or final tensor by 0.4 relative or more in both
# precisions (each fault test asserts it is caught).
FP64 = Tolerance(steps=24, loss=1e-9, grads=1e-9, state=1e-9, atol=1e-12)
FP32 = Tolerance(steps=2, loss=1e-5, grads=1e-2, state=1e-4, atol=1e-6)
PRECISIONS = {"fp64": (torch.float64, FP64), "fp32": (torch.float32, FP32)}


@contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread: the same kernels every run, and no OpenMP spinning on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_nets(memory_format: torch.memory_format = CL, dtype: torch.dtype = torch.float32) -> list[ResNet]:
    """The unfused build: torch.manual_seed(seed) then build_model, for each seed x arch."""
    nets = []
    for seed in SEEDS:
        for arch in ARCHS:
            torch.manual_seed(seed)
            nets.append(build_model(f"{arch}-8", in_channels=3, num_classes=10).to(dtype=dtype, memory_format=memory_format))
    return nets


def batches(steps: int, dtype: torch.dtype = torch.float32) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per net and step its own batch; plain and resnet of one seed see the same batches (as in a study)."""
    g = torch.Generator().manual_seed(99)
    templates = torch.randn(10, 3, SIZE, SIZE, generator=g)  # learnable: a class is its template + noise
    out = []
    for seed in SEEDS:
        g = torch.Generator().manual_seed(100 + seed)
        ys = [torch.randint(0, 10, (BATCH,), generator=g) for _ in range(steps)]
        mine = [((templates[y] + torch.randn(BATCH, 3, SIZE, SIZE, generator=g)).to(dtype), y) for y in ys]
        out += [mine for _ in ARCHS]
    return out


def sgd(net: ResNet) -> torch.optim.SGD:
    return torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)


History = list[list[list[float]]]  # per net, per step: [loss, grad norm of each parameter...]


def grad_norms(net: ResNet) -> list[float]:
    return [p.grad.norm().item() for p in net.parameters()]


def train_unfused(nets: list[ResNet], data: list, steps: int) -> History:
    history = []
    for net, mine in zip(nets, data):
        opt, rows = sgd(net), []
        net.train()
        for x, y in mine[:steps]:
            loss = F.cross_entropy(net(x.contiguous(memory_format=CL)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            rows.append([loss.item(), *grad_norms(net)])
            opt.step()
        history.append(rows)
    return history


def train_fused(nets: list[ResNet], data: list, steps: int, order: list[int] | None = None,
                tamper: Callable[[FusedResNet], None] | None = None) -> History:
    """The loop of FUSION_API.md: stacked batches, summed loss, share_grads, each net's own SGD. The
    optimizers are built before fusing (they hold the nets' Parameter objects, which fusing keeps).
    ``order`` feeds net k the batches of net order[k] (a swapped seed); ``tamper`` breaks the model."""
    opts = [sgd(n) for n in nets]
    fused = FusedResNet(nets)
    if tamper is not None:
        tamper(fused)
    order = order or list(range(len(nets)))
    history: History = [[] for _ in nets]
    fused.train()
    for i in range(steps):
        x = torch.stack([data[j][i][0] for j in order])
        ys = [data[j][i][1] for j in order]
        logits = fused(x)
        losses = [F.cross_entropy(logits[k], ys[k]) for k in range(len(nets))]
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        sum(losses).backward()
        fused.share_grads()
        for k, (net, opt) in enumerate(zip(nets, opts)):
            history[k].append([losses[k].item(), *grad_norms(net)])
            opt.step()
    return history


def mismatches(ref: History, got: History, ref_nets: list[ResNet],
               got_nets: list[ResNet], tol: Tolerance) -> list[str]:
    """Every (net, step, quantity) and final state entry outside ``tol``, as readable lines."""
    bad = []
    names = ["loss"] + [n for n, _ in ref_nets[0].named_parameters()]
    rtol = torch.tensor([tol.loss] + [tol.grads] * (len(names) - 1), dtype=torch.float64)
    for k, (r, g) in enumerate(zip(ref, got)):
        a, b = torch.tensor(r, dtype=torch.float64), torch.tensor(g, dtype=torch.float64)
        off = (a - b).abs() > tol.atol + rtol * torch.maximum(a.abs(), b.abs())
        bad += [f"net {k} step {int(s)} {names[int(q)]}: {a[s, q]:.9g} vs {b[s, q]:.9g}" for s, q in off.nonzero()]
    for k, (rn, gn) in enumerate(zip(ref_nets, got_nets)):
        for key, rv in rn.state_dict().items():
            gv = gn.state_dict()[key]
            exact = rv.dtype == torch.long  # num_batches_tracked
            if not (torch.equal(rv, gv) if exact else torch.allclose(gv, rv, rtol=tol.state, atol=tol.atol)):
                bad.append(f"net {k} final {key}")
    return bad


@cache
def reference(precision: str) -> tuple[list[ResNet], list, History]:
    """Each net trained alone in ``precision`` (computed once per precision for all comparisons)."""
    dtype, tol = PRECISIONS[precision]
    nets, data = make_nets(dtype=dtype), batches(tol.steps, dtype)
    with one_thread():
        return nets, data, train_unfused(nets, data, tol.steps)


def fused_mismatches(precision: str, **fault: object) -> list[str]:
    """Train the 4 nets fused in ``precision`` (with ``fault``, if any) and compare with the reference."""
    dtype, tol = PRECISIONS[precision]
    ref_nets, data, ref = reference(precision)
    nets = make_nets(dtype=dtype)
    with one_thread():
        got = train_fused(nets, data, tol.steps, **fault)
    return mismatches(ref, got, ref_nets, nets, tol)


@pytest.mark.parametrize("memory_format", [CL, torch.contiguous_format], ids=["channels_last", "contiguous"])
def test_fused_forward_gives_each_nets_logits(memory_format: torch.memory_format) -> None:
    nets = make_nets(memory_format)
    ref = copy.deepcopy(nets)
    fused = FusedResNet(nets)
    x = torch.randn(4, BATCH, 3, SIZE, SIZE)
    for mode in ("train", "eval"):
        fused.train(mode == "train")
        out = fused(x)
        assert out.shape == (4, BATCH, 10) and out.dtype == torch.float32
        for k, net in enumerate(ref):
            net.train(mode == "train")
            torch.testing.assert_close(out[k], net(x[k].contiguous(memory_format=memory_format)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_fused_nets_train_exactly_like_separate_ones(precision: str) -> None:
    """Loss and every parameter's gradient norm at every step, and the final weights, BN running
    statistics and num_batches_tracked of each of the 4 nets: equal within the precision's tolerance."""
    assert fused_mismatches(precision) == []
    nets, _, ref = reference(precision)
    assert all(int(n.stem.bn.num_batches_tracked) == PRECISIONS[precision][1].steps for n in nets)
    assert abs(ref[0][-1][0] - ref[1][-1][0]) > 1e-3  # plain and residual did train differently


def share_bn_batch_statistics(fused: FusedResNet) -> None:
    """Fault: each BN normalises with the mean/variance of channel c pooled over all K nets (its
    running statistics and counter are updated as usual, so only the normalisation is wrong)."""
    def forward(self: FusedBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            FusedBatchNorm2d.forward(self, x)
        k = fused.K
        x5 = x.unflatten(1, (k, x.shape[1] // k))
        mean = x5.mean(dim=(0, 1, 3, 4), keepdim=True)
        var = x5.var(dim=(0, 1, 3, 4), unbiased=False, keepdim=True)
        y = ((x5 - mean) / torch.sqrt(var + self.eps)).flatten(1, 2)
        return y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
    for m in fused.modules():
        if isinstance(m, FusedBatchNorm2d):
            m.forward = forward.__get__(m)


def share_bn_running_statistics(fused: FusedResNet) -> None:
    """Fault: the running mean is averaged over the K nets after each update (training itself is
    untouched: only the final state comparison can see it)."""
    def hook(m: FusedBatchNorm2d, _inp: tuple, _out: torch.Tensor) -> None:
        with torch.no_grad():
            rm = m.running_mean.data.view(fused.K, -1)  # .data: no version bump for autograd to trip on
            rm.copy_(rm.mean(0, keepdim=True).expand_as(rm))
    for m in fused.modules():
        if isinstance(m, FusedBatchNorm2d):
            m.register_forward_hook(hook)


def drop_a_shortcut(fused: FusedResNet) -> None:
    """Fault: the downsampling block of stage 2 loses its shortcut (the residual nets' one option-A pad)."""
    fused.stage2.block0.shortcut = None


def shortcut_for_plain_nets(fused: FusedResNet) -> None:
    """Fault: the per-net mask is lost, so plain nets get shortcuts too."""
    for m in fused.modules():
        if hasattr(m, "mask"):
            m.mask = None


FAULTS: dict[str, dict] = {
    "swapped seed": dict(order=[2, 3, 0, 1]),  # seed 0's nets get seed 1's batches and back
    "BN batch statistics shared": dict(tamper=share_bn_batch_statistics),
    "BN running statistics shared": dict(tamper=share_bn_running_statistics),
    "missing shortcut": dict(tamper=drop_a_shortcut),
    "shortcut in plain nets": dict(tamper=shortcut_for_plain_nets),
}


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("fault", list(FAULTS))
def test_the_tolerance_catches_each_fault(fault: str, precision: str) -> None:
    assert fused_mismatches(precision, **FAULTS[fault]), f"{fault} went unnoticed in {precision}"


def test_option_a_adds_no_parameters() -> None:
    nets = make_nets()
    total = sum(count_parameters(n) for n in nets)
    fused = FusedResNet(nets)
    assert count_parameters(fused) == total == 4 * count_parameters(build_model("resnet-8", in_channels=3))
    assert sum(count_parameters(n) for n in nets) == total  # the nets keep theirs (as views)


def test_a_fused_nets_state_dict_loads_into_a_fresh_net() -> None:
    """After fused steps, each net's state_dict is a whole, compact unfused checkpoint."""
    nets = make_nets()
    train_fused(nets, batches(5), steps=5)
    x = torch.randn(BATCH, 3, SIZE, SIZE).contiguous(memory_format=CL)
    for k, net in enumerate(nets):
        buf = io.BytesIO()
        torch.save(net.state_dict(), buf)
        alone = io.BytesIO()
        torch.save(build_model(net.spec.name, in_channels=3).state_dict(), alone)
        assert len(buf.getvalue()) < 1.1 * len(alone.getvalue())  # its own weights, not all K nets'
        buf.seek(0)
        fresh = build_model(net.spec.name, in_channels=3).to(memory_format=CL)
        fresh.load_state_dict(torch.load(buf))
        fresh.eval(), net.eval()
        with torch.no_grad():
            assert torch.equal(fresh(x), net(x))
        assert int(fresh.stage1.block0.bn1.num_batches_tracked) == 5


def test_loading_a_checkpoint_into_a_fused_net_writes_the_fused_storage() -> None:
    """Resume after fusing: load_state_dict copies in place, so the fused model trains from it."""
    nets, donors = make_nets(), make_nets()
    with torch.no_grad():
        for p in donors[1].parameters():
            p.mul_(0.5)
    fused = FusedResNet(nets)
    nets[1].load_state_dict(donors[1].state_dict())
    x = torch.randn(4, BATCH, 3, SIZE, SIZE)
    fused.eval(), donors[1].eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x)[1], donors[1](x[1].contiguous(memory_format=CL)), rtol=1e-5, atol=1e-6)


def test_fusion_key() -> None:
    torch.manual_seed(0)
    plain, res = build_model("plain-20"), build_model("resnet-20")
    assert fusion_key(plain) == fusion_key(res) is not None  # option A: same shapes, fused together
    assert fusion_key(build_model("resnet-20", shortcut="B")) is None  # projection shortcuts stay unfused
    assert fusion_key(build_model("resnet-20", shortcut="C")) is None
    assert fusion_key(build_model("resnet-18")) is None  # ImageNet-style default: option B
    assert fusion_key(build_model("resnet-32")) != fusion_key(res)
    assert fusion_key(build_model("resnet-20", in_channels=1)) != fusion_key(res)
    assert fusion_key(build_model("resnet-20", num_classes=100)) != fusion_key(res)
    with pytest.raises(ValueError, match="cannot fuse"):
        FusedResNet([build_model("resnet-20"), build_model("resnet-32")])
    with pytest.raises(ValueError, match="cannot fuse"):
        FusedResNet([build_model("resnet-20", shortcut="B")] * 2)


def test_a_fused_model_refuses_to_move() -> None:
    fused = FusedResNet(make_nets())
    with pytest.raises(RuntimeError, match="move the nets"):
        fused.to(torch.float64)


def test_bf16_autocast_fused_matches_unfused_loosely() -> None:
    """Under bf16 autocast (8-bit mantissa, ~4e-3 relative per rounding) fused and unfused may round
    differently in the convolutions; after 8 layers logits and gradient norms agree to 5e-2 relative
    (fp32's tolerance would be meaningless here). Logits stay fp32, as the unfused head's."""
    nets = make_nets()
    ref = copy.deepcopy(nets)
    fused = FusedResNet(nets)
    data = batches(1, torch.float32)
    x = torch.stack([d[0][0] for d in data])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused(x)
    assert out.dtype == torch.float32
    sum(F.cross_entropy(out[k], data[k][0][1]) for k in range(4)).backward()
    fused.share_grads()
    for k, net in enumerate(ref):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = net(x[k].contiguous(memory_format=CL))
        F.cross_entropy(logits, data[k][0][1]).backward()
        torch.testing.assert_close(out[k].detach(), logits.detach(), rtol=5e-2, atol=5e-2)
        torch.testing.assert_close(torch.tensor(grad_norms(nets[k])), torch.tensor(grad_norms(net)), rtol=5e-2, atol=1e-3)
