"""Claims about the models that a reader can check against He et al. 2016 and d2l.ai."""

from __future__ import annotations

import math

import pytest
import torch

from resnet_lab.cli import main
from resnet_lab.errors import UserError
from resnet_lab.models import BasicBlock, ZeroPadShortcut, build_model, count_parameters, parse_model_name

# He et al. 2016, Table 6 (CIFAR-10, option A): parameters of ResNet-20/32/44/56/110.
PAPER_PARAMS = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018, 110: 1_727_962}


@pytest.mark.parametrize("depth", sorted(PAPER_PARAMS))
def test_option_a_parameter_counts_match_the_paper_and_plain_nets_equal_them(depth: int) -> None:
    assert count_parameters(build_model(f"resnet-{depth}")) == PAPER_PARAMS[depth]
    assert count_parameters(build_model(f"plain-{depth}")) == PAPER_PARAMS[depth]


@pytest.mark.parametrize("depth", [20, 56])
def test_projection_shortcuts_add_parameters_c_more_than_b(depth: int) -> None:
    a, b, c = (count_parameters(build_model(f"resnet-{depth}", shortcut=o)) for o in "ABC")
    assert a < b < c
    # B projects only at the two stage transitions: 1x1 convs 16->32 and 32->64 plus their BN.
    assert b - a == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)


def test_option_a_shortcut_has_no_parameters_and_zero_pads() -> None:
    sc = ZeroPadShortcut(16, 32, stride=2)
    assert list(sc.parameters()) == []
    x = torch.randn(2, 16, 8, 8)
    y = sc(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, :16], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, 16:]) == 0


@pytest.mark.parametrize("name,shape,stage_shapes", [
    ("resnet-20", (3, 32, 32), [(16, 32, 32), (32, 16, 16), (64, 8, 8)]),
    ("plain-20", (3, 32, 32), [(16, 32, 32), (32, 16, 16), (64, 8, 8)]),
    ("resnet-32", (1, 28, 28), [(16, 28, 28), (32, 14, 14), (64, 7, 7)]),
    ("plain-44", (1, 28, 28), [(16, 28, 28), (32, 14, 14), (64, 7, 7)]),
])
def test_cifar_family_shapes(name: str, shape: tuple[int, int, int], stage_shapes: list[tuple[int, ...]]) -> None:
    model = build_model(name, in_channels=shape[0], num_classes=10).eval()
    x = model.stem(torch.randn(2, *shape))
    for stage, expected in zip(model.stages(), stage_shapes):
        x = stage(x)
        assert tuple(x.shape[1:]) == expected
    assert model(torch.randn(2, *shape)).shape == (2, 10)


@pytest.mark.parametrize("name", ["resnet-18", "plain-18", "resnet-34"])
def test_imagenet_family_d2l_stage_shapes_on_224x224x1(name: str) -> None:
    """d2l.ai 8.6: after the 7x7/2 stem and 3x3/2 pool, 64x56x56, then 128x28x28, 256x14x14, 512x7x7."""
    model = build_model(name, in_channels=1, num_classes=10).eval()
    with torch.no_grad():
        x = model.stem(torch.randn(1, 1, 224, 224))
        assert tuple(x.shape[1:]) == (64, 56, 56)
        shapes = []
        for stage in model.stages():
            x = stage(x)
            shapes.append(tuple(x.shape[1:]))
    assert shapes == [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)]


def test_d2l_resnet18_is_option_b_with_projection_on_first_block_of_stages_2_to_4() -> None:
    model = build_model("resnet-18", in_channels=1)
    projected = [n for n, b in model.named_blocks() if isinstance(b.shortcut, torch.nn.Sequential)]
    assert projected == ["stage2.block0", "stage3.block0", "stage4.block0"]


@pytest.mark.parametrize("depth,params", [(18, 11_689_512), (34, 21_797_672)])
def test_imagenet_family_matches_torchvision_parameter_counts(depth: int, params: int) -> None:
    """torchvision's resnet18/34 (3 input channels, 1000 classes, bias-free convs as in the paper)."""
    assert count_parameters(build_model(f"resnet-{depth}", in_channels=3, num_classes=1000)) == params


@pytest.mark.parametrize("name", ["resnet-21", "plain-22", "resnet-4", "resnet-19"])
def test_depth_not_6n_plus_2_is_rejected_naming_the_rule(name: str) -> None:
    with pytest.raises(UserError, match=r"6n\+2"):
        parse_model_name(name)


@pytest.mark.parametrize("name", ["resnet", "vgg-16", "resnet56", ""])
def test_unknown_model_names_are_rejected(name: str) -> None:
    with pytest.raises(UserError, match="unknown model"):
        parse_model_name(name)


def test_zero_initialised_residual_block_is_relu_of_its_input() -> None:
    block = BasicBlock(16, 16, stride=1, shortcut="A")
    block.zero_init_last()
    block.eval()
    x = torch.randn(4, 16, 8, 8)
    with torch.no_grad():
        assert torch.equal(block(x), torch.relu(x))
        assert torch.equal(block(x.abs()), x.abs())  # the identity on non-negative input


def test_zero_init_residual_applies_to_every_block_and_is_refused_for_plain_nets() -> None:
    model = build_model("resnet-20", zero_init_residual=True)
    assert all(torch.count_nonzero(b.bn2.weight) == 0 for b in model.blocks())
    with pytest.raises(UserError, match="residual"):
        build_model("plain-20", zero_init_residual=True)


def test_plain_and_residual_differ_only_in_the_shortcut_and_start_from_identical_weights() -> None:
    torch.manual_seed(0)
    plain = build_model("plain-20")
    torch.manual_seed(0)
    res = build_model("resnet-20")
    assert type(plain.blocks()[0]) is type(res.blocks()[0])
    assert all(b.shortcut is None for b in plain.blocks())
    assert all(b.shortcut is not None for b in res.blocks())
    ps, rs = plain.state_dict(), res.state_dict()
    assert ps.keys() == rs.keys()
    assert all(torch.equal(ps[k], rs[k]) for k in ps)


def test_he_init_std_is_sqrt_2_over_fan_in() -> None:
    torch.manual_seed(0)
    w = build_model("resnet-56").stage3.block0.conv2.weight  # 64 x 64 x 3 x 3
    assert w.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.02)


def test_layer_names_are_stable_and_readable() -> None:
    names = {n for n, _ in build_model("resnet-56", shortcut="B").named_modules()}
    for expected in ["stem.conv", "stem.bn", "stage1.block0.conv1", "stage3.block8.conv2",
                     "stage2.block0.shortcut.conv", "fc"]:
        assert expected in names


def test_describe_prints_the_layer_table_and_parameter_count(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["describe", "resnet-56", "--dataset", "cifar10"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "parameters: 853018"
    assert any(line.startswith("stage3.block8.conv2") and "64x8x8" in line for line in out)
    assert main(["describe", "plain-20"]) == 0  # train's dataset by default: Fashion-MNIST, one input channel
    out = capsys.readouterr().out.strip().splitlines()
    assert "on fashion-mnist 1x28x28" in out[0] and out[-1] == f"parameters: {269_722 - 2 * 16 * 9}"


def test_describe_rejects_bad_depth_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["describe", "resnet-21"]) == 2
    err = capsys.readouterr().err
    assert "6n+2" in err and err.count("\n") == 1
