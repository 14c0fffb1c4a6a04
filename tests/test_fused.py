"""Fused nets train exactly like separate ones (resnet_lab.fused): K = 4 nets, 2 seeds x plain/resnet-8,
fp32 on CPU, fused and unfused side by side, compared per net and step; and the comparison is shown to
catch a swapped seed, a BatchNorm statistic shared across nets and a missing (or extra) shortcut."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from resnet_lab.fused import FusedBatchNorm2d, FusedResNet, fusion_key
from resnet_lab.models import ResNet, build_model, count_parameters

CPU = torch.device("cpu")
SEEDS, ARCHS = (0, 1), ("plain", "resnet")
BATCH, SIZE, STEPS = 8, 12, 12  # 12x12 images: stages at 12, 6, 3 pixels; both option-A transitions run
CL = torch.channels_last  # the lab's layout (speed.choose_memory_format)

# Tolerance, relative (to the larger magnitude) with an absolute floor for values near zero. Fused and
# unfused fp32 differ only in the order of a few sums (the grouped conv's weight gradient, the batched
# head); the forward pass at init is bitwise equal. Measured here over these 12 steps: at most 1.2e-6
# relative in any loss or gradient norm and 1.8e-6 in the final state; every fault below moves some loss,
# gradient norm or final tensor by 0.7 relative or more (each fault test asserts it is caught). 1e-4 sits
# between, with ~100x margin on each side. Why 12 steps and not more: fp32 training is itself that
# sensitive. The unfused run, with its initial weights nudged by one ulp, departs from itself by 1e-4 to
# 1e-2 from step ~11-22 on (a ReLU input within rounding of zero flips; the norms of BN-parameter
# gradients, sums of strongly cancelling terms, then move ~1e-3, and SGD at lr 0.1 amplifies it), and the
# fused run departs at the same steps by the same amounts. Beyond that horizon no fp32 comparison, fused
# or not, can be tighter than 1e-2; within it, this one is 1e-4.
RTOL, ATOL = 1e-4, 1e-6


def make_nets(memory_format: torch.memory_format = CL, dtype: torch.dtype = torch.float32) -> list[ResNet]:
    """The unfused build: torch.manual_seed(seed) then build_model, for each seed x arch."""
    nets = []
    for seed in SEEDS:
        for arch in ARCHS:
            torch.manual_seed(seed)
            nets.append(build_model(f"{arch}-8", in_channels=3, num_classes=10).to(dtype=dtype, memory_format=memory_format))
    return nets


def batches(steps: int = STEPS, dtype: torch.dtype = torch.float32) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
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


History = dict[str, list[list[float]]]  # per net: per step [loss, grad norm of each parameter...]


def grad_norms(net: ResNet) -> list[float]:
    return [p.grad.norm().item() for p in net.parameters()]


def train_unfused(nets: list[ResNet], data: list, steps: int = STEPS) -> list[list[list[float]]]:
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


def train_fused(nets: list[ResNet], data: list, steps: int = STEPS, order: list[int] | None = None,
                tamper: Callable[[FusedResNet], None] | None = None) -> list[list[list[float]]]:
    """The loop of FUSION_API.md: stacked batches, summed loss, share_grads, each net's own SGD. The
    optimizers are built before fusing (they hold the nets' Parameter objects, which fusing keeps).
    ``order`` feeds net k the batches of net order[k] (a swapped seed); ``tamper`` breaks the model."""
    opts = [sgd(n) for n in nets]
    fused = FusedResNet(nets)
    if tamper is not None:
        tamper(fused)
    order = order or list(range(len(nets)))
    history: list[list[list[float]]] = [[] for _ in nets]
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


def mismatches(ref: list[list[list[float]]], got: list[list[list[float]]], ref_nets: list[ResNet],
               got_nets: list[ResNet]) -> list[str]:
    """Every (net, step, quantity) and final state entry outside RTOL/ATOL, as readable lines."""
    bad = []
    names = ["loss"] + [n for n, _ in ref_nets[0].named_parameters()]
    for k, (r, g) in enumerate(zip(ref, got)):
        a, b = torch.tensor(r, dtype=torch.float64), torch.tensor(g, dtype=torch.float64)
        off = (a - b).abs() > ATOL + RTOL * torch.maximum(a.abs(), b.abs())
        bad += [f"net {k} step {int(s)} {names[int(q)]}: {a[s, q]:.6g} vs {b[s, q]:.6g}" for s, q in off.nonzero()]
    for k, (rn, gn) in enumerate(zip(ref_nets, got_nets)):
        for key, rv in rn.state_dict().items():
            gv = gn.state_dict()[key]
            if rv.dtype == torch.long:  # num_batches_tracked: exact
                ok = torch.equal(rv, gv)
            else:
                ok = torch.allclose(gv, rv, rtol=RTOL, atol=ATOL)
            if not ok:
                bad.append(f"net {k} final {key}")
    return bad


@pytest.fixture(scope="module")
def unfused_run() -> tuple[list[ResNet], list, list]:
    """The reference: each net trained alone (computed once for all comparisons)."""
    nets, data = make_nets(), batches()
    return nets, data, train_unfused(nets, data)


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
            torch.testing.assert_close(out[k], net(x[k].contiguous(memory_format=memory_format)), rtol=RTOL, atol=ATOL)


def test_fused_nets_train_exactly_like_separate_ones(unfused_run: tuple) -> None:
    """Loss, every parameter's gradient norm at every step, and the final weights, BN running
    statistics and num_batches_tracked of each of the 4 nets: equal within RTOL/ATOL."""
    ref_nets, data, ref = unfused_run
    nets = make_nets()
    got = train_fused(nets, data)
    assert mismatches(ref, got, ref_nets, nets) == []
    assert all(int(n.stem.bn.num_batches_tracked) == STEPS for n in nets)
    # the plain and residual nets did train differently (so the comparison above is not of equal things)
    assert abs(ref[0][-1][0] - ref[1][-1][0]) > 1e-2


def share_bn_batch_statistics(fused: FusedResNet) -> None:
    """Fault: each BN normalises with the mean/variance of channel c pooled over all K nets."""
    def forward(self: FusedBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
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


@pytest.mark.parametrize("fault", list(FAULTS))
def test_the_tolerance_catches_each_fault(unfused_run: tuple, fault: str) -> None:
    ref_nets, data, ref = unfused_run
    nets = make_nets()
    bad = mismatches(ref, train_fused(nets, data, **FAULTS[fault]), ref_nets, nets)
    assert bad, f"{fault} went unnoticed"


def test_option_a_adds_no_parameters() -> None:
    nets = make_nets()
    total = sum(count_parameters(n) for n in nets)
    fused = FusedResNet(nets)
    assert count_parameters(fused) == total == 4 * count_parameters(build_model("resnet-8", in_channels=3))
    assert sum(count_parameters(n) for n in nets) == total  # the nets keep theirs (as views)


def test_a_fused_nets_state_dict_loads_into_a_fresh_net(unfused_run: tuple) -> None:
    """After fused steps, each net's state_dict is a whole, compact unfused checkpoint."""
    _, data, _ = unfused_run
    nets = make_nets()
    train_fused(nets, data, steps=5)
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
        torch.testing.assert_close(fused(x)[1], donors[1](x[1].contiguous(memory_format=CL)), rtol=RTOL, atol=ATOL)


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
    data = batches(1)
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
