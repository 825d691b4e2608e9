"""erasekit.stats: Wilson against published values, the cluster bootstrap's reproducibility and
coverage, exact McNemar against a hand computation, and paired tests that find a real difference
and leave a null one undecided."""

from __future__ import annotations

import math

import numpy as np
import pytest

from erasekit.stats import (Interval, asr_curve, cluster_bootstrap, mcnemar, mcnemar_p, paired_outcomes,
                            paired_test, verdict, wilson)


@pytest.mark.parametrize("k, n, low, high", [
    (8, 10, 49.02, 94.33),    # R: prop.test(8, 10, correct = FALSE)$conf.int
    (0, 10, 0.0, 27.75),
    (10, 10, 72.25, 100.0),
    (81, 263, 25.53, 36.62),   # Newcombe (1998), example 81/263: 0.2553-0.3662
])
def test_wilson_matches_known_values(k, n, low, high):
    iv = wilson(k, n)
    assert iv.value == pytest.approx(100 * k / n)
    assert iv.low == pytest.approx(low, abs=0.06) and iv.high == pytest.approx(high, abs=0.06)


def test_interval_json_round_trip_and_format():
    iv = Interval(95.0, 88.14, 98.63, "Wilson score", 40)
    assert Interval.from_dict(iv.to_dict()) == iv
    assert str(iv) == "95.0 % [88.1, 98.6]"


def test_cluster_bootstrap_is_reproducible_and_wider_than_wilson_for_clustered_data():
    rng = np.random.default_rng(1)
    p_cluster = rng.uniform(0.1, 0.9, 20)          # 20 captions, 5 seeds each, strongly clustered
    y = (rng.random((20, 5)) < p_cluster[:, None]).reshape(-1)
    c = np.repeat(np.arange(20), 5)
    a, b = cluster_bootstrap(y, c, seed=3), cluster_bootstrap(y, c, seed=3)
    assert a == b and a.clusters == 20 and a.n == 100
    assert cluster_bootstrap(y, c, seed=4) != a
    w = wilson(int(y.sum()), len(y))
    assert a.low <= a.value <= a.high and a.value == pytest.approx(w.value)
    assert a.high - a.low > (w.high - w.low) * 1.1   # clustering widens the interval


def test_cluster_bootstrap_covers_the_true_rate():
    """Coverage sanity: 200 synthetic clustered data sets; the 95 % interval covers the truth in
    about 95 % of them (a loose band: percentile bootstraps under-cover a little at 30 clusters)."""
    rng = np.random.default_rng(0)
    truth, hits = 0.7, 0
    for i in range(200):
        p = np.clip(truth + rng.normal(0, 0.15, 30), 0, 1)
        y = (rng.random((30, 4)) < p[:, None]).reshape(-1)
        iv = cluster_bootstrap(y, np.repeat(np.arange(30), 4), resamples=400, seed=i)
        hits += iv.low <= 100 * truth <= iv.high
    assert 0.85 <= hits / 200 <= 0.99


def test_stratified_bootstrap_averages_per_stratum_rates_and_falls_back_to_wilson_at_the_bounds():
    y = np.array([1, 1, 1, 1, 0, 0, 1, 0])
    strata = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    iv = cluster_bootstrap(y, np.arange(8), strata)
    assert iv.value == pytest.approx(100 * (1.0 + 0.25) / 2)
    every = cluster_bootstrap(np.ones(10), np.repeat(np.arange(5), 2))
    assert every.value == 100.0 and every.high == 100.0
    assert every.low == pytest.approx(wilson(5, 5).low) and "Wilson" in every.method


def test_mcnemar_exact_p_by_hand():
    # 7 vs 2 discordant: 2 * (C(9,0) + C(9,1) + C(9,2)) / 2^9 = 2 * 46 / 512
    assert mcnemar_p(7, 2) == pytest.approx(2 * 46 / 512)
    assert mcnemar_p(5, 0) == pytest.approx(2 / 32) and mcnemar_p(0, 0) == 1.0
    a, b = paired_outcomes(40, 10, 7, 2)
    t = mcnemar(a, b)
    assert t.p_value == pytest.approx(2 * 46 / 512) and t.estimate == pytest.approx(100 * 5 / 40)
    assert t.low <= t.estimate <= t.high


def test_paired_test_detects_a_real_difference_and_leaves_a_null_one_undecided():
    rng = np.random.default_rng(2)
    base = rng.uniform(0.2, 0.6, 30)
    real = paired_test(base + 0.2, base, seed=0)
    assert real.estimate == pytest.approx(20.0) and real.p_value < 0.001 and real.low > 0
    assert verdict(real, "greater") == "holds" and verdict(real, "less") == "does not hold"
    null = paired_test(base + rng.normal(0, 0.05, 30), base + rng.normal(0, 0.05, 30), seed=0)
    assert null.p_value > 0.05 and null.low < 0 < null.high
    assert verdict(null, "greater") == verdict(null, "less") == "undecided"


def test_four_clusters_cannot_decide_and_margin_and_ratio_shift_the_hypothesis():
    four = paired_test([0.9, 0.8, 1.0, 0.7], [0.1, 0.2, 0.0, 0.3])
    assert four.p_value == pytest.approx(2 / 16)           # the exact sign-flip floor at 4 clusters
    assert four.verdict("greater") == "undecided"
    eight = paired_test([0.5] * 8, [0.4] * 8, margin=-5.0)   # +10 points, tested against -5
    assert eight.p_value == pytest.approx(2 / 256) and eight.verdict("greater") == "holds"
    half = paired_test([0.2] * 8, [0.6] * 8, ratio=0.5)      # 20 - 0.5 * 60 = -10 points
    assert half.estimate == pytest.approx(-10.0) and half.verdict("less") == "holds"


def test_asr_curve_counts_prompts_broken_within_each_budget():
    pts = asr_curve([1, 0, 1, 1], [100, None, 50, 700])
    assert [p["budget"] for p in pts] == [0.0, 50.0, 100.0, 700.0]
    assert [p["broken"] for p in pts] == [0, 1, 2, 3]
    assert pts[-1]["asr"]["value"] == 75.0 and math.isclose(pts[1]["asr"]["low"], wilson(1, 4).low)
