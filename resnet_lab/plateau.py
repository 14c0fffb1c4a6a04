"""Whether a net reached its plateau: the one criterion, for training (``final/plateau``) and the report.

He et al.'s degradation is a statement about trained nets: the deeper plain net has the higher
training error once training has stopped improving. A net has reached its plateau when its
training loss, measured on a fixed unaugmented subset of its training split (``train_fixed/loss``:
the same images at every evaluation, so the curve moves only with the weights), falls by less
than ``TOLERANCE`` (relative) over the last ``WINDOW`` of its iterations.

The fall is read off a least-squares line through the points of that window (and the last point
before it, so two evaluations are enough), not from its two end points: a flat but noisy curve
is flat, and one lucky last point does not make a falling curve flat. A fall below
``ABS_TOLERANCE`` nats also counts as flat: a net that fits its subset has a loss near zero,
which can keep shrinking by a large fraction of almost nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

WINDOW = 0.2  # the last 20 % of the run's iterations
TOLERANCE = 0.05  # relative fall of the loss over that window
ABS_TOLERANCE = 0.01  # nats: a smaller fall is flat at any level
HISTORY_KEY = "train_fixed/loss"  # the curve it is judged on (logged at every evaluation)
FINAL_KEY = "final/plateau"  # 1.0 reached, 0.0 not, at step 0 like final/train_error


@dataclass(frozen=True)
class Verdict:
    """``reached`` and why: the fitted fall over the window, absolute (nats) and relative to the
    fitted loss at the window's start, and the first step the fit used."""

    reached: bool
    fall: float
    relative_fall: float
    start_step: int

    def __str__(self) -> str:
        state = "reached" if self.reached else "not reached"
        return (f"plateau {state}: loss fell {100 * self.relative_fall:.1f} % ({self.fall:.3f} nats) from step "
                f"{self.start_step} to the end (criterion: < {100 * TOLERANCE:.0f} % over the last "
                f"{100 * WINDOW:.0f} %)")


def verdict(steps: Sequence[int], losses: Sequence[float], *, window: float = WINDOW,
            tolerance: float = TOLERANCE, abs_tolerance: float = ABS_TOLERANCE) -> Verdict:
    """The plateau verdict for one run's ``train_fixed/loss`` history (steps ascending or not; the
    last step is the run's end). Fewer than two points, or a non-finite loss in the window, is
    "not reached": nothing shows the curve has stopped falling."""
    points = sorted(zip(steps, losses))
    if len(points) < 2:
        return Verdict(False, math.nan, math.nan, points[0][0] if points else 0)
    end = points[-1][0]
    start = end - window * end
    first = max(i for i, (s, _) in enumerate(points) if i == 0 or s <= start)  # the last point at or before it
    xs, ys = [float(s) for s, _ in points[first:]], [float(v) for _, v in points[first:]]
    if len(xs) < 2 or not all(math.isfinite(y) for y in ys):
        return Verdict(False, math.nan, math.nan, int(xs[0]))
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    at_start = my + slope * (xs[0] - mx)
    fall = -slope * (xs[-1] - xs[0])
    relative = fall / at_start if at_start > 0 else math.inf if fall > 0 else 0.0
    return Verdict(fall < abs_tolerance or relative < tolerance, fall, relative, int(xs[0]))
