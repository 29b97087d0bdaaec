"""Part 2's statistics (reproduce/stats.py): bootstrap intervals, verdicts, curve margins.

Each test has a known answer and fails if the rule it checks is broken (each was checked by planting the bug).
"""

import numpy as np
import pytest

from dpo_lightning.errors import ConfigError
from dpo_lightning.reproduce import stats


def test_verdict_on_constructed_intervals():
    """PASS only when the interval clears the threshold, FAIL only when it is wholly on the wrong side."""
    assert stats.verdict(0.1, 0.5, 0.0) == "PASS"
    assert stats.verdict(-0.1, 0.5, 0.0) == "INCONCLUSIVE"
    assert stats.verdict(-0.5, -0.1, 0.0) == "FAIL"
    assert stats.verdict(-0.5, 0.0, 0.0) == "FAIL"  # touching the threshold is not clearing it
    assert stats.verdict(0.0, 0.5, 0.0) == "INCONCLUSIVE"
    assert stats.verdict(1.1, 2.0, 1.0) == "PASS" and stats.verdict(0.5, 0.9, 1.0) == "FAIL"
    assert stats.verdict(-0.5, -0.1, 0.0, direction="<") == "PASS"
    assert stats.verdict(0.1, 0.5, 0.0, direction="<") == "FAIL"
    assert stats.verdict(float("nan"), 1.0, 0.0) == "INCONCLUSIVE"
    with pytest.raises(ConfigError, match="direction"):
        stats.verdict(0, 1, 0, direction=">=")


def test_band_verdict():
    assert stats.band_verdict(0.9, 1.1, 0.85, 1.15) == "PASS"
    assert stats.band_verdict(0.8, 1.1, 0.85, 1.15) == "INCONCLUSIVE"
    assert stats.band_verdict(1.2, 1.3, 0.85, 1.15) == "FAIL" and stats.band_verdict(0.1, 0.8, 0.85, 1.15) == "FAIL"


def test_bootstrap_interval_covers_the_mean_and_has_the_normal_width():
    """2,000 prompts with values ~ N(1, 1): the mean's standard error is 1/√2000 ≈ 0.0224, so the 95%
    interval is ≈ mean ± 1.96 × 0.0224 = ± 0.044; it covers the true mean 1 and excludes 0."""
    x = np.random.default_rng(3).normal(1.0, 1.0, size=2000)
    boot = stats.Bootstrap(1, len(x), n_boot=2000, seed=0)
    lo, hi = stats.interval(boot.means(x))
    assert lo < 1.0 < hi and lo < x.mean() < hi
    assert (hi - lo) / 2 == pytest.approx(1.96 / np.sqrt(2000), rel=0.1)
    assert stats.decide(x.mean(), boot.means(x), 0.0).verdict == "PASS"
    assert stats.decide(x.mean(), boot.means(x), 1.2).verdict == "FAIL"
    assert stats.decide(x.mean(), boot.means(x), 1.0).verdict == "INCONCLUSIVE"


def test_paired_bootstrap_sees_a_small_difference_on_shared_prompts():
    """Two methods whose per-prompt rewards share a large prompt effect (std 3) and differ by 0.1 ± 0.1: the
    paired difference's interval is ≈ 0.1 ± 0.009 (PASS); were the two resampled independently it would be
    ≈ ± 0.26 wide. The same replicate draws are used for both, so the pairing holds."""
    rng = np.random.default_rng(0)
    prompt = rng.normal(0, 3, size=500)
    a, b = prompt + 0.1 + rng.normal(0, 0.1, 500), prompt
    boot = stats.Bootstrap(1, 500, n_boot=1000, seed=1)
    lo, hi = stats.interval(boot.means(a) - boot.means(b))
    assert 0.05 < lo < 0.1 < hi < 0.15


def test_bootstrap_over_seeds_widens_the_interval():
    """Three seeds whose means differ by ±1 (seed effect) around 0.5, 400 prompts of noise 0.1: resampling seeds
    gives an interval spanning most of the seed means; prompts alone would give ≈ ± 0.006."""
    rng = np.random.default_rng(0)
    x = np.stack([0.5 + s + rng.normal(0, 0.1, 400) for s in (-1.0, 0.0, 1.0)])
    lo, hi = stats.interval(stats.Bootstrap(3, 400, n_boot=1000, seed=0).means(x))
    assert lo < 0.0 and hi > 1.0
    with pytest.raises(ConfigError, match="seeds × evaluation prompts"):
        stats.Bootstrap(2, 400, n_boot=100).means(x)


def test_interval_is_nan_when_most_draws_are_nan():
    draws = np.array([np.nan] * 20 + [1.0] * 80)
    assert np.isnan(stats.interval(draws)[0])
    lo, hi = stats.interval(np.array([np.nan] * 5 + list(range(95))))  # 95% finite: NaNs are left out
    assert 0 < lo < 5 and 90 < hi < 95


def test_pointwise_margins_read_each_curve_at_the_others_points():
    """A = (1, 1), (3, 3); B = (2, 1), (4, 2). Overlap [2, 3]; grid = A's 3 and B's 2.
    At 2: A = 2, B = 1 → 1. At 3: A = 3, B = 1.5 → 1.5. B's point at 4 is outside A's range."""
    margins = stats.pointwise_margins(np.array([[1, 1], [3, 3]]), np.array([[2, 1], [4, 2]]))
    assert sorted(margins.tolist()) == [1.0, 1.5]
    assert len(stats.pointwise_margins(np.array([[0, 1], [1, 1]]), np.array([[2, 0], [3, 0]]))) == 0


def test_envelope_margins_use_the_frontiers_through_the_origin():
    """A's frontier through (0, 0): (0, 0), (1, 2), then flat 2 (its (2, 1) is under it). B: (0, 0), (2, 1).
    Grid in [0, min(2, 2)] = {0, 1, 2}: A − B = 0, 2 − 0.5 = 1.5, 2 − 1 = 1."""
    m = stats.envelope_margins(np.array([[1, 2], [2, 1]]), np.array([[2, 1]]), (0.0, 0.0))
    assert m.tolist() == [0.0, 1.5, 1.0]
