"""Published numbers a study is checked against, keyed by study name.

Only what the sources print: He et al. 2016 give CIFAR-10 test errors for the ResNets in
Table 6 (the plain nets appear only as curves in Fig. 6); d2l.ai's ResNet-18 chapter prints
train and test accuracy for its Fashion-MNIST run (converted here to error, 100 x (1 - acc)).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Anchor:
    label: str  # column header in the report table
    source: str  # full citation for the report
    test_error: dict[str, float] = field(default_factory=dict)  # model tag -> error (%)
    train_error: dict[str, float] = field(default_factory=dict)
    footnote: str = ""


ANCHORS: dict[str, Anchor] = {
    "cifar10_paper": Anchor(
        label="He et al. Table 6",
        source="He, Zhang, Ren, Sun (2016), Deep Residual Learning for Image Recognition, Table 6: "
               "CIFAR-10 test error (%)",
        test_error={"resnet-20": 8.75, "resnet-32": 7.51, "resnet-44": 7.17, "resnet-56": 6.97, "resnet-110": 6.43},
        footnote="ResNet-110 is the paper's best of 5 runs (mean 6.61 ± 0.16); the plain nets have no Table 6 "
                 "numbers (the paper shows them only in Fig. 6).",
    ),
    "d2l_resnet18": Anchor(
        label="d2l.ai",
        source="Dive into Deep Learning (d2l.ai), ResNet chapter: ResNet-18 on Fashion-MNIST, train acc 0.997, "
               "test acc 0.893",
        train_error={"resnet-18": 0.3},
        test_error={"resnet-18": 10.7},
    ),
}


def anchor_for(study: str) -> Anchor | None:
    return ANCHORS.get(study)


@dataclass(frozen=True)
class Recipe:
    """He et al. 2016 Sec. 4.2's CIFAR-10 recipe: what a reduced scale is measured against."""

    dataset: str = "cifar10"
    image: str = "3×32×32"
    train_images: int = 45000  # 50k less the 5k validation split
    val_images: int = 5000
    test_images: int = 10000
    iterations: int = 64000
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    milestones: tuple[int, ...] = (32000, 48000)
    lr_decay: float = 0.1
    augment: str = "pad-4 random crop and horizontal flip"
    shortcut: str = "A"
    depths: tuple[int, ...] = (20, 32, 44, 56, 110)
    source: str = "He et al. 2016 Sec. 4.2"


PAPER = Recipe()
# training images and image shape of each dataset the lab trains on (its own files' sizes)
DATASETS = {"cifar10": ("CIFAR-10", 50000, "3×32×32"), "fashion-mnist": ("Fashion-MNIST", 60000, "1×28×28"),
            "synthetic": ("synthetic data", None, "generated")}
