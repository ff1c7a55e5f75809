"""intertwiners.stats: every interval and test against scipy.stats (an independent implementation), and the
claim verdicts never say yes or no where their own interval contains the opposite."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from intertwiners.stats import (
    ANSWERS,
    Interval,
    decide,
    evidence,
    mean_ci,
    paired_difference,
    permutation_pvalue,
    sequential_pvalue,
    sign_test,
    summary,
    welch_difference,
)


@pytest.mark.parametrize("n", [3, 5, 17])
def test_mean_ci_is_scipys_t_interval(n):
    v = np.random.default_rng(n).normal(1.0, 2.0, n)
    iv = mean_ci(v)
    lo, hi = sps.ttest_1samp(v, 0.0).confidence_interval(0.95)
    assert iv.n == n and iv.mean == pytest.approx(v.mean())
    assert (iv.low, iv.high) == (pytest.approx(lo), pytest.approx(hi))
    assert iv.std == pytest.approx(np.std(v, ddof=1))
    lo90, hi90 = sps.ttest_1samp(v, 0.0).confidence_interval(0.9)
    assert mean_ci(v, 0.9).half == pytest.approx((hi90 - lo90) / 2)


def test_one_value_has_no_interval_and_none_has_no_mean():
    iv = mean_ci([7.0])
    assert iv.mean == 7.0 and iv.n == 1 and math.isnan(iv.half) and not iv.defined
    assert "no interval" in iv.text() and iv.side(0.0) == 0   # one sample decides nothing
    empty = mean_ci([])
    assert empty.n == 0 and math.isnan(empty.mean) and empty.text() == "–"


def test_bad_values_raise():
    with pytest.raises(ValueError, match="NaN"):
        mean_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match="same length"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="confidence"):
        mean_ci([1.0, 2.0], 1.5)


def test_paired_and_welch_differences_are_scipys():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, 6), rng.normal(0.5, 2, 6)
    lo, hi = sps.ttest_rel(a, b).confidence_interval(0.95)
    iv = paired_difference(a, b)
    assert (iv.low, iv.high) == (pytest.approx(lo), pytest.approx(hi))
    c = rng.normal(1, 3, 9)
    lo, hi = sps.ttest_ind(a, c, equal_var=False).confidence_interval(0.95)
    iv = welch_difference(a, c)
    assert (iv.low, iv.high) == (pytest.approx(lo), pytest.approx(hi)) and iv.n == 6
    assert not welch_difference([1.0], [1.0, 2.0, 3.0]).defined


def _slow_sign_test(d):
    d = [x for x in d if x != 0]
    n, k = len(d), sum(x > 0 for x in d)
    probs = [math.comb(n, i) / 2 ** n for i in range(n + 1)]
    return min(1.0, sum(p for p in probs if p <= probs[k] * (1 + 1e-9)))


@pytest.mark.parametrize("d", [[1, 2, 3, 4, 5, 6], [1, -1, 2, 0, 3], [-1, -2, -3, 4, -5, -6, -7, -8], [0.0]])
def test_sign_test_is_the_exact_binomial(d):
    assert sign_test(d) == pytest.approx(_slow_sign_test(d))


@pytest.mark.parametrize("n", [1, 2, 5, 10, 17])
def test_sign_test_at_every_count(n):
    for k in range(n + 1):
        d = [1.0] * k + [-1.0] * (n - k)
        assert sign_test(d) == pytest.approx(_slow_sign_test(d), rel=1e-12), (n, k)


def test_permutation_pvalue_has_the_plus_one_correction():
    null = np.array([0.1, 0.2, 0.3, 0.4])
    assert permutation_pvalue(0.35, null) == pytest.approx(2 / 5)
    assert permutation_pvalue(1.0, null) == pytest.approx(1 / 5)   # never 0
    assert permutation_pvalue(0.3, null) == pytest.approx(3 / 5)   # ties count as at least as large


def test_decide_gives_each_answer():
    up = evidence("up", [1.0, 1.1, 0.9, 1.2])
    down = evidence("down", [-1.0, -1.1, -0.9, -1.2])
    wide = evidence("wide", [-1.0, 1.0, 0.5, -0.2])
    single = evidence("single", [3.0])
    assert decide("c", [up], "t").answer == "yes"
    assert decide("c", [up, down], "t").answer == "no"
    assert decide("c", [up, wide], "t").answer == "inconclusive"
    claim = decide("c", [single], "t")
    assert claim.answer == "inconclusive" and "at least 3 values" in claim.detail
    assert decide("c", [up], "t", precondition="model at chance").answer == "not testable"
    assert decide("c", [], "t").answer == "not testable"
    flipped = evidence("x", [0.05, 0.06, 0.04], threshold=0.02, direction=-1)   # claim: x < 0.02
    assert decide("c", [flipped], "t").answer == "no"
    text = summary([decide("a", [up], "t"), decide("b", [wide], "t")])
    assert "**yes** (1)" in text and "**inconclusive** (1)" in text and "no**" not in text


@pytest.mark.filterwarnings("ignore:Precision loss occurred")
def test_no_yes_or_no_where_the_interval_contains_the_opposite(scipy_side):
    """Over many random claims: a yes has every interval on the claimed side, a no has one interval wholly
    on the other side (intervals recomputed by scipy), and with fewer than 3 values the answer is never yes/no."""
    rng = np.random.default_rng(0)
    seen = set()
    for trial in range(300):
        items = []
        for k in range(int(rng.integers(1, 4))):
            n = int(rng.integers(1, 6))
            shift, threshold, direction = rng.normal(0, 2), rng.choice([0.0, 0.02]), int(rng.choice([-1, 1]))
            a = rng.normal(shift, rng.uniform(0.05, 2), n)
            b = None if trial % 3 == 0 else rng.normal(0, 1, n if trial % 3 == 1 else int(rng.integers(1, 6)))
            items.append(evidence(f"e{k}", a, b, paired=trial % 3 == 1, threshold=threshold, direction=direction))
        claim = decide("claim", items, "test")
        seen.add(claim.answer)
        assert claim.answer in ANSWERS
        sides = [0 if e.interval.n < 3 or (e.b is not None and min(len(e.a), len(e.b)) < 3) else scipy_side(e)
                 for e in items]
        if claim.answer == "yes":
            assert all(s > 0 for s in sides), (claim, sides)
        if claim.answer == "no":
            assert any(s < 0 for s in sides), (claim, sides)
    assert {"yes", "no", "inconclusive"} <= seen


# Degenerate intervals: fewer than three values, or none different, never decide a claim


@pytest.mark.parametrize("values", [[3.0, 5.0], [-4.0, -4.5], [2.0, 2.0, 2.0], [-1.0] * 8, [0.5, 0.5]])
def test_few_or_equal_values_give_no_interval_and_an_inconclusive_claim(values):
    iv = mean_ci(values)
    assert math.isnan(iv.half) and not iv.defined and iv.side(0.0) == 0
    assert "no interval" in iv.text() and ("all equal" in iv.text()) == (len(values) >= 3)
    claim = decide("positive", [evidence("v", values)], "t-interval")
    assert claim.answer == "inconclusive" and "at least 3 values" in claim.detail
    against = decide("negative", [evidence("v", values, direction=-1)], "t-interval")
    assert against.answer == "inconclusive"


def test_degenerate_differences_and_summary_rows_are_undefined():
    assert not paired_difference([1.0, 2.0, 3.0], [0.0, 1.0, 2.0]).defined      # every difference equal
    assert not paired_difference([1.0, 2.0], [0.0, 0.0]).defined                # two pairs
    assert not welch_difference([1.0, 1.0, 1.0], [2.0, 2.0, 2.0]).defined        # neither side varies
    assert not welch_difference([1.0, 2.0], [5.0, 6.0, 7.0]).defined             # a side with two values
    assert welch_difference([1.0, 1.0, 1.0], [2.0, 2.5, 3.0]).defined            # one side varies: defined
    assert not Interval.from_bounds(1.0, 1.0, 1.0, 5).defined                    # zero width read back
    assert not Interval.from_bounds(1.0, 0.5, 1.5, 2).defined                    # two values read back
    assert Interval.from_bounds(1.0, 0.5, 1.5, 3).defined


def test_three_varying_values_can_still_decide():
    assert decide("positive", [evidence("v", [5.0, 5.1, 4.9])], "t").answer == "yes"
    assert decide("positive", [evidence("v", [-5.0, -5.1, -4.9])], "t").answer == "no"


# Sequential Monte Carlo p-values (Besag & Clifford 1991)


def slow_sequential_pvalue(statistic, draws, h):
    """Draw by draw: stop at the h-th null value >= statistic (p = h / k), else (1 + hits) / (1 + B)."""
    hits = 0
    for k, v in enumerate(draws, start=1):
        hits += v >= statistic
        if hits == h:
            return h / k, k
    return (1 + hits) / (1 + len(draws)), len(draws)


def test_sequential_pvalue_matches_a_draw_by_draw_loop():
    rng = np.random.default_rng(0)
    for _ in range(200):
        draws = rng.integers(0, 6, size=int(rng.integers(1, 40))).astype(float)   # ties included
        t, h = float(rng.integers(0, 7)), int(rng.integers(1, 5))
        p, k = slow_sequential_pvalue(t, draws, h)
        assert sequential_pvalue(t, draws[:k], h, len(draws)) == pytest.approx(p)
    with pytest.raises(ValueError, match="h must be"):
        sequential_pvalue(0.0, [1.0], 0, 1)
    with pytest.raises(ValueError, match="cannot have stopped"):
        sequential_pvalue(5.0, [1.0, 2.0], 3, 10)


def test_sequential_pvalue_is_valid_under_the_null():
    """Statistic and draws exchangeable (the null): the share of p <= alpha is at most alpha within its
    99.9% binomial interval, and the test stops early on most trials."""
    rng = np.random.default_rng(1)
    h, b = 5, 49
    p, stops = [], []
    for v in rng.random((1000, b + 1)):
        k = slow_sequential_pvalue(v[0], v[1:], h)[1]
        p.append(sequential_pvalue(v[0], v[1:1 + k], h, b))
        stops.append(k)
    p = np.asarray(p)
    for alpha in (0.02, 0.05, 0.1, 0.5):
        low = sps.binomtest(int(np.sum(p <= alpha)), p.size).proportion_ci(0.999).low
        assert low <= alpha, (alpha, np.mean(p <= alpha))
    assert np.median(stops) < b / 2
