"""bissl_fast.experiments.stats against hand-computed cases and published t quantiles."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from bissl_fast.experiments import stats


@pytest.mark.parametrize(
    "df, quantile",
    [  # t_{0.975, df} from standard tables (R: qt(0.975, df))
        (1, 12.706204736174707),
        (2, 4.302652729749464),
        (3, 3.182446305284263),
        (5, 2.570581835636314),
        (10, 2.228138851986274),
        (30, 2.042272456301238),
        (100, 1.983971518523552),
    ],
)
def test_t_quantile_matches_tables(df, quantile):
    assert stats.student_t_quantile(0.975, df) == pytest.approx(quantile, rel=1e-10)
    assert stats.student_t_quantile(0.025, df) == pytest.approx(-quantile, rel=1e-10)


def test_t_cdf_closed_forms():
    # df = 1 is the Cauchy distribution, df = 2 has F(t) = 1/2 + t / (2 sqrt(2 + t^2)).
    for t in (-3.0, -0.5, 0.0, 0.7, 4.0):
        assert stats.student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-13)
        assert stats.student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-13)


def test_t_interval_by_hand():
    # d = 1, 2, 3, 4: mean 2.5, sd sqrt(5/3), se sd/2, t_{0.975,3} = 3.182446305284263.
    mean, low, high = stats.t_interval([1.0, 2.0, 3.0, 4.0])
    half = 3.182446305284263 * math.sqrt(5.0 / 3.0) / 2.0
    assert mean == 2.5
    assert low == pytest.approx(2.5 - half, rel=1e-12)
    assert high == pytest.approx(2.5 + half, rel=1e-12)
    assert low == pytest.approx(0.4457397, abs=1e-6)
    # Identical differences: zero-width interval at the mean.
    assert stats.t_interval([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)


def test_sign_flip_exact_by_hand():
    # All four positive: only the all-plus and all-minus patterns reach |mean| = 2.5 -> 2/16.
    assert stats.sign_flip_pvalue([1.0, 2.0, 3.0, 4.0]) == (0.125, "exact")
    # 3, 1, -1: signed sums +-3 +-1 +-1 = 5, 3, 3, 1, -1, -3, -3, -5; |sum| >= 3 in 6 of 8.
    assert stats.sign_flip_pvalue([3.0, 1.0, -1.0]) == (0.75, "exact")
    # Zero mean: every pattern is at least as extreme.
    assert stats.sign_flip_pvalue([1.0, -1.0]) == (1.0, "exact")
    assert stats.sign_flip_pvalue([0.0, 0.0, 0.0]) == (1.0, "exact")


def test_sign_flip_exact_equals_brute_force():
    rng = np.random.default_rng(3)
    for n in (1, 2, 5, 9):
        d = rng.normal(0.3, 1.0, size=n)
        observed = abs(d.mean())
        extreme = sum(abs(np.mean(np.array(s) * d)) >= observed - 1e-12 for s in itertools.product((-1, 1), repeat=n))
        assert stats.sign_flip_pvalue(d)[0] == pytest.approx(extreme / 2**n, abs=0)


def test_sign_flip_monte_carlo_close_to_exact():
    rng = np.random.default_rng(4)
    d = rng.normal(0.4, 1.0, size=14)
    exact, method = stats.sign_flip_pvalue(d)
    assert method == "exact"
    mc, method = stats.sign_flip_pvalue(d, exact_max=10, samples=100_000, seed=1)
    assert method == "monte-carlo"
    assert mc == pytest.approx(exact, abs=0.01)
    assert stats.sign_flip_pvalue(d, exact_max=10, samples=1000, seed=1) == stats.sign_flip_pvalue(
        d, exact_max=10, samples=1000, seed=1
    )


def test_wins_ties_losses_and_min_p():
    assert stats.wins_ties_losses([1.0, 0.0, -2.0, 0.5]) == (2, 1, 1)
    # Accuracy differences of exactly equal counts are ties even after float subtraction.
    assert stats.wins_ties_losses([0.9 - 0.9, 17 / 600 - 17 / 600]) == (0, 2, 0)
    assert stats.min_attainable_pvalue(5) == 0.0625
    assert stats.min_attainable_pvalue(8) == 2 / 256


def test_compare_paired_by_hand():
    c = stats.compare_paired([0.8, 0.9, 0.7, 0.85], [0.7, 0.9, 0.75, 0.8])
    assert c.n == 4
    assert c.differences == pytest.approx((0.1, 0.0, -0.05, 0.05))
    assert c.mean == pytest.approx(0.025)
    assert (c.wins, c.ties, c.losses) == (2, 1, 1)
    # |sum| of +-0.1 +-0.05 +-0.05 (the tie contributes 0 either way): >= 0.1 in 12 of 16 patterns.
    assert c.p_value == pytest.approx(12 / 16)
    assert stats.PairedComparison.from_dict(c.to_dict()) == c


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="pair up"):
        stats.compare_paired([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="finite"):
        stats.compare_paired([0.1, float("nan")], [0.1, 0.2])
    with pytest.raises(ValueError, match="at least 2"):
        stats.t_interval([1.0])
    with pytest.raises(ValueError, match="non-empty"):
        stats.sign_flip_pvalue([])


def _comparison(diffs):
    diffs = np.asarray(diffs)
    return stats.compare_paired(0.7 + diffs, np.full(diffs.size, 0.7))


def test_conclusion_clear_win():
    c = _comparison([0.021, 0.030, 0.018, 0.025, 0.027, 0.019, 0.024, 0.031])
    sentence = stats.conclusion_sentence(c, "BiSSL's lower backbone", "continued pretext training", "B-C")
    assert sentence.startswith("BiSSL's lower backbone beat continued pretext training (B-C = +2.4 pp, 95% CI [+")
    assert "p = 0.0078, 8/0/0 W/T/L over 8 replicates)." in sentence


def test_conclusion_clear_loss():
    c = _comparison([-0.021, -0.030, -0.018, -0.025, -0.027, -0.019, -0.024, -0.031])
    sentence = stats.conclusion_sentence(c, "BiSSL's lower backbone", "continued pretext training", "B-C")
    assert sentence.startswith("BiSSL's lower backbone did worse than continued pretext training (B-C = -2.4 pp")
    assert "0/0/8 W/T/L" in sentence


def test_conclusion_null():
    c = _comparison([0.01, -0.012, 0.005, 0.0, -0.004, 0.008, -0.009, 0.003])
    sentence = stats.conclusion_sentence(c, "BiSSL's lower backbone", "continued pretext training", "B-C")
    assert sentence.startswith("BiSSL's lower backbone was not distinguishable from continued pretext training (B-C = +0.0 pp")
    assert "4/1/3 W/T/L over 8 replicates)." in sentence


def test_conclusion_too_few_replicates_never_claims():
    # Five consistent wins: the t-interval excludes 0 but the exact test cannot go below 2/32.
    c = _comparison([0.02, 0.03, 0.025, 0.022, 0.028])
    assert c.ci_low > 0 and c.p_value == 0.0625
    sentence = stats.conclusion_sentence(c, "B", "C", "B-C")
    assert sentence.startswith("B was not distinguishable from C")
    assert sentence.endswith("; 5 replicates cannot reach p < 0.05 with the exact sign-flip test.")


def test_conclusion_single_replicate():
    c = _comparison([0.02])
    assert c.ci_low is None and c.p_value == 1.0
    sentence = stats.conclusion_sentence(c, "B", "C", "B-C")
    assert sentence == (
        "B was not distinguishable from C (B-C = +2.0 pp, no interval with 1 replicate, p = 1, 1/0/0 W/T/L over "
        "1 replicate); 1 replicate cannot reach p < 0.05 with the exact sign-flip test."
    )
