"""Claims about resnet_lab.data: files parse exactly, sources are found in order, bad input is a
one-line UserError, and DeviceLoader batches are correct, reproducible and resumable."""

from __future__ import annotations

import gzip
import io
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torchvision.transforms import functional as TVF

from resnet_lab import data
from resnet_lab.data import DeviceLoader, Split, load_dataset
from resnet_lab.errors import UserError

NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=NO_CUDA)]


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own FASHION_MNIST_DIR / CIFAR10_DIR must not leak into the tests."""
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    monkeypatch.delenv("CIFAR10_DIR", raising=False)


# ---------------------------------------------------------------- file writers

def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """An idx file as the original release lays it out: magic, big-endian dims, uint8 data."""
    payload = bytes((0, 0, 8, array.ndim)) + np.array(array.shape, dtype=">u4").tobytes() + array.tobytes()
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def write_fashion(directory: Path, n_train: int = 300, n_test: int = 50, gz: bool = False) -> dict:
    """Small idx files whose pixels (0,0),(0,1) encode each image's index, so splits can be traced."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        images[:, 0, 0], images[:, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(directory / f"{prefix}-images-idx3-ubyte", images, gz)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels, gz)
        out[prefix] = (images, labels)
    return out


def index_of(images: torch.Tensor) -> torch.Tensor:
    return images[:, 0, 0, 0].long() + 256 * images[:, 0, 0, 1].long()


def write_cifar(directory: Path, per_batch: int = 4) -> dict[str, tuple[np.ndarray, list[int]]]:
    """A cifar-10-batches-py directory in the real pickle layout, with distinct random content."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    batches = {}
    for i, name in enumerate(data.CIFAR_FILES):
        pixels = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [(i + j) % 10 for j in range(per_batch)]
        with open(directory / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": pixels,
                         b"filenames": [b"x.png"] * per_batch}, f)
        batches[name] = (pixels, labels)
    # A pixel whose R, G, B differ, so a wrong plane order cannot pass: image 1, row 5, column 7.
    pixels, labels = batches["data_batch_1"]
    pixels[1, [5 * 32 + 7, 1024 + 5 * 32 + 7, 2048 + 5 * 32 + 7]] = (10, 200, 77)
    with open(directory / "data_batch_1", "wb") as f:
        pickle.dump({b"labels": labels, b"data": pixels}, f)
    with open(directory / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"airplane"] * 10, b"num_cases_per_batch": per_batch}, f)
    return batches


def random_split(n: int, shape: tuple[int, ...] = (3, 12, 12), seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8), torch.arange(n))


# ---------------------------------------------------------------- CIFAR-10

@pytest.mark.parametrize("nested", [False, True], ids=["batches-dir", "parent-dir"])
def test_cifar_pickles_round_trip_exactly(tmp_path: Path, nested: bool) -> None:
    """Train is data_batch_1..5 concatenated, test is test_batch, pixels land in [C,H,W] unchanged."""
    batches = write_cifar(tmp_path / data.CIFAR_DIRNAME)
    ds = load_dataset("cifar10", data_dir=tmp_path if nested else tmp_path / data.CIFAR_DIRNAME, download=False)
    assert (ds.in_channels, ds.image_size, ds.num_classes) == (3, 32, 10)
    assert ds.train.images.shape == (20, 3, 32, 32) and ds.test.images.shape == (4, 3, 32, 32)
    expected = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert torch.equal(ds.train.images, torch.from_numpy(expected))
    assert ds.train.labels.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert torch.equal(ds.test.images.flatten(1), torch.from_numpy(batches["test_batch"][0]))
    assert ds.train.images[1, :, 5, 7].tolist() == [10, 200, 77]  # R, G, B planes in order
    assert ds.train.labels.dtype == torch.int64 and ds.val is None


def test_cifar_env_var_is_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    batches = write_cifar(tmp_path / "elsewhere" / data.CIFAR_DIRNAME)
    monkeypatch.setenv("CIFAR10_DIR", str(tmp_path / "elsewhere"))
    ds = load_dataset("cifar10", data_root=tmp_path / "empty", download=False)
    assert torch.equal(ds.test.images.flatten(1), torch.from_numpy(batches["test_batch"][0]))
    assert "elsewhere" in ds.source


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong-shape"])
def test_cifar_corrupt_pickle_names_the_file(tmp_path: Path, damage: str) -> None:
    write_cifar(tmp_path)
    target = tmp_path / "data_batch_3"
    if damage == "garbage":
        target.write_bytes(b"not a pickle at all")
    elif damage == "truncated":
        target.write_bytes(target.read_bytes()[:100])
    else:
        target.write_bytes(pickle.dumps({b"data": np.zeros((4, 3000), np.uint8), b"labels": [0] * 4}))
    with pytest.raises(UserError, match="data_batch_3"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)


def test_cifar_explicit_dir_without_files_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"(?=.*nothing-here)(?=.*data_batch_1)"):
        load_dataset("cifar10", data_dir=tmp_path / "nothing-here", download=False)


# ---------------------------------------------------------------- CIFAR-100

def write_cifar100(directory: Path, n_train: int = 12, n_test: int = 5) -> dict[str, tuple[np.ndarray, list[int]]]:
    """A cifar-100-python directory as the official archive has it: ``train``/``test`` pickles with
    bytes keys, ``fine_labels`` (0..99) and ``coarse_labels`` (0..19), and ``meta`` with the names."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        pixels = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, n)]
        fine[0] = 99  # the top class is in range
        with open(directory / name, "wb") as f:
            pickle.dump({b"filenames": [b"x.png"] * n, b"batch_label": b"training batch 1 of 1",
                         b"fine_labels": fine, b"coarse_labels": [v // 5 for v in fine], b"data": pixels}, f)
        out[name] = (pixels, fine)
    with open(directory / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"class{i}".encode() for i in range(100)],
                     b"coarse_label_names": [f"super{i}".encode() for i in range(20)]}, f)
    return out


@pytest.mark.parametrize("nested", [False, True], ids=["archive-dir", "parent-dir"])
def test_cifar100_pickles_round_trip_with_fine_labels(tmp_path: Path, nested: bool) -> None:
    files = write_cifar100(tmp_path / data.CIFAR100_DIRNAME)
    ds = load_dataset("cifar100", data_dir=tmp_path if nested else tmp_path / data.CIFAR100_DIRNAME,
                      download=False)
    assert (ds.in_channels, ds.image_size, ds.num_classes) == (3, 32, 100)
    assert torch.equal(ds.train.images.flatten(1), torch.from_numpy(files["train"][0]))
    assert ds.train.labels.tolist() == files["train"][1] and ds.test.labels.tolist() == files["test"][1]
    assert torch.equal(ds.test.images.flatten(1), torch.from_numpy(files["test"][0]))


def test_cifar100_val_split_and_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CIFAR100_DIR is honoured; val_size carves the same seeded split as for CIFAR-10."""
    files = write_cifar100(tmp_path / "elsewhere" / data.CIFAR100_DIRNAME)
    monkeypatch.setenv("CIFAR100_DIR", str(tmp_path / "elsewhere"))
    ds = load_dataset("cifar100", data_root=tmp_path / "empty", download=False, val_size=4, seed=3)
    train_idx, val_idx = data.split_indices(12, val_size=4, seed=3, train_size=None)
    labels = torch.tensor(files["train"][1])
    assert len(ds.train) == 8 and len(ds.val) == 4 and "elsewhere" in ds.source
    assert torch.equal(ds.val.labels, labels[val_idx]) and torch.equal(ds.train.labels, labels[train_idx])


@pytest.mark.parametrize("target, damage", [("train", "garbage"), ("test", "truncated"), ("meta", "truncated"),
                                            ("train", "labels-100"), ("test", "cifar10-keys"), ("meta", "20-names")])
def test_cifar100_damaged_file_is_refused_by_name(tmp_path: Path, target: str, damage: str) -> None:
    write_cifar100(tmp_path)
    path = tmp_path / target
    if damage == "garbage":
        path.write_bytes(b"not a pickle at all")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "labels-100":
        path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [3, 100]}))
    elif damage == "cifar10-keys":  # a CIFAR-10 batch where a CIFAR-100 file should be: no fine_labels
        path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [3, 4]}))
    else:
        path.write_bytes(pickle.dumps({b"coarse_label_names": [b"x"] * 20, b"fine_label_names": [b"x"] * 20}))
    with pytest.raises(UserError) as e:
        load_dataset("cifar100", data_dir=tmp_path, download=False)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_cifar100_dir_without_its_files_says_which(tmp_path: Path) -> None:
    write_cifar(tmp_path / data.CIFAR_DIRNAME)  # CIFAR-10 is not CIFAR-100
    with pytest.raises(UserError, match=r"(?=.*--data-dir)(?=.*train, test, meta)"):
        load_dataset("cifar100", data_dir=tmp_path, download=False)
    with pytest.raises(UserError, match=r"CIFAR-100 not found: .*CIFAR100_DIR"):
        load_dataset("cifar100", data_root=tmp_path, download=False)


# ---------------------------------------------------------------- Fashion-MNIST

@pytest.fixture(scope="module")
def fashion(fashion_mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> data.Dataset:
    """The real Fashion-MNIST, found by the default source order in the Debian slot (no --data-dir,
    no env var, empty data_root). conftest's fixture skips, or fails in CI, when it is absent."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("FASHION_MNIST_DIR", raising=False)
        mp.setattr(data, "DEBIAN_FASHION_MNIST_DIR", fashion_mnist_dir)
        return load_dataset("fashion-mnist", data_root=tmp_path_factory.mktemp("empty"), download=False)


def test_fashion_from_debian_has_known_shape_and_stats(fashion: data.Dataset, fashion_mnist_dir: Path) -> None:
    """60k/10k 1x28x28 images; mean 0.2860 and std 0.3530 are the published Fashion-MNIST stats."""
    assert (len(fashion.train), len(fashion.test)) == (60000, 10000)
    assert fashion.train.images.shape[1:] == (1, 28, 28) and fashion.train.images.dtype == torch.uint8
    assert fashion.train.labels.unique().tolist() == list(range(10))
    assert fashion.train.labels.bincount().tolist() == [6000] * 10
    assert fashion.mean[0] == pytest.approx(0.2860, abs=5e-4) and fashion.std[0] == pytest.approx(0.3530, abs=5e-4)
    assert fashion.source == str(fashion_mnist_dir.resolve())


@pytest.mark.parametrize("how", ["raw-data-dir", "gz-data-dir", "env-var", "torchvision-cache"])
def test_fashion_idx_files_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """Raw and gzipped idx files parse to the exact arrays written, from every kind of source."""
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    where = tmp_path / "data" / "FashionMNIST" / "raw" if how == "torchvision-cache" else tmp_path / "fm"
    written = write_fashion(where, gz=how == "gz-data-dir")
    kwargs: dict = {"data_root": tmp_path / "data", "download": False}
    if how == "env-var":
        monkeypatch.setenv("FASHION_MNIST_DIR", str(where))
    elif how != "torchvision-cache":
        kwargs["data_dir"] = where
    ds = load_dataset("fashion-mnist", **kwargs)
    assert torch.equal(ds.train.images[:, 0], torch.from_numpy(written["train"][0]))
    assert torch.equal(ds.test.labels, torch.from_numpy(written["t10k"][1]).long())
    assert (ds.in_channels, ds.image_size) == (1, 28) and ds.source == str(where.resolve())


@pytest.mark.parametrize("damage", ["truncated-raw", "truncated-gz", "bad-magic", "extra-bytes"])
def test_fashion_corrupt_idx_names_the_file(tmp_path: Path, damage: str) -> None:
    write_fashion(tmp_path, gz=damage == "truncated-gz")
    target = next(tmp_path.glob("t10k-images-idx3-ubyte*"))
    raw = target.read_bytes()
    if damage == "bad-magic":
        raw = b"\x00\x00\x08\x01" + raw[4:]
    target.write_bytes(raw[:-7] if damage.startswith("truncated") else raw + b"\x00" * (damage == "extra-bytes"))
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte") as err:
        load_dataset("fashion-mnist", data_dir=tmp_path, download=False)
    assert "\n" not in str(err.value)


def test_fashion_explicit_dir_without_files_is_an_error(tmp_path: Path) -> None:
    """An explicit --data-dir never falls through silently to Debian's copy."""
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"")  # one of four is not enough
    with pytest.raises(UserError, match=rf"(?=.*{re.escape(str(tmp_path))})(?=.*t10k-labels-idx1-ubyte)"):
        load_dataset("fashion-mnist", data_dir=tmp_path, download=False)


def test_fashion_no_source_gives_one_line_with_every_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    with pytest.raises(UserError) as err:
        load_dataset("fashion-mnist", data_root=tmp_path / "data", download=False)
    message = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in message and "FASHION_MNIST_DIR" in message
    assert "--data-dir" in message and "\n" not in message


def test_unknown_dataset_is_an_error() -> None:
    with pytest.raises(UserError, match="cifar10"):
        load_dataset("imagenet")


# ---------------------------------------------------------------- resize, splits, subsets

def test_resize_happens_once_at_load(tmp_path: Path) -> None:
    ds = load_dataset("synthetic", resize=96, val_size=100)
    for split in (ds.train, ds.val, ds.test):
        assert split.images.shape[1:] == (1, 96, 96) and split.images.dtype == torch.uint8
    assert ds.image_size == 96 and ds.mean == data.channel_stats(ds.train.images)[0]


def test_resize_real_fashion_to_96(fashion_mnist_dir: Path) -> None:
    ds = load_dataset("fashion-mnist", data_dir=fashion_mnist_dir, resize=96, train_size=500, download=False)
    assert ds.train.images.shape == (500, 1, 96, 96) and ds.test.images.shape == (10000, 1, 96, 96)
    assert ds.mean[0] == pytest.approx(0.286, abs=0.03)  # upsampling keeps the brightness


def test_validation_split_is_disjoint_and_seeded(tmp_path: Path) -> None:
    write_fashion(tmp_path, n_train=300)
    load = lambda seed: load_dataset("fashion-mnist", data_dir=tmp_path, val_size=50, seed=seed)  # noqa: E731
    a, b, c = load(0), load(0), load(1)
    assert (len(a.train), len(a.val)) == (250, 50)
    train_idx, val_idx = set(index_of(a.train.images).tolist()), set(index_of(a.val.images).tolist())
    assert not train_idx & val_idx and train_idx | val_idx == set(range(300))
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.labels, b.train.labels)
    assert set(index_of(c.val.images).tolist()) != val_idx
    assert len(a.test) == 50  # the test split is never touched


def test_validation_split_on_real_fashion_is_55k_5k(fashion: data.Dataset, fashion_mnist_dir: Path) -> None:
    ds = load_dataset("fashion-mnist", data_dir=fashion_mnist_dir, val_size=5000, download=False)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (55000, 5000, 10000)
    assert ds.mean != fashion.mean  # stats come from the carved train split, not all 60k


def test_train_size_takes_a_seeded_subset_of_the_post_val_train() -> None:
    full = load_dataset("synthetic", val_size=48)
    sub = load_dataset("synthetic", val_size=48, train_size=100)
    assert len(sub.train) == 100 and torch.equal(sub.val.images, full.val.images)
    rows = {bytes(x.numpy()) for x in full.train.images}
    assert all(bytes(x.numpy()) in rows for x in sub.train.images)
    assert torch.equal(sub.train.images, load_dataset("synthetic", val_size=48, train_size=100).train.images)
    assert sub.mean == data.channel_stats(sub.train.images)[0]


def test_test_size_takes_the_same_test_images_for_every_seed(fashion_mnist_dir: Path) -> None:
    """A quick run's test subset is one fixed draw: seeds 0 and 1 (whose training subsets differ) are
    evaluated on the same images, so plain vs residual and seed vs seed stay paired."""
    def load(**kwargs: int) -> data.Dataset:
        return load_dataset("fashion-mnist", data_dir=fashion_mnist_dir, download=False, **kwargs)
    full = load()
    a, b = (load(test_size=100, train_size=1000, seed=s) for s in (0, 1))
    assert len(a.test) == 100 and torch.equal(a.test.images, b.test.images) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.train.images, b.train.images)
    rows = {bytes(x.numpy()) for x in full.test.images}
    assert all(bytes(x.numpy()) in rows for x in a.test.images)
    assert not torch.equal(a.test.images, full.test.images[:100])  # a random draw, not the file's first images
    assert torch.equal(load(test_size=len(full.test)).test.labels.sort().values, full.test.labels.sort().values)


@pytest.mark.parametrize("kwargs", [{"val_size": 2048}, {"val_size": -1}, {"train_size": 5000}, {"train_size": 0},
                                    {"resize": 0}, {"test_size": 0}, {"test_size": 100_000}])
def test_impossible_sizes_are_errors(kwargs: dict) -> None:
    with pytest.raises(UserError):
        load_dataset("synthetic", **kwargs)


def test_check_sizes_counts_what_is_left_and_refuses_what_cannot_fit() -> None:
    """Split and batch sizes are checked by one function: examples left = full - val, or the subset."""
    assert data.check_sizes(2048) == 2048
    assert data.check_sizes(2048, val_size=48, batch_size=2000) == 2000
    assert data.check_sizes(2048, val_size=48, train_size=100, batch_size=100) == 100
    for kwargs, words in [({"val_size": 2048}, "leaves no training data"),
                          ({"val_size": 48, "train_size": 2001}, "exceeds the 2000"),
                          ({"train_size": 100, "batch_size": 101}, "larger than the 100")]:
        with pytest.raises(UserError, match=words):
            data.check_sizes(2048, **kwargs)


# ---------------------------------------------------------------- synthetic

def test_synthetic_is_deterministic_and_learnable() -> None:
    """Same seed, same bytes; a nearest-class-mean on raw pixels is far above 10 % chance."""
    a, b, c = load_dataset("synthetic", seed=3), load_dataset("synthetic", seed=3), load_dataset("synthetic", seed=4)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.train.images, c.train.images)
    assert (len(a.train), len(a.test), a.in_channels, a.image_size) == (2048, 512, 1, 28)
    assert a.train.labels.bincount().min() >= 200  # every class well represented
    x = a.train.images.float().flatten(1)
    centroids = torch.stack([x[a.train.labels == k].mean(0) for k in range(10)])
    predicted = torch.cdist(a.test.images.float().flatten(1), centroids).argmin(1)
    assert (predicted == a.test.labels).float().mean() > 0.6


# ---------------------------------------------------------------- DeviceLoader

def loader(split: Split, device: str = "cpu", **kwargs) -> DeviceLoader:
    c = split.images.shape[1]
    defaults = {"batch_size": 16, "device": device, "mean": (0.0,) * c, "std": (1.0,) * c, "train": True}
    return DeviceLoader(split, **{**defaults, **kwargs})


@pytest.mark.parametrize("device", DEVICES)
def test_augmentation_is_a_torchvision_crop_and_flip(device: str) -> None:
    """Every output equals one of the 162 RandomCrop(padding=4)+RandomHorizontalFlip results,
    and the draws cover all 9x9 offsets and both flips, flipping about half the time."""
    split = random_split(4, (3, 10, 10))
    candidates = torch.stack([torch.stack([
        TVF.hflip(crop) if flip else crop
        for oy in range(9) for ox in range(9) for flip in (False, True)
        for crop in [TVF.crop(TVF.pad(img, [4]), oy, ox, 10, 10)]]) for img in split.images])  # [4, 162, 3, 10, 10]
    assert all(len(torch.unique(c.flatten(1), dim=0)) == 162 for c in candidates)  # offsets are identifiable
    batches = [b for _, b in zip(range(150), loader(split, device, batch_size=4).batches())]
    x = torch.cat([b[0] for b in batches]).cpu().mul(255).round().to(torch.uint8)
    y = torch.cat([b[1] for b in batches]).cpu()
    match = (candidates[y] == x[:, None]).flatten(2).all(2)  # [600, 162]
    assert match.sum(1).eq(1).all(), "an output is not any torchvision crop/flip of its image"
    which = match.int().argmax(1)
    oy, ox, flip = which // 18, which // 2 % 9, which % 2
    assert set(oy.tolist()) == set(range(9)) and set(ox.tolist()) == set(range(9))
    assert len(set(zip(oy.tolist(), ox.tolist()))) >= 70  # of 81: rows and columns drawn independently
    assert 0.4 < flip.float().mean() < 0.6


@pytest.mark.parametrize("device", DEVICES)
def test_eval_loader_is_in_order_unaugmented_and_complete(device: str) -> None:
    split = random_split(50)
    ev = loader(split, device, train=False)
    sizes = [len(y) for _, y in ev]
    assert sizes == [16, 16, 16, 2] and len(ev) == 4
    x = torch.cat([b[0] for b in ev]).cpu()
    assert torch.equal(torch.cat([b[1] for b in ev]).cpu(), torch.arange(50))
    assert torch.equal(x.mul(255).round().to(torch.uint8), split.images)  # no crop, no flip
    assert torch.equal(x, torch.cat([b[0] for b in ev]).cpu())  # every pass identical


@pytest.mark.parametrize("device", DEVICES)
def test_train_epochs_are_fresh_permutations(device: str) -> None:
    """Each epoch sees 48 distinct of 50 examples (remainder dropped), in a new order each time."""
    tr = loader(random_split(50), device, augment=False)
    epochs = [torch.cat([y for _, y in tr]).cpu() for _ in range(4)]
    assert len(tr) == 3 and all(len(e) == 48 and len(e.unique()) == 48 for e in epochs)
    assert len({tuple(e.tolist()) for e in epochs}) == 4
    endless = loader(random_split(50), device, augment=False).batches()
    assert torch.equal(torch.cat([next(endless)[1] for _ in range(12)]).cpu(), torch.cat(epochs))


@pytest.mark.parametrize("device", DEVICES)
def test_outputs_are_contiguous_float32_on_the_device(device: str) -> None:
    x, y = next(loader(random_split(40), device).batches())
    assert x.dtype == torch.float32 and x.is_contiguous() and x.shape == (16, 3, 12, 12)
    assert y.dtype == torch.int64 and x.device.type == y.device.type == device


def test_normalised_train_split_has_zero_mean_unit_std(tmp_path: Path) -> None:
    write_cifar(tmp_path, per_batch=8)
    for ds in (load_dataset("synthetic"), load_dataset("cifar10", data_dir=tmp_path)):
        ev = DeviceLoader(ds.train, batch_size=100, device="cpu", mean=ds.mean, std=ds.std, train=False)
        x = torch.cat([b[0] for b in ev]).transpose(0, 1).flatten(1).double()
        assert x.shape[0] == ds.in_channels
        assert torch.allclose(x.mean(1), torch.zeros(ds.in_channels, dtype=torch.float64), atol=1e-4)
        assert torch.allclose(x.std(1, unbiased=False), torch.ones(ds.in_channels, dtype=torch.float64), atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [0, 2, 3, 4])
def test_resume_replays_the_same_batches(device: str, k: int) -> None:
    """After k batches, a fresh loader given the saved state yields the same next 7 (3 per epoch,
    so this crosses epoch boundaries, and k=3 saves exactly at an epoch's end)."""
    split = random_split(50)
    original = loader(split, device, seed=7)
    stream = original.batches()
    for _ in range(k):
        next(stream)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)  # as a checkpoint would carry it
    expected = [next(stream) for _ in range(7)]
    resumed = loader(split, device, seed=7)
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    got = [b for _, b in zip(range(7), resumed.batches())]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(expected, got))
    assert resumed.state_dict() == original.state_dict()


def test_resume_refuses_a_different_setup() -> None:
    state = loader(random_split(50), batch_size=16).state_dict()
    with pytest.raises(UserError, match="batch size"):
        loader(random_split(50), batch_size=8).load_state_dict(state)


def test_seed_changes_batches_and_global_rng_is_untouched() -> None:
    torch.manual_seed(123)
    a = next(loader(random_split(50), seed=0).batches())
    b = next(loader(random_split(50), seed=1).batches())
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after)  # the loaders drew nothing from the global RNG
    assert not torch.equal(a[1], b[1])


def test_batch_larger_than_train_split_is_an_error() -> None:
    """Checked once, where the data is loaded; a loader built anyway has no batches and says so."""
    with pytest.raises(UserError, match="batch size 4096 is larger than the 2048 training examples"):
        load_dataset("synthetic", batch_size=4096)
    with pytest.raises(UserError, match="no batches"):
        next(loader(random_split(10), batch_size=16).batches())


def test_download_is_the_last_resort_and_its_failure_is_one_line(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """No local copy: torchvision's downloader is called into data_root; its files are then read,
    and a network failure becomes the one-line 'not found' error carrying the reason."""
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    calls = []

    def fake_download(root: str, train: bool, download: bool) -> None:
        calls.append(root)
        write_fashion(Path(root) / "FashionMNIST" / "raw", gz=True)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", fake_download)
    ds = load_dataset("fashion-mnist", data_root=tmp_path / "data")
    assert calls == [str(tmp_path / "data")] and "download" in ds.source and len(ds.train) == 300

    def offline(root: str, train: bool, download: bool) -> None:
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried http://x/, got:\nno network\n")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(UserError, match="failed: RuntimeError: Error downloading .* no network") as err:
        load_dataset("fashion-mnist", data_root=tmp_path / "other")
    assert "\n" not in str(err.value)
