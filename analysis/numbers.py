"""The one number formatter of the report, its tables and its sentences.

Significant digits, not fixed decimals, so 0.0829 and 7,770 both keep what they carry; numbers
that are read together (a mean and its sd, a difference and its interval, two nets' errors)
share one number of decimals, set by the largest of them, so the page never says "1 vs 1.03";
and no value prints as "-0.00".
"""

from __future__ import annotations

import math
from collections.abc import Iterable

SIG = 3  # significant digits of the largest number of a group
MISSING = "n/a"


def _finite(values: Iterable[float | None]) -> list[float]:
    out = []
    for v in values:
        try:
            f = float(v)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out.append(f)
    return out


def decimals(values: Iterable[float | None], sig: int = SIG) -> int:
    """Decimals that give the largest finite |value| ``sig`` significant digits (0 from 10^(sig-1) up)."""
    top = max((abs(v) for v in _finite(values)), default=0.0)
    if top == 0:
        return sig - 1
    return max(0, sig - 1 - math.floor(math.log10(top)))


def fmt(x: float | None, *, like: Iterable[float | None] = (), sig: int = SIG, sign: bool = False,
        missing: str = MISSING) -> str:
    """``x`` with the decimals of the group ``like`` (``x`` itself always counts): ``fmt(1, like=[1.03])``
    is ``1.00``; thousands separated (7,770); below 0.001 or from 10^6 in scientific notation;
    ``sign`` puts ``+`` before positive numbers; never ``-0``."""
    if not _finite([x]):
        return missing
    x = float(x)  # type: ignore[arg-type]
    group = _finite([x, *like])
    top = max(abs(v) for v in group)
    if top and (top < 1e-3 or top >= 1e6):
        text = f"{x:.{sig - 1}e}"
    elif top >= 10 ** sig:  # more integer digits than significant ones: round them (7770.4 -> 7,770)
        text = f"{round(x, sig - 1 - math.floor(math.log10(top))):,.0f}"
    else:
        text = f"{x:,.{decimals(group, sig)}f}"
    if text.startswith("-") and float(text.replace(",", "")) == 0:
        text = text[1:]  # -0.00 -> 0.00
    if sign and not text.startswith("-") and float(text.replace(",", "")) != 0:
        text = "+" + text
    return text


def fmt_all(*values: float | None, sig: int = SIG, missing: str = MISSING) -> list[str]:
    """Each of ``values`` formatted with the decimals of the whole group."""
    return [fmt(v, like=values, sig=sig, missing=missing) for v in values]


def pm(mean: float | None, sd: float | None, n: int, *, missing: str = "–") -> str:
    """'25.2 ± 1.6' (mean and sample sd with the mean's decimals), the mean alone for one seed."""
    if not _finite([mean]):
        return missing
    if n > 1 and _finite([sd]):
        return f"{fmt(mean, like=[sd])} ± {fmt(sd, like=[mean])}"
    return fmt(mean)
