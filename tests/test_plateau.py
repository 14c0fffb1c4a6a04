"""The plateau criterion (resnet_lab.plateau) on hand-made loss curves, and its verdict logged by a run."""

from __future__ import annotations

import math

import numpy as np
import torch
from mlflow.tracking import MlflowClient

from resnet_lab import plateau
from resnet_lab.config import TrainConfig
from resnet_lab.data import Split, plateau_subset
from resnet_lab.train import train

STEPS = list(range(0, 1001, 50))  # an evaluation every 50 of 1,000 iterations: 5 points in the last 20 %


def _curve(fn) -> list[float]:
    return [fn(s) for s in STEPS]


def test_a_curve_that_levelled_off_has_reached_its_plateau() -> None:
    losses = _curve(lambda s: 0.25 + 2.0 * math.exp(-s / 100))  # 0.0007 nats left to fall after step 800
    v = plateau.verdict(STEPS, losses)
    assert v.reached and v.start_step == 800 and 0 <= v.relative_fall < 0.01


def test_a_curve_still_falling_has_not() -> None:
    losses = _curve(lambda s: 2.3 * math.exp(-s / 500))  # falls ~33 % over the last 200 iterations
    v = plateau.verdict(STEPS, losses)
    assert not v.reached and 0.2 < v.relative_fall < 0.4


def test_noise_around_a_flat_curve_is_flat_and_noise_on_a_falling_one_is_still_falling() -> None:
    """+-4 % noise: the end points of the flat curve differ by 8 %, which a two-point rule would call
    falling; the fitted line does not. The same noise on a curve that falls 20 % stays falling."""
    noise = np.array([0.04 if i % 2 == 0 else -0.04 for i in range(len(STEPS))])
    noise[-5:] = [0.04, 0.0, -0.04, 0.04, -0.04]  # the window's first point 4 % high, its last 4 % low
    flat = 0.3 * (1 + noise)
    assert (flat[-5] - flat[-1]) / flat[-5] > plateau.TOLERANCE  # end points alone would say "falling"
    assert plateau.verdict(STEPS, flat.tolist()).reached
    falling = np.array(_curve(lambda s: 0.5 * 0.8 ** (s / 200))) * (1 + noise)  # -20 % every 200 iterations
    assert not plateau.verdict(STEPS, falling.tolist()).reached


def test_a_loss_near_zero_that_shrinks_by_a_large_fraction_of_nothing_is_flat() -> None:
    losses = _curve(lambda s: 0.004 * math.exp(-s / 400))  # -40 % over the window, but 0.001 nats
    assert plateau.verdict(STEPS, losses).reached


def test_too_few_points_or_a_non_finite_loss_is_not_a_plateau() -> None:
    assert not plateau.verdict([1000], [0.3]).reached
    assert not plateau.verdict([], []).reached
    assert not plateau.verdict([0, 800, 1000], [2.3, 0.3, math.nan]).reached
    assert plateau.verdict([0, 1000], [2.3, 2.29]).reached  # two points: the end points decide


def test_the_plateau_subset_is_the_same_images_for_the_same_training_split() -> None:
    split = Split(torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1), torch.zeros(100, dtype=torch.int64))
    a, b = plateau_subset(split, 10), plateau_subset(split, 10)
    picked = a.images.flatten().tolist()
    assert a.images.equal(b.images) and len(a) == 10 and picked == sorted(picked) and picked != list(range(10))
    assert plateau_subset(split, 500) is split  # asked for more than there is: the whole split


def test_a_run_logs_its_plateau_curve_and_verdict(tracking_uri: str) -> None:
    """Every evaluation logs train_fixed/loss on the fixed training images, and the end logs
    final/plateau (at step 0, like final/train_error) as the verdict on that history."""
    cfg = TrainConfig(model="resnet-8", dataset="synthetic", iterations=40, batch_size=32, log_every=10,
                      eval_every=10, milestones=[20, 30], plateau_images=256, checkpoint_every=0, progress=False,
                      tracking_uri=tracking_uri, experiment="plateau", probes=False)
    result = train(cfg)
    client = MlflowClient(tracking_uri)
    history = client.get_metric_history(result.run_id, plateau.HISTORY_KEY)
    assert [m.step for m in history] == [10, 20, 30, 40]
    (final,) = client.get_metric_history(result.run_id, plateau.FINAL_KEY)
    expected = plateau.verdict([m.step for m in history], [m.value for m in history]).reached
    assert final.step == 0 and final.value == float(expected)
