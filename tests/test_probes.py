"""Each test is a claim about resnet_lab.probes that a reader can check by hand."""

from __future__ import annotations

import copy
import gzip
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnet_lab.models import build_model
from resnet_lab.probes import (HEAD_INPUT, SUMMARY_PREFIX, GradNormProbe, Probes, gradient_flow, layer_responses,
                               metric_name, response_layers, weight_layers)

CPU = torch.device("cpu")
FASHION = Path("/usr/share/datasets/fashion-mnist")


def batch(n: int = 8, c: int = 1, hw: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, hw, hw, generator=g), torch.randint(0, 10, (n,), generator=g)


def net(name: str = "resnet-8", **kw) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, in_channels=1, **kw)


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()


def test_metric_name_groups_by_stage() -> None:
    assert metric_name("grad_norm", "stage1.block0.conv1") == "grad_norm/stage1/block0.conv1"
    assert metric_name("grad_norm", "stage2.block0.shortcut.conv") == "grad_norm/stage2/block0.shortcut.conv"
    assert metric_name("grad_norm", "fc") == "grad_norm/fc"
    assert metric_name("response_std", "stem.conv") == "response_std/stem/conv"
    assert metric_name("grad_flow", HEAD_INPUT) == "grad_flow/head/input"


def test_weight_layers_in_forward_order_with_projection_shortcut() -> None:
    names = [n for n, _ in weight_layers(net("resnet-20", shortcut="B"))]
    assert names[:3] == ["stem.conv", "stage1.block0.conv1", "stage1.block0.conv2"]
    i = names.index("stage2.block0.conv1")
    assert names[i:i + 3] == ["stage2.block0.conv1", "stage2.block0.conv2", "stage2.block0.shortcut.conv"]
    assert names[-1] == "fc" and len(names) == 1 + 18 + 2 + 1


def test_grad_norms_equal_naive_per_parameter_norms() -> None:
    model, (x, y) = net("resnet-20", shortcut="B"), batch()
    train_step(model, x, y)
    probe = GradNormProbe(model, device=CPU)
    probe.record(0)
    row = probe.rows()[0]
    weights = [m.weight.grad.norm().item() for _, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    bns = [math.hypot(m.weight.grad.norm().item(), m.bias.grad.norm().item())
           for _, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    nw = len(weights)
    assert row[:nw].tolist() == pytest.approx(weights, rel=1e-5)
    assert row[nw] == pytest.approx(math.sqrt(sum(w * w for w in weights)), rel=1e-5)
    assert row[nw + 1:-1].tolist() == pytest.approx(bns, rel=1e-5)
    assert row[-1] == pytest.approx(math.sqrt(sum(b * b for b in bns)), rel=1e-5)


def test_missing_grad_counts_as_zero() -> None:
    model, (x, y) = net(), batch()
    train_step(model, x, y)
    model.fc.weight.grad = None
    probe = GradNormProbe(model, device=CPU)
    probe.record(0)
    assert probe.rows()[0][len(probe.weight_names) - 1] == 0.0  # fc is the last weight column


@pytest.mark.parametrize("drain_every", [10, None])  # drained like the training loop, or never (buffer fills twice)
def test_every_requested_iteration_is_kept(drain_every: int | None) -> None:
    model = net()
    probes = Probes(model, device=CPU, grad_every=2, log_every=10, layer_metrics=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    expected: dict[int, list[float]] = {}
    for it in range(25):
        train_step(model, *batch(seed=it))
        probes.on_backward(it)
        if it % 2 == 0:
            expected[it] = [p.grad.norm().item() for _, p in weight_layers(model)]
        opt.step()
        if drain_every and it % drain_every == drain_every - 1:
            drained = [p for p in probes.drain() if not p[0].startswith(SUMMARY_PREFIX)]  # the per-layer keys
            assert {step for _, _, step in drained} == {it - 1}  # only the latest measured step
            n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
            assert len(drained) == len(weight_layers(model)) + 1 + n_bn + 1  # layers and totals
    g = probes.tables()["grad_norms"]
    assert sorted(g["iteration"].unique()) == list(range(0, 25, 2))
    w = g[g["group"] == "weight"]
    for it, norms in expected.items():
        got = w[w["iteration"] == it].sort_values("layer_index")["value"].tolist()
        assert got == pytest.approx(norms, rel=1e-5)
    assert {n for n, _, s in probes.drain() if s == 24} >= {"grad_norm/total", "grad_norm_bn/total", "grad_norm/fc"}
    assert probes.drain() == []  # nothing new since the last drain


def test_on_backward_never_reads_device_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU a sync is invisible, so forbid every tensor->host read while on_backward runs."""
    model, (x, y) = net(), batch()
    probes = Probes(model, device=CPU, grad_every=1, log_every=2)
    train_step(model, x, y)

    def forbidden(*_a, **_k):
        raise AssertionError("host read of a tensor inside on_backward")

    with monkeypatch.context() as mp:
        for attr in ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__"):
            mp.setattr(torch.Tensor, attr, forbidden)
        for it in range(7):  # 7 > capacity 3: also covers setting a full buffer aside
            probes.on_backward(it)
    assert len(probes.tables()["grad_norms"]["iteration"].unique()) == 7


class Scale(nn.Module):
    """y = a * x (plain) or y = x + a * x (residual); dy/dx is the constant a or 1 + a."""

    def __init__(self, a: float, residual: bool) -> None:
        super().__init__()
        self.a, self.residual = a, residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.a * x if self.residual else self.a * x


class Chain(nn.Module):
    """Blocks then logits = features; named_blocks() like ResNet; a dummy parameter for the device."""

    def __init__(self, scales: list[float], residual: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Scale(a, residual) for a in scales)
        self.dummy = nn.Parameter(torch.zeros(()))

    def named_blocks(self) -> list[tuple[str, nn.Module]]:
        return [(f"stage1.block{i}", b) for i, b in enumerate(self.blocks)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x + self.dummy


@pytest.mark.parametrize("residual", [False, True])
def test_gradient_flow_closed_form_on_a_scaling_chain(residual: bool) -> None:
    """x = 0 makes every logit 0, so softmax = 1/C and dL/dlogits = (1/C - onehot(y)) / N,
    whose norm is sqrt((C-1) / (C N)). Going back through block j multiplies by its
    derivative: a_j (plain) or 1 + a_j (residual). So the flow at block i's input is
    sqrt((C-1)/(C N)) * prod_{j>=i} d_j, and at the head input just the first factor.
    With a_j = 0.5 the plain chain halves per block; the residual chain grows by 1.5."""
    n, c, scales = 4, 10, [0.5, 0.25, 2.0, 0.5]
    x, y = torch.zeros(n, c), torch.arange(n)
    flow = gradient_flow(Chain(scales, residual), x, y)
    head = math.sqrt((c - 1) / (c * n))
    d = [1 + a if residual else a for a in scales]
    expected = [head * math.prod(d[i:]) for i in range(len(d))] + [head]
    assert [name for name, _ in flow] == [f"stage1.block{i}" for i in range(4)] + [HEAD_INPUT]
    assert [v for _, v in flow] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", ["plain-8", "resnet-20"])
def test_gradient_flow_matches_retain_grad_and_leaves_model_untouched(name: str) -> None:
    model, (x, y) = net(name, shortcut="B" if name.startswith("resnet") else None), batch()
    train_step(model, *batch(seed=1))  # give parameters some grads to protect
    model.eval()  # the probe must use batch stats anyway, then restore eval
    model.stage1.block0.bn1.train()  # a mixed flag must survive too
    flags = [m.training for m in model.modules()]
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        before = model(x)  # updates bn1's running stats (it is in train mode), so snapshot after
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    flow = gradient_flow(model, x, y)

    assert no_hooks(model) and [m.training for m in model.modules()] == flags
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(model(x), before)

    naive = copy.deepcopy(model).train()
    inputs: list[torch.Tensor] = []

    def keep(t: torch.Tensor) -> None:  # a hook's non-None return would replace the args
        t.retain_grad()
        inputs.append(t)

    blocks = [b for _, b in naive.named_blocks()]
    for b in blocks:
        b.register_forward_pre_hook(lambda _m, a: keep(a[0]))
    blocks[-1].register_forward_hook(lambda _m, _a, out: keep(out))
    F.cross_entropy(naive(x), y).backward()
    assert [n for n, _ in flow] == [n for n, _ in model.named_blocks()] + [HEAD_INPUT]
    assert [v for _, v in flow] == pytest.approx([t.grad.norm().item() for t in inputs], rel=1e-5)


def test_layer_response_std_matches_a_manual_hook_over_batches() -> None:
    model = net("resnet-20")
    batches = [batch(seed=s) for s in range(3)]
    train_step(model, *batches[0])  # move running stats off (0, 1) so eval mode matters
    model.train()
    seen: list[torch.Tensor] = []
    handle = model.stage2.block1.bn2.register_forward_hook(lambda _m, _a, out: seen.append(out.detach().clone()))
    responses = dict(layer_responses(model, batches))
    handle.remove()
    assert model.training and no_hooks(model)
    expected = torch.cat([t.flatten() for t in seen]).double().std()  # torch.std: correction=1
    assert responses["stage2.block1.conv2"] == pytest.approx(expected.item(), rel=1e-9)
    assert list(responses) == [n for n, _ in response_layers(model)]
    assert list(responses)[:2] == ["stem.conv", "stage1.block0.conv1"] and len(responses) == 1 + 2 * 9


def test_imagenet_family_includes_7x7_stem_in_responses() -> None:
    model = net("resnet-18")
    names = [n for n, _ in layer_responses(model, [batch(n=2, hw=32)])]
    assert names[0] == "stem.conv" and names[-1] == "stage4.block1.conv2" and len(names) == 1 + 16


def test_probes_disabled_do_nothing(tmp_path: Path) -> None:
    model, (x, y) = net(), batch()
    probes = Probes(model, device=CPU, probe_batch=(x, y), response_batches=lambda: [(x, y)], enabled=False)
    train_step(model, x, y)
    probes.on_backward(0)
    probes.measure(0)
    assert probes.drain() == [] and probes.write_tables(tmp_path) == []
    assert all(df.empty for df in probes.tables().values())


def test_tables_round_trip_through_parquet(tmp_path: Path) -> None:
    model, (x, y) = net(), batch()
    probes = Probes(model, device=CPU, probe_batch=(x, y), response_batches=lambda: [(x, y)], layer_metrics=True)
    probes.measure(0)
    train_step(model, x, y)
    probes.on_backward(0)
    names = {n for n, _, step in probes.drain() if step == 0}
    assert {"grad_norm/stem/conv", "grad_norm/stage1/block0.conv1", "grad_norm/fc", "grad_norm/total",
            "grad_norm_bn/stem/bn", "grad_norm_bn/total", "grad_flow/stage1/block0", "grad_flow/head/input",
            "response_std/stem/conv", "response_std/stage3/block0.conv2"} <= names
    paths = probes.write_tables(tmp_path / "probes")
    assert [p.name for p in paths] == ["grad_norms.parquet", "grad_flow.parquet", "responses.parquet"]
    for path, (key, df) in zip(paths, probes.tables().items()):
        back = pd.read_parquet(path)
        assert list(back.columns) == list(df.columns) and len(back) == len(df) > 0
        assert back["value"].tolist() == df["value"].tolist()


def test_default_drain_logs_only_summaries_that_the_tables_reproduce() -> None:
    """By default MLflow gets a few summaries, each a closed form of the per-layer tables: the first
    main-path conv's norm, each stage's norm sqrt(sum of its layers' squared norms),
    the total; the flow ratio at the first block's input over the head's input; the mean response
    std of each stage's 3x3 convs."""
    model, (x, y) = net("resnet-14", shortcut="B"), batch()  # 2 blocks a stage, projection shortcuts
    probes = Probes(model, device=CPU, probe_batch=(x, y), response_batches=lambda: [(x, y)])
    probes.measure(0)
    train_step(model, x, y)
    probes.on_backward(0)
    got = {name: value for name, value, step in probes.drain()}
    assert all(name.startswith(SUMMARY_PREFIX + "/") for name in got) and len(got) == 5 + 1 + 3
    tables = probes.tables()
    w = tables["grad_norms"].query("group == 'weight'").set_index("layer")["value"]
    main = [n for n in w.index if n != "fc" and "shortcut" not in n]  # stem.conv, then the blocks' convs
    assert main[0] == "stem.conv" and main[-1] == "stage3.block1.conv2" and len(main) == 13
    assert got[f"{SUMMARY_PREFIX}/grad_norm/first_conv"] == pytest.approx(w[main[0]], rel=1e-6)
    for stage in ("stage1", "stage2", "stage3"):
        in_stage = w[w.index.str.startswith(stage + ".")]  # shortcut convs included
        assert got[f"{SUMMARY_PREFIX}/grad_norm/{stage}"] == pytest.approx(math.sqrt((in_stage ** 2).sum()), rel=1e-5)
    assert got[f"{SUMMARY_PREFIX}/grad_norm/total"] == pytest.approx(math.sqrt((w ** 2).sum()), rel=1e-5)
    flow = tables["grad_flow"].set_index("layer")["value"]
    assert got[f"{SUMMARY_PREFIX}/grad_flow/input_over_head"] == pytest.approx(
        flow["stage1.block0"] / flow[HEAD_INPUT], rel=1e-6)
    resp = tables["responses"].set_index("layer")["value"]
    for stage in ("stage1", "stage2", "stage3"):
        expected = resp[resp.index.str.startswith(stage + ".")].mean()
        assert got[f"{SUMMARY_PREFIX}/response_std/{stage}"] == pytest.approx(expected, rel=1e-6)


# --- 56 layers on real Fashion-MNIST --------------------------------------------------------


def read_idx_images(gz: Path, tmp: Path) -> torch.Tensor:
    from torchvision.datasets.mnist import read_image_file

    raw = tmp / gz.stem
    with gzip.open(gz, "rb") as src, open(raw, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return read_image_file(str(raw))


@pytest.fixture(scope="module")
def fashion_batch(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.Tensor, torch.Tensor]:
    """128 test images normalised with the train-set mean/std, with their labels."""
    if not (FASHION / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not found under {FASHION}")
    from torchvision.datasets.mnist import read_label_file

    tmp = tmp_path_factory.mktemp("fashion")
    train = read_idx_images(FASHION / "train-images-idx3-ubyte.gz", tmp).float() / 255
    test = read_idx_images(FASHION / "t10k-images-idx3-ubyte.gz", tmp)[:128].float() / 255
    with gzip.open(FASHION / "t10k-labels-idx1-ubyte.gz", "rb") as src, open(tmp / "labels", "wb") as dst:
        shutil.copyfileobj(src, dst)
    labels = read_label_file(str(tmp / "labels"))[:128]
    x = ((test - train.mean()) / train.std()).unsqueeze(1)
    return x, labels


@pytest.mark.parametrize("name", ["plain-56", "resnet-56"])
def test_56_layers_at_init_on_fashion_mnist(name: str, fashion_batch, record_property) -> None:
    x, y = fashion_batch
    model = net(name)
    probes = Probes(model, device=CPU, probe_batch=(x, y), response_batches=lambda: [(x[:64], y[:64]), (x[64:], y[64:])])
    probes.measure(0)
    train_step(model, x, y)
    probes.on_backward(0)
    tables = probes.tables()
    g = tables["grad_norms"]
    conv_linear = [n.removesuffix(".weight") for n, p in model.named_parameters()
                   if n.endswith(".weight") and p.dim() in (2, 4)]
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert g[g["group"] == "weight"]["layer"].tolist() == conv_linear and len(conv_linear) == 56
    assert g[g["group"] == "bn"]["layer"].tolist() == bns
    assert tables["grad_flow"]["layer"].tolist() == [n for n, _ in model.named_blocks()] + [HEAD_INPUT]
    assert tables["responses"]["layer"].tolist() == [n for n, _ in response_layers(model)]
    for df in tables.values():
        assert df["value"].map(math.isfinite).all() and (df["value"] >= 0).all()  # norms, stds
        assert not df.duplicated(["iteration", "layer"]).any()
    flow = dict(zip(tables["grad_flow"]["layer"], tables["grad_flow"]["value"]))
    ratio = flow["stage1.block0"] / flow[HEAD_INPUT]
    record_property("flow_ratio_stage1_block0_over_head_input", ratio)
    print(f"\n{name}: grad_flow stage1.block0={flow['stage1.block0']:.3g} head/input={flow[HEAD_INPUT]:.3g} ratio={ratio:.3g}")
