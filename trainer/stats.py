"""Small-sample statistics for the evaluation report: every tenant number comes with its n and a
95 % interval, and the gate reads the interval's bound, never the point estimate alone.

A tenant's held-out data is small (tens of questions), so the intervals are wide on purpose: a
lift they do not support is not a lift.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Estimate", "auroc", "paired_difference", "proportion"]

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its sample size and 95 % interval ``[low, high]``."""

    value: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}] (n={self.n})"


def proportion(successes: float, n: int) -> Estimate:
    """A share with Wilson's score interval (sound at small n and near 0 or 1, where the normal
    approximation gives intervals outside [0, 1]). ``successes`` may be fractional (ties = 0.5)."""
    if n <= 0:
        raise ValueError("a proportion needs n >= 1")
    p = successes / n
    z2 = Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return Estimate(p, max(0.0, centre - half), min(1.0, centre + half), n)


def auroc(positives: Sequence[float], negatives: Sequence[float]) -> Estimate:
    """Area under the ROC curve: the chance a random positive scores above a random negative
    (ties count half), with Hanley & McNeil's (1982) standard error. ``n`` counts both classes."""
    n1, n2 = len(positives), len(negatives)
    if n1 == 0 or n2 == 0:
        raise ValueError("AUROC needs at least one positive and one negative")
    wins = 0.0
    for p in positives:
        for q in negatives:
            wins += 1.0 if p > q else 0.5 if p == q else 0.0
    a = wins / (n1 * n2)
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n2 - 1) * (q2 - a * a)) / (n1 * n2)
    half = Z95 * math.sqrt(max(var, 0.0))
    return Estimate(a, max(0.0, a - half), min(1.0, a + half), n1 + n2)


def paired_difference(before: Sequence[float], after: Sequence[float]) -> Estimate:
    """Mean of ``before[i] - after[i]`` with a normal interval on the paired differences (the
    same items measured twice, so item difficulty cancels)."""
    if len(before) != len(after) or not before:
        raise ValueError("paired_difference needs two equally long, non-empty sequences")
    diffs = [b - a for b, a in zip(before, after, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    half = Z95 * math.sqrt(var / n)
    return Estimate(mean, mean - half, mean + half, n)
