"""Spread over seeds and the paired bootstrap, on inputs whose answer is known."""
import math

import numpy as np
import pytest

from emcl_nb.analysis import stats


def test_spread_is_mean_and_sample_std():
    result = stats.spread([1.0, 2.0, 3.0])
    assert result.mean == pytest.approx(2.0) and result.std == pytest.approx(1.0)
    assert stats.spread([5.0]).std == 0.0
    with pytest.raises(ValueError, match="at least one value"):
        stats.spread([])


def test_identical_arms_differ_by_exactly_zero():
    hits = np.random.default_rng(0).integers(0, 2, size=(3, 200)).astype(float)
    result = stats.paired_bootstrap(hits, hits.copy())
    assert (result.diff, result.low, result.high) == (0.0, 0.0, 0.0)
    assert not result.significant and stats.verdict(result) == "not significant"


def test_every_query_won_is_plus_100_points_with_no_doubt():
    result = stats.paired_bootstrap(np.ones((2, 50)), np.zeros((2, 50)))
    assert result.diff == pytest.approx(100.0) and result.low == pytest.approx(100.0)
    assert result.significant


def test_interval_matches_the_normal_approximation_of_a_known_rate():
    """A variant that wins 20 % of 1,000 queries and never loses: difference 20 points,
    95 % interval about 20 ± 1.96 * sqrt(0.2 * 0.8 / 1000) * 100 = 20 ± 2.5."""
    baseline = np.zeros(1000)
    variant = np.zeros(1000)
    variant[:200] = 1.0
    result = stats.paired_bootstrap(variant, baseline)
    half_width = 1.96 * math.sqrt(0.2 * 0.8 / 1000) * 100
    assert result.diff == pytest.approx(20.0)
    assert result.low == pytest.approx(20.0 - half_width, abs=0.1)          # off by 0.02; a 90 % one by 0.4
    assert result.high == pytest.approx(20.0 + half_width, abs=0.1)


def test_pairing_detects_a_small_consistent_gain_that_unpaired_noise_would_hide():
    """Both arms get half the queries right; the variant also fixes 30 of the others. The
    paired difference (3 points) varies only through those 30 queries, so the interval
    excludes 0; resampling the arms independently would give a ±4.4-point interval."""
    rng = np.random.default_rng(1)
    baseline = (rng.random(1000) < 0.5).astype(float)
    variant = baseline.copy()
    variant[np.flatnonzero(baseline == 0)[:30]] = 1.0
    result = stats.paired_bootstrap(variant, baseline)
    assert result.diff == pytest.approx(3.0)
    assert 1.5 < result.low < 3.0 < result.high < 4.5
    assert result.significant


def test_seeds_are_pooled_by_averaging_their_differences():
    """Seed 0 gains 10 points, seed 1 loses 10: the pooled difference is 0, the per-seed
    differences and their std are reported, and the interval straddles 0."""
    base = np.zeros((2, 100))
    variant = base.copy()
    variant[0, :10] = 1.0                       # seed 0: +10 points
    base[1, 10:20] = 1.0                        # seed 1: -10 points, on other queries
    result = stats.paired_bootstrap(variant, base)
    assert result.per_seed == pytest.approx((10.0, -10.0))
    assert result.diff == pytest.approx(0.0, abs=1e-12)
    assert result.std == pytest.approx(math.sqrt(200.0))
    assert result.low < 0 < result.high and not result.significant


def test_the_same_seed_gives_the_same_interval():
    rng = np.random.default_rng(2)
    variant, baseline = rng.random((3, 80)), rng.random((3, 80))
    first = stats.paired_bootstrap(variant, baseline, seed=7)
    assert stats.paired_bootstrap(variant, baseline, seed=7) == first
    assert stats.paired_bootstrap(variant, baseline, seed=8) != first


def test_unpaired_or_broken_inputs_are_refused():
    with pytest.raises(ValueError, match="same seeds and queries"):
        stats.paired_bootstrap(np.zeros((3, 10)), np.zeros((2, 10)))
    with pytest.raises(ValueError, match="non-finite"):
        stats.paired_bootstrap(np.array([0.0, np.nan]), np.zeros(2))
    with pytest.raises(ValueError, match="confidence"):
        stats.paired_bootstrap(np.zeros(3), np.zeros(3), confidence=1.0)


def test_sentence_states_difference_spread_interval_and_verdict():
    result = stats.paired_bootstrap(np.ones((2, 50)), np.zeros((2, 50)))
    assert stats.sentence("EMCL vs off", result) == \
        "EMCL vs off: +100.0 ± 0.0 points (95 % CI +100.0 to +100.0), significant"


def test_one_seed_reports_no_seed_spread():
    """With one training seed there is no spread over seeds: no "± 0.0" that reads as one."""
    result = stats.paired_bootstrap(np.ones(50), np.zeros(50))
    assert stats.sentence("EMCL vs off", result) == \
        "EMCL vs off: +100.0 points (95 % CI +100.0 to +100.0), significant"
