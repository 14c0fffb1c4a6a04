"""The sizes of each diagnostic: full-scale defaults and a CPU preset.

Each rule on a size is checked once, here, so a bad study file fails with one line before
any run is touched. The CPU preset (``CPU``) is sized so that the four diagnostics on one
seed each of plain/resnet-20 and plain/resnet-56 on Fashion-MNIST take about four minutes
on 2 cores (see benchmarks/diagnostics_cost.py); ``FULL`` follows the papers' sizes where
they give them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields

from ..errors import UserError

SWEEP_DEPTHS = (8, 14, 20, 32, 44, 56, 110)
NAMES = ("lesion", "landscape", "curvature", "shattering")  # the four, in the order they run


def _positive(owner: object, *names: str) -> None:
    """One UserError naming the first size that is not a positive integer."""
    for name in names:
        value = getattr(owner, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"diagnostics: {type(owner).__name__}.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class LesionSettings:
    """Veit et al.: test images (a fixed seeded subset), R draws per k for k-block deletion."""

    test_images: int = 10_000
    draws: int = 10
    batch_size: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        _positive(self, "test_images", "draws", "batch_size")


@dataclass(frozen=True)
class LandscapeSettings:
    """Li et al.: training images, 1D points, n x n grid, points on the init-to-final path."""

    train_images: int = 2_000
    line_points: int = 41
    grid: int = 21
    path_points: int = 31
    batch_size: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        _positive(self, "train_images", "batch_size")
        for name in ("line_points", "grid", "path_points"):
            if getattr(self, name) < 2:
                raise UserError(f"diagnostics: LandscapeSettings.{name} must be at least 2 (both ends), "
                                f"got {getattr(self, name)!r}")


@dataclass(frozen=True)
class CurvatureSettings:
    """PyHessian's method: N training images per subset, 3 disjoint subsets, stopping rule, Hutchinson vectors."""

    images: int = 1_000
    subsets: int = 3
    power_max_iterations: int = 100
    power_tolerance: float = 1e-3
    hutchinson_vectors: int = 100
    hutchinson_block: int = 8
    batch_size: int = 250
    seed: int = 0

    def __post_init__(self) -> None:
        _positive(self, "images", "subsets", "power_max_iterations", "hutchinson_vectors", "hutchinson_block",
                  "batch_size")
        if not 0 < self.power_tolerance < 1:
            raise UserError(f"diagnostics: CurvatureSettings.power_tolerance must be in (0, 1), got {self.power_tolerance!r}")


@dataclass(frozen=True)
class ShatteringSettings:
    """Balduzzi et al.: M points per line, image pairs, lags, BN batch, and the depth sweep at init."""

    points: int = 256
    pairs: int = 8
    max_lag: int = 16
    bn_images: int = 512
    sweep_depths: tuple[int, ...] = SWEEP_DEPTHS
    sweep_seeds: int = 3
    batch_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        _positive(self, "points", "pairs", "max_lag", "bn_images", "sweep_seeds", "batch_size")
        if self.max_lag >= self.points:
            raise UserError(f"diagnostics: ShatteringSettings.max_lag ({self.max_lag}) must be below points "
                            f"({self.points}) so every lag has a pair of points")
        bad = [d for d in self.sweep_depths if not (isinstance(d, int) and d >= 8 and (d - 2) % 6 == 0)]
        if bad or not self.sweep_depths:
            raise UserError(f"diagnostics: ShatteringSettings.sweep_depths must be CIFAR-family depths 6n+2 >= 8 "
                            f"(8, 14, 20, ...), got {list(self.sweep_depths)}")


@dataclass(frozen=True)
class DiagnosticsSettings:
    """All four together; ``FULL`` and ``CPU`` below are the two presets."""

    lesion: LesionSettings = field(default_factory=LesionSettings)
    landscape: LandscapeSettings = field(default_factory=LandscapeSettings)
    curvature: CurvatureSettings = field(default_factory=CurvatureSettings)
    shattering: ShatteringSettings = field(default_factory=ShatteringSettings)

    def as_dict(self) -> dict[str, dict[str, object]]:
        """``{"lesion": {"test_images": ...}, ...}``, e.g. for logging as MLflow params."""
        return {f.name: {g.name: getattr(getattr(self, f.name), g.name) for g in fields(getattr(self, f.name))}
                for f in fields(self)}

    def hash(self, name: str) -> str:
        """12 hex digits of diagnostic ``name``'s sizes: a logged diagnostic is redone when they change.
        ``"shattering_sweep"`` hashes the shattering settings the sweep uses."""
        sizes = self.as_dict()["shattering" if name == "shattering_sweep" else name]
        text = json.dumps({"name": name, **sizes}, sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class DiagnosticsPlan:
    """What ``resnet-lab diagnose`` runs for one scale of a study: which diagnostics, on which
    seeds (``None``: every seed), at which sizes. Built by ``studyfile`` from the file's tables."""

    names: tuple[str, ...] = NAMES
    seeds: tuple[int, ...] | None = None
    settings: DiagnosticsSettings = field(default_factory=DiagnosticsSettings)


FULL = DiagnosticsSettings()
# Resized after phase 1 measured the earlier preset (11x11 grid on 64 images, 256 lesion images
# with 2 draws, 12 power iterations) at ~7 min for the default study's four nets (1 thread,
# loaded machine), the landscape ~45 % of it: a 9x9 grid on 48 images, 200 lesion images with
# one draw per k, 10 power iterations. Measured in docs/benchmarks.md ("Diagnostics").
CPU = DiagnosticsSettings(
    lesion=LesionSettings(test_images=200, draws=1, batch_size=200),
    landscape=LandscapeSettings(train_images=48, line_points=7, grid=9, path_points=7, batch_size=48),
    curvature=CurvatureSettings(images=16, power_max_iterations=10, hutchinson_vectors=4, hutchinson_block=4,
                                batch_size=16),
    shattering=ShatteringSettings(points=64, pairs=4, max_lag=8, bn_images=128, sweep_depths=(8, 14, 20, 32, 44, 56),
                                  sweep_seeds=1, batch_size=128),
)
