"""The intervals every tenant number carries: checked against values worked out by hand."""

from __future__ import annotations

import pytest

from trainer.stats import auroc, paired_difference, proportion


def test_wilson_interval_matches_the_textbook_and_stays_in_range() -> None:
    est = proportion(7, 10)
    assert est.value == 0.7 and est.n == 10
    assert est.low == pytest.approx(0.3968, abs=1e-4)
    assert est.high == pytest.approx(0.8922, abs=1e-4)
    perfect = proportion(10, 10)
    assert perfect.high == pytest.approx(1.0) and perfect.low == pytest.approx(0.7225, abs=1e-4)
    assert proportion(0, 5).low == 0.0
    half = proportion(2.5, 5)  # ties count half
    assert half.value == 0.5 and half.low < 0.5 < half.high
    with pytest.raises(ValueError):
        proportion(1, 0)


def test_auroc_counts_ties_half_and_narrows_with_n() -> None:
    assert auroc([3, 4], [1, 2]).value == 1.0
    assert auroc([1, 2], [3, 4]).value == 0.0
    assert auroc([1, 1], [1, 1]).value == 0.5
    assert auroc([2, 1], [1, 0]).value == pytest.approx(0.875)
    small = auroc([0.9, 0.8, 0.3], [0.5, 0.2, 0.1])
    big = auroc([0.9, 0.8, 0.3] * 10, [0.5, 0.2, 0.1] * 10)
    assert small.value == pytest.approx(big.value)
    assert big.high - big.low < small.high - small.low
    assert small.low < small.value < small.high and small.n == 6
    with pytest.raises(ValueError):
        auroc([1.0], [])


def test_paired_difference_cancels_item_difficulty() -> None:
    same = paired_difference([1, 0, 1, 1], [1, 0, 1, 1])
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
    worse = paired_difference([1.0] * 20, [1.0] * 10 + [0.0] * 10)
    assert worse.value == 0.5 and worse.low > 0.25 and worse.n == 20
    with pytest.raises(ValueError):
        paired_difference([1.0], [1.0, 0.0])
