"""Datasets as whole uint8 tensors, and a loader that batches and augments them on the device.

Images are held as one uint8 tensor per split, so a split moves to the GPU once and every
batch (shuffle, pad, crop, flip, normalise) is made there with no host round trip.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from resnet_lab.errors import UserError

DATASETS = ("fashion-mnist", "cifar10", "cifar100", "synthetic")
NUM_CLASSES = {"fashion-mnist": 10, "cifar10": 10, "cifar100": 100, "synthetic": 10}
# (channels, height, width) of each dataset's images as stored, before any resize
IMAGE_SHAPE = {"fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32), "synthetic": (1, 28, 28)}
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # `apt-get install dataset-fashion-mnist`
FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR_DIRNAME = "cifar-10-batches-py"
CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
CIFAR100_DIRNAME = "cifar-100-python"  # the official archive's folder, as torchvision unpacks it
CIFAR100_FILES = ("train", "test", "meta")
SYNTHETIC_SIZES = (2048, 512)  # train, test: big enough to learn, small enough to build in milliseconds


@dataclass
class Split:
    """One split as a single tensor pair, so it can move to the device in one copy."""

    images: torch.Tensor  # uint8 [N, C, H, W], CPU
    labels: torch.Tensor  # int64 [N]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 [N,C,H,W], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"labels must be int64 [{len(self.images)}], "
                             f"got {self.labels.dtype} {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    val: Split | None  # carved from train when val_size > 0
    num_classes: int
    in_channels: int
    image_size: int  # H == W
    mean: tuple[float, ...]  # per channel, of the final train split, in [0, 1] units
    std: tuple[float, ...]
    source: str  # where the files came from (a path, a download, or "synthetic")


# What each random stream is for: the second number given to derive_seed, so no two purposes share a stream.
# The values are fixed: changing one changes every dataset, split or batch drawn from it.
SYNTHETIC_STREAM, SPLIT_STREAM, SHUFFLE_STREAM, AUGMENT_STREAM = 1, 2, 3, 4
# The diagnostics' streams (resnet_lab.diagnostics): their fixed image subsets, the lesion's random
# k-block draws, and the curvature's power-iteration start and Hutchinson vectors.
DIAG_SUBSET_STREAM, LESION_DRAW_STREAM, CURVATURE_STREAM = 16, 17, 18
# The test subset of a quick run (``test_size``): drawn once for the dataset, not per seed, so every
# run and seed of a study is evaluated on the same images (the paired comparisons stay paired).
TEST_SUBSET_STREAM = 5
# The fixed training images a run's plateau is judged on (``plateau_subset``).
PLATEAU_SUBSET_STREAM = 6


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, so each (seed, purpose, epoch, batch) gets its own stream."""
    digest = hashlib.blake2b(struct.pack(f"<{len(parts)}q", *parts), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ---------------------------------------------------------------- file formats

def _read_idx(path: Path, ndim: int) -> torch.Tensor:
    """Parse one uint8 idx file (raw or .gz) and refuse anything truncated.

    Hand-written instead of torchvision's ``read_image_file``: that reads only uncompressed
    paths (Debian ships .gz) and is non-strict, so a truncated file passes or fails with a
    bare assert. Here every failure is a UserError that names the file.
    """
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}: {e}); re-download or reinstall it") from e
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:4] != bytes((0, 0, 0x08, ndim)):
        raise UserError(f"{path} is not a uint8 idx{ndim} file (bad magic number); re-download or reinstall it")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) != header + math.prod(dims):
        raise UserError(f"{path} is truncated or corrupt: its header says {dims} = {header + math.prod(dims)} "
                        f"bytes but it has {len(raw)}; re-download or reinstall it")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=header).view(*dims)


def _fashion_files(directory: Path) -> list[Path] | None:
    """The four idx files in `directory` (raw preferred, else .gz), or None if any is missing."""
    found = []
    for name in FASHION_FILES:
        hit = next((p for p in (directory / name, directory / f"{name}.gz") if p.is_file()), None)
        if hit is None:
            return None
        found.append(hit)
    return found


def _read_fashion(files: list[Path]) -> tuple[Split, Split]:
    splits = []
    for img_path, lab_path in (files[:2], files[2:]):
        images, labels = _read_idx(img_path, 3), _read_idx(lab_path, 1).long()
        if len(images) != len(labels):
            raise UserError(f"{img_path} has {len(images)} images but {lab_path} has {len(labels)} labels; "
                            "the files are from different sets, re-download them")
        if len(labels) and int(labels.max()) > 9:
            raise UserError(f"{lab_path} has labels above 9, so it is not Fashion-MNIST; re-download it")
        splits.append(Split(images.unsqueeze(1), labels))
    return splits[0], splits[1]


def _cifar_dir(directory: Path, dirname: str = CIFAR_DIRNAME, files: tuple[str, ...] = CIFAR_FILES) -> Path | None:
    """`directory` itself or its cifar-10-batches-py (cifar-100-python) child, whichever holds the files."""
    for d in (directory, directory / dirname):
        if all((d / name).is_file() for name in files):
            return d
    return None


def _cifar100_dir(directory: Path) -> Path | None:
    return _cifar_dir(directory, CIFAR100_DIRNAME, CIFAR100_FILES)


def _unpickle(path: Path, what: str) -> dict:
    try:
        with path.open("rb") as f:
            return pickle.load(f, encoding="bytes")  # keys are bytes in the original py2 pickles
    except Exception as e:  # unpickling garbage can raise almost any exception type
        raise UserError(f"{path} is not a readable {what} pickle ({type(e).__name__}); re-download it") from e


def _field(batch: object, key: str, path: Path, what: str) -> object:
    if not isinstance(batch, dict) or not ({key, key.encode()} & batch.keys()):
        raise UserError(f"{path} is not a readable {what} pickle (no {key!r}); re-download it")
    return batch[key.encode()] if key.encode() in batch else batch[key]


def _read_cifar_batch(path: Path, label_key: str = "labels", classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """One CIFAR python pickle → (uint8 [N,3,32,32], int64 [N]); CIFAR-100's labels are
    ``fine_labels`` (100 classes; ``coarse_labels`` are its 20 superclasses).

    Parsed here rather than with torchvision's CIFAR10/100, which md5-check every file against
    the official release and so reject any other valid copy (e.g. the tests' small files).
    """
    what = "CIFAR-10" if classes == 10 else "CIFAR-100"
    batch = _unpickle(path, what)
    try:
        data = np.asarray(_field(batch, "data", path, what))
        labels = np.asarray(_field(batch, label_key, path, what), dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise UserError(f"{path} is not a readable {what} pickle ({type(e).__name__}); re-download it") from e
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != data.shape[:1]:
        raise UserError(f"{path} has data {data.dtype} {data.shape} and {labels.shape} labels, expected "
                        "uint8 [N, 3072] and N labels; re-download it")
    if len(labels) and not 0 <= labels.min() <= labels.max() <= classes - 1:
        raise UserError(f"{path} has labels outside 0..{classes - 1}; re-download it")
    # Each row is 1024 R, then 1024 G, then 1024 B values, each plane row-major: exactly [3, 32, 32].
    return torch.from_numpy(data.copy()).view(-1, 3, 32, 32), torch.from_numpy(labels)


def _read_cifar(directory: Path) -> tuple[Split, Split]:
    train = [_read_cifar_batch(directory / name) for name in CIFAR_FILES[:5]]
    test = _read_cifar_batch(directory / CIFAR_FILES[5])
    return Split(torch.cat([x for x, _ in train]), torch.cat([y for _, y in train])), Split(*test)


def _read_cifar100(directory: Path) -> tuple[Split, Split]:
    """``train``, ``test`` (fine labels) and ``meta``, whose 100 ``fine_label_names`` say it is CIFAR-100."""
    meta = directory / "meta"
    names = _field(_unpickle(meta, "CIFAR-100 meta"), "fine_label_names", meta, "CIFAR-100 meta")
    if not isinstance(names, list) or len(names) != 100:
        raise UserError(f"{meta} does not name 100 fine classes, so this is not CIFAR-100; re-download it")
    train, test = (_read_cifar_batch(directory / name, "fine_labels", 100) for name in ("train", "test"))
    return Split(*train), Split(*test)


def _synthetic(seed: int) -> tuple[Split, Split]:
    """Ten texture classes: five plaid orientations x two stripe frequencies, plus noise.

    Textures are local, so a small CNN with global pooling learns them in ~100 steps and
    a ±4 pixel crop keeps the class; each plaid is mirror-symmetric, so flips keep it too.
    The phase is random per class (from `seed`) but fixed within it, so even a nearest-class-
    mean on raw pixels works. Contrast, noise and labels are drawn from `seed`.
    """
    g = torch.Generator().manual_seed(derive_seed(seed, SYNTHETIC_STREAM))
    theta = torch.arange(10) % 5 * (math.pi / 8)  # 0, 22.5, ..., 90 degrees
    freq = torch.where(torch.arange(10) < 5, 3.0, 6.0) * 2 * math.pi / 28  # 3 or 6 cycles per image
    phase = torch.rand(10, generator=g) * 2 * math.pi
    yy, xx = torch.meshgrid(torch.arange(28.0) - 13.5, torch.arange(28.0) - 13.5, indexing="ij")
    waves = [torch.cos(freq[:, None, None] * (sx * xx * theta.cos()[:, None, None] + yy * theta.sin()[:, None, None])
                       + phase[:, None, None]) for sx in (1, -1)]
    templates = ((waves[0] + waves[1]) / 4).unsqueeze(1)  # [10, 1, 28, 28] in [-0.5, 0.5]

    def sample(n: int) -> Split:
        labels = (torch.arange(n) % 10)[torch.randperm(n, generator=g)]
        contrast = 0.5 + 0.5 * torch.rand(n, 1, 1, 1, generator=g)
        # In 0..255 units, in place: this CPU-side build is a handful of passes (< 0.2 s).
        x = torch.normal(128.0, 0.2 * 255, (n, 1, 28, 28), generator=g)  # 127.5 + 0.5 so truncation rounds
        x.addcmul_(templates[labels], contrast.mul_(255)).clamp_(0, 255)
        return Split(x.to(torch.uint8), labels)

    return sample(SYNTHETIC_SIZES[0]), sample(SYNTHETIC_SIZES[1])


# ---------------------------------------------------------------- finding the files

def _short(e: BaseException) -> str:
    """One line, however many lines the exception (e.g. torchvision's per-mirror report) has."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:200]


@dataclass(frozen=True)
class _Source:
    """Where a file-backed dataset's original files are looked for, and how they are read."""

    title: str  # as people write it, for messages
    env: str  # the environment variable naming its directory
    find: Callable[[Path], object | None]  # a directory -> what ``read`` takes, or None
    read: Callable[[object], tuple[Split, Split]]
    expected: str  # the files a directory must hold, for messages
    torchvision: str  # the torchvision dataset class that downloads it
    cache: str  # where torchvision puts it, under data_root


_SOURCES = {
    "fashion-mnist": _Source("Fashion-MNIST", "FASHION_MNIST_DIR", _fashion_files, _read_fashion,
                             ", ".join(f"{n}[.gz]" for n in FASHION_FILES), "FashionMNIST", "FashionMNIST/raw"),
    "cifar10": _Source("CIFAR-10", "CIFAR10_DIR", _cifar_dir, _read_cifar,
                       f"{', '.join(CIFAR_FILES)} (in it or in its {CIFAR_DIRNAME}/)", "CIFAR10", ""),
    "cifar100": _Source("CIFAR-100", "CIFAR100_DIR", _cifar100_dir, _read_cifar100,
                        f"{', '.join(CIFAR100_FILES)} (in it or in its {CIFAR100_DIRNAME}/)", "CIFAR100", ""),
}


def _locate(name: str, data_dir: str | Path | None, data_root: Path, download: bool) -> tuple[Split, Split, str]:
    """Try the sources in order (explicit dir, torchvision cache, Debian, download); first hit wins."""
    src = _SOURCES[name]
    fashion = name == "fashion-mnist"
    explicit = data_dir if data_dir is not None else os.environ.get(src.env) or None
    if explicit is not None:
        hit = src.find(Path(explicit))
        if hit is None:
            origin = "--data-dir" if data_dir is not None else src.env
            raise UserError(f"{origin} {explicit} does not hold the {name} files: expected {src.expected}")
        return *src.read(hit), str(Path(explicit).resolve())

    cache = data_root / src.cache
    candidates = [cache] + ([DEBIAN_FASHION_MNIST_DIR] if fashion else [])
    for directory in candidates:
        hit = src.find(directory)
        if hit is not None:
            return *src.read(hit), str(directory.resolve())

    reason = "download disabled"
    if download:
        import torchvision  # here, not at the top: importing it costs seconds of every command's start

        try:
            getattr(torchvision.datasets, src.torchvision)(str(data_root), train=True, download=True)
            hit = src.find(cache)
            if hit is not None:
                return *src.read(hit), f"torchvision download into {cache}"
            reason = f"no files in {cache} after download"
        except UserError:
            raise
        except Exception as e:  # network, disk, or torchvision's own checksum failures
            reason = f"failed: {_short(e)}"
    if fashion:
        raise UserError(f"Fashion-MNIST not found: pass --data-dir DIR or set {src.env}, put torchvision's files "
                        f"under {cache}, run 'sudo apt-get install dataset-fashion-mnist', "
                        f"or allow the download ({reason})")
    dirname = CIFAR_DIRNAME if name == "cifar10" else CIFAR100_DIRNAME
    raise UserError(f"{src.title} not found: pass --data-dir DIR or set {src.env} (a {dirname} directory), "
                    f"put it under {data_root}, or allow the download ({reason})")


# ---------------------------------------------------------------- splitting and statistics

def check_sizes(full_train: int, *, val_size: int = 0, train_size: int | None = None,
                batch_size: int | None = None, full_test: int | None = None, test_size: int | None = None) -> int:
    """The training examples left of ``full_train`` after ``val_size`` and the ``train_size`` subset.

    The one rule for split and batch sizes, asked where a config meets its data: ``load_dataset``
    (a run's data) and a study's ``ensure_data`` (before any run exists); everything after trusts
    it. A UserError when a split would be empty or larger than what is there, or one batch would
    not fit.
    """
    if val_size < 0 or (train_size is not None and train_size <= 0):
        raise UserError(f"val_size must be >= 0 and train_size > 0 (got {val_size}, {train_size})")
    if val_size >= full_train:
        raise UserError(f"val_size {val_size} leaves no training data out of {full_train} examples; "
                        "use a smaller val_size (--set val_size=N)")
    left = full_train - val_size
    if train_size is not None and train_size > left:
        raise UserError(f"train_size {train_size} exceeds the {left} training examples left after taking "
                        f"{val_size} for validation; use a smaller train_size (--set train_size=N)")
    if test_size is not None and (test_size <= 0 or (full_test is not None and test_size > full_test)):
        raise UserError(f"test_size must be between 1 and the {full_test} test examples, got {test_size}; "
                        "use a smaller test_size (--set test_size=N), or none for the whole test set")
    examples = left if train_size is None else train_size
    if batch_size is not None and batch_size > examples:
        raise UserError(f"batch size {batch_size} is larger than the {examples} training examples; "
                        "use a smaller batch size (--set batch_size=N)")
    return examples


def split_indices(n: int, *, val_size: int, seed: int, train_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) indices into n examples: one seeded permutation, val first, sorted back to file order.
    The sizes have passed ``check_sizes``."""
    examples = n - val_size if train_size is None else train_size
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, SPLIT_STREAM)))
    val, train = perm[:val_size], perm[val_size:]
    return train[:examples].sort().values, val.sort().values


def test_subset(test: Split, test_size: int | None) -> Split:
    """The first ``test_size`` images of one fixed permutation of the test set (all of it for None):
    the same images whatever the run's seed, sorted back to file order. ``test_size`` has passed
    ``check_sizes``."""
    if test_size is None:
        return test
    perm = torch.randperm(len(test), generator=torch.Generator().manual_seed(derive_seed(0, TEST_SUBSET_STREAM)))
    idx = perm[:test_size].sort().values
    return Split(test.images[idx], test.labels[idx])


def plateau_subset(train: Split, size: int) -> Split:
    """``size`` images of the training split (all of it if smaller), picked by one fixed permutation of
    its positions, sorted back to file order: the same images for every net trained on that split
    (every net of a seed; every seed too when the split is the whole training set)."""
    if size >= len(train):
        return train
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(derive_seed(0, PLATEAU_SUBSET_STREAM)))
    idx = perm[:size].sort().values
    return Split(train.images[idx], train.labels[idx])


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean/std in [0,1] units from 256-bin histograms: no float copy of the data."""
    counts = torch.zeros(images.shape[1], 256, dtype=torch.float64)
    for chunk in images.split(4096):
        for c in range(images.shape[1]):
            counts[c] += torch.bincount(chunk[:, c].reshape(-1), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64) / 255
    mean = (counts * values).sum(1) / counts.sum(1)
    var = (counts * (values - mean[:, None]) ** 2).sum(1) / counts.sum(1)
    return tuple(mean.tolist()), tuple(var.sqrt().tolist())


def _resize(split: Split, size: int) -> Split:
    """Resize once at load time (bilinear, antialiased, uint8 in and out), in chunks to bound memory."""
    from torchvision.transforms.v2 import functional as TF  # here: importing torchvision costs seconds

    out = [TF.resize(chunk, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
           for chunk in split.images.split(4096)]
    return Split(torch.cat(out), split.labels)


def load_dataset(name: str, *, data_dir: str | Path | None = None, data_root: str | Path = "data",
                 val_size: int = 0, seed: int = 0, resize: int | None = None,
                 train_size: int | None = None, test_size: int | None = None, batch_size: int | None = None,
                 download: bool = True) -> Dataset:
    """Load a whole dataset as uint8 tensors, check the sizes asked for against it (one batch of
    ``batch_size`` must fit), carve val/subset by `seed` (the test subset, if any, is the same for
    every seed), resize, compute stats."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    if resize is not None and resize <= 0:
        raise UserError(f"resize must be a positive image size, got {resize}")
    if name == "synthetic":
        full, test = _synthetic(seed)
        source = "synthetic"
    else:
        full, test, source = _locate(name, data_dir, Path(data_root), download)
    check_sizes(len(full), val_size=val_size, train_size=train_size, batch_size=batch_size, full_test=len(test),
                test_size=test_size)
    train_idx, val_idx = split_indices(len(full), val_size=val_size, seed=seed, train_size=train_size)
    train = Split(full.images[train_idx], full.labels[train_idx])
    test = test_subset(test, test_size)
    val = Split(full.images[val_idx], full.labels[val_idx]) if val_size > 0 else None
    if resize is not None:
        train, test = _resize(train, resize), _resize(test, resize)
        val = _resize(val, resize) if val is not None else None
    _, channels, height, width = train.images.shape
    if height != width:
        raise UserError(f"{name} images are {height}x{width}; only square images are supported")
    mean, std = channel_stats(train.images)
    return Dataset(name=name, train=train, test=test, val=val, num_classes=NUM_CLASSES[name], in_channels=channels,
                   image_size=height, mean=mean, std=std, source=source)


# ---------------------------------------------------------------- the device loader

class DeviceLoader:
    """Batches from a Split that lives on the training device as uint8.

    Augmentation (zero-pad, random crop, random horizontal flip, as in He et al. 2016) is
    hand-written rather than torchvision transforms: those draw one random crop per call,
    while here each image in a batch gets its own offset and flip from ONE gather with
    per-image index arithmetic, on whatever device holds the data, with no host round trip.

    All randomness is re-derived from (seed, epoch, batch), never the global RNG: the
    epoch's permutation from (seed, epoch) and a batch's crops/flips from (seed, epoch,
    batch). So the state is just (epoch, batch) and a resumed run replays the same batches.
    Train loaders shuffle and drop the last partial batch; eval loaders go in order and keep it.
    Sizes are trusted (``check_sizes`` passed where the data was loaded); a train split smaller
    than one batch has no batches, which ``batches()`` says.
    """

    def __init__(self, split: Split, *, batch_size: int, device: torch.device | str,
                 mean: tuple[float, ...], std: tuple[float, ...], train: bool,
                 augment: bool = True, seed: int = 0, pad: int = 4) -> None:
        channels = split.images.shape[1]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean/std need {channels} values, got {len(mean)}/{len(std)}")
        self.device = torch.device(device)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device, torch.int64)
        self.batch_size, self.train, self.augment, self.seed, self.pad = batch_size, train, augment, seed, pad
        stats = torch.tensor([mean, std], dtype=torch.float32, device=self.device) * 255
        self._shift, self._scale = stats[0].view(1, -1, 1, 1), stats[1].view(1, -1, 1, 1)
        self._gen = torch.Generator(device=self.device)
        self._epoch, self._batch = 0, 0

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from (train), for logging."""
        return self._epoch + (self._batch >= len(self))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch. Eval: always a full pass in order. Train: the rest of the current epoch."""
        if not self.train:
            for b in range(len(self)):
                yield self._make(slice(b * self.batch_size, (b + 1) * self.batch_size), 0, b)  # views, no gather
            return
        if self._batch >= len(self):
            self._epoch, self._batch = self._epoch + 1, 0
        order = self._permutation(self._epoch)
        while self._batch < len(self):
            b = self._batch
            self._batch += 1  # advance first, so state_dict() taken now points at the next batch
            yield self._make(order[b * self.batch_size:(b + 1) * self.batch_size], self._epoch, b)

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless: epoch after epoch, for iteration-based training."""
        if len(self) == 0:
            raise UserError("the split is empty, so there are no batches to draw")
        while True:
            yield from self

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "batch": self._batch, "seed": self.seed,
                "num_examples": len(self.labels), "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        saved = (state["seed"], state["num_examples"], state["batch_size"])
        ours = (self.seed, len(self.labels), self.batch_size)
        if saved != ours:
            raise UserError(f"cannot resume: loader state was saved with (seed, examples, batch size) = {saved} "
                            f"but this loader has {ours}; resume with the same settings")
        self._epoch, self._batch = int(state["epoch"]), int(state["batch"])

    def _permutation(self, epoch: int) -> torch.Tensor:
        self._gen.manual_seed(derive_seed(self.seed, SHUFFLE_STREAM, epoch))
        return torch.randperm(len(self.labels), generator=self._gen, device=self.device)

    def _make(self, idx: torch.Tensor | slice, epoch: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[idx]
        if self.train and self.augment:
            x = self._crop_flip(x, derive_seed(self.seed, AUGMENT_STREAM, epoch, batch))
        x = x.float().sub_(self._shift).div_(self._scale)  # == (x/255 - mean) / std
        return x, self.labels[idx]

    def _crop_flip(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """Pad with zeros (black, in uint8), then one gather does every image's crop and flip."""
        n, c, h, w = x.shape
        p, dev = self.pad, self.device
        self._gen.manual_seed(seed)
        oy = torch.randint(0, 2 * p + 1, (n, 1), generator=self._gen, device=dev)
        ox = torch.randint(0, 2 * p + 1, (n, 1), generator=self._gen, device=dev)
        flip = torch.randint(0, 2, (n, 1), generator=self._gen, device=dev).bool()
        rows = oy + torch.arange(h, device=dev)  # [n, h] rows of the padded image
        cols = ox + torch.arange(w, device=dev)  # [n, w]
        cols = torch.where(flip, cols.flip(1), cols)  # a flipped crop reads its columns backwards
        padded = F.pad(x, (p, p, p, p))
        return padded[torch.arange(n, device=dev).view(n, 1, 1, 1), torch.arange(c, device=dev).view(1, c, 1, 1),
                      rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]
