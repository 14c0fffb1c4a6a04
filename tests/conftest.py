"""Shared fixtures: one MLflow store per session (creating a SQLite schema costs seconds), the
real Fashion-MNIST files, which CI installs (there the tests fail instead of skipping), and the
CPU bf16 question answered by the suite, not by the host.

``precision=auto`` picks bf16 on CPUs with AMX or AVX512-BF16 and fp32 elsewhere, so a test of
an auto run could pass on one CPU and fail on another. The session pins the answer through
``RESNET_LAB_CPU_BF16`` (resnet_lab.speed; subprocesses inherit it): "0", an AVX2 CPU's answer,
unless the environment already sets it (``RESNET_LAB_CPU_BF16=1 make test`` runs the whole suite
as an AMX machine would, bf16 emulated where the CPU has no bf16 units). Tests whose verdict
involves the precision take the ``cpu_bf16`` fixture and run under both answers on every host.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CPU_BF16_ENV = "RESNET_LAB_CPU_BF16"  # resnet_lab.speed.CPU_BF16_ENV (not imported: torch takes seconds)


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault(CPU_BF16_ENV, "0")  # before any test or xdist worker starts


@pytest.fixture(params=[False, True], ids=["cpu-without-bf16", "cpu-with-bf16"])
def cpu_bf16(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """The test runs twice: as on a CPU without native bf16 (auto -> fp32) and with it (auto -> bf16)."""
    monkeypatch.setenv(CPU_BF16_ENV, "1" if request.param else "0")
    return request.param


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
