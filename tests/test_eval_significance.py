"""Paired t-test and paired bootstrap over queries."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from eval.significance import compare_per_query, paired_bootstrap, paired_t_test
from ragkit.errors import RagkitError


def test_paired_t_test_hand_computed():
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.0, 2.0, 2.0, 2.0])
    # differences 1, 0, 1, 2: mean 1, sample sd sqrt(2/3), t = 1 / (sd / 2) = sqrt(6), df = 3
    t = 1 / (math.sqrt(2 / 3) / 2)
    assert t == pytest.approx(math.sqrt(6))
    assert paired_t_test(a, b) == pytest.approx(2 * stats.t.sf(t, df=3))


def test_degenerate_t_tests_do_not_return_nan():
    same = np.array([0.2, 0.4, 0.6])
    assert paired_t_test(same, same) == 1.0
    assert paired_t_test(same + 0.1, same) == 0.0  # a constant non-zero shift
    assert paired_t_test(np.array([1.0]), np.array([0.0])) == 1.0


def test_bootstrap_separates_a_real_difference_from_noise():
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 1, 200)
    better = np.clip(base + 0.1 + rng.normal(0, 0.05, 200), 0, 1)
    noise = base + rng.normal(0, 0.05, 200)
    p_real, low, high = paired_bootstrap(better, base, samples=2000)
    assert p_real == pytest.approx(1 / 2001)   # no resample comes near: the smallest p it can report
    assert low < (better - base).mean() < high and low > 0
    p_noise, low_noise, high_noise = paired_bootstrap(noise, base, samples=2000)
    assert p_noise > 0.05 and low_noise < 0 < high_noise
    assert paired_bootstrap(noise, base, samples=2000) == (p_noise, low_noise, high_noise)  # seeded
    assert paired_bootstrap(base, base, samples=500)[0] == 1.0


def test_compare_pairs_by_query_id_and_reports_unpaired():
    a = {"q1": {"m": 1.0}, "q2": {"m": 0.5}, "q3": {"m": 0.0}, "only-a": {"m": 1.0}}
    b = {"q3": {"m": 0.5}, "q2": {"m": 0.5}, "q1": {"m": 0.0}}
    c = compare_per_query(a, b, "m", samples=500)
    assert c.queries == 3 and c.only_in_a == 1 and c.only_in_b == 0
    assert c.mean_a == pytest.approx(0.5) and c.mean_b == pytest.approx(1 / 3)
    assert c.difference == pytest.approx(1 / 6)
    with pytest.raises(RagkitError, match="share no scored query"):
        compare_per_query(a, b, "ndcg@10")
