"""Shared fixtures: one MLflow store per session (creating a SQLite schema costs seconds) and
the real Fashion-MNIST files, which CI installs (there the tests fail instead of skipping)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    """The directory of real Fashion-MNIST idx files; skip (or fail in CI) when absent."""
    explicit = os.environ.get("FASHION_MNIST_DIR")
    for d in ([Path(explicit)] if explicit else []) + [DEBIAN_FASHION_MNIST]:
        if any(d.glob("train-images-idx3-ubyte*")):
            return d
    message = "real Fashion-MNIST not found: sudo apt-get install dataset-fashion-mnist"
    if os.environ.get("RESNET_LAB_REQUIRE_REAL_DATA"):
        pytest.fail(message)
    pytest.skip(message)
