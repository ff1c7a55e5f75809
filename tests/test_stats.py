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


@pytest.mark.parametrize("n", [2, 3, 5, 17])
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
    on the other side (intervals recomputed by scipy), and with one sample the answer is never yes/no."""
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
        sides = [0 if e.interval.n < 2 or (e.b is not None and min(len(e.a), len(e.b)) < 2) else scipy_side(e)
                 for e in items]
        if claim.answer == "yes":
            assert all(s > 0 for s in sides), (claim, sides)
            assert all(e.interval.n >= 3 for e in items), claim     # never decided from fewer than 3 values
        if claim.answer == "no":
            assert any(s < 0 for s in sides), (claim, sides)
    assert {"yes", "no", "inconclusive"} <= seen


@pytest.mark.parametrize("values", [[1.0, 1.2], [5.0, 5.0], [5.0, 5.0, 5.0, 5.0], [-2.0, -2.0, -2.0]])
def test_no_answer_from_fewer_than_three_values_or_no_spread(values):
    """Two values, or values that are all the same (a zero-width interval): neither yes nor no, however far
    the mean lies from the threshold; the same values with a third, different one do decide."""
    for item in (evidence("e", values), evidence("d", values, [0.0] * len(values)),
                 evidence("w", values, [0.0] * len(values), paired=False)):
        assert not item.interval.decisive and item.interval.side() == 0
        claim = decide("c", [item], "t")
        assert claim.answer == "inconclusive" and "at least 3 values" in claim.detail
    assert Interval.from_bounds(3.0, 3.0, 3.0, 10).side() == 0          # a summary row of width 0
    assert Interval.from_bounds(3.0, 2.0, 4.0, 2).side() == 0           # ... or of two values
    spread = [v + 0.01 * k for k, v in enumerate([*values, values[-1]])]  # three or more values that differ
    assert decide("c", [evidence("e", spread)], "t").answer == ("yes" if values[0] > 0 else "no")


def _sequential_slow(statistic, draw, h, max_draws):
    """Besag & Clifford (1991), written as the procedure: draw null values one at a time; stop at the h-th
    one >= statistic after l draws with p = h / l; after max_draws with g < h of them, p = (g + 1) / (max_draws + 1)."""
    drawn, hits = [], 0
    while len(drawn) < max_draws:
        drawn.append(draw(len(drawn)))
        hits += drawn[-1] >= statistic
        if hits == h:
            return h / len(drawn), len(drawn)
    return (hits + 1) / (max_draws + 1), max_draws


def test_sequential_pvalue_is_besag_cliffords():
    rng = np.random.default_rng(5)
    for _ in range(300):
        h, max_draws = int(rng.integers(1, 6)), int(rng.integers(1, 60))
        values = np.round(rng.normal(size=max_draws), 1)             # ties with the statistic happen
        t = float(np.round(rng.normal(0, 1.5), 1))
        slow, k = _sequential_slow(t, lambda i, v=values: v[i], h, max_draws)
        assert sequential_pvalue(t, values[:k], h, max_draws) == pytest.approx(slow, rel=1e-15)
    with pytest.raises(ValueError, match="cannot have stopped"):
        sequential_pvalue(10.0, np.zeros(5), 2, 9)                      # stopped early without h hits
    with pytest.raises(ValueError, match="positive integer"):
        sequential_pvalue(0.0, np.zeros(5), 0, 5)


def test_sequential_pvalue_is_valid_under_the_null():
    """P(p <= alpha) <= alpha under the null, computed exactly: with the statistic and the max_draws null
    values exchangeable (no ties), the number m of null values above the statistic is uniform on
    0..max_draws, and given m the draws that reach it are a uniformly random subset; the test stops at
    draw l with probability C(l-1, h-1) C(B-l, m-h) / C(B, m). Each p-value comes from sequential_pvalue on a
    draw sequence of that shape."""
    from scipy.special import comb

    for h, big_b in ((1, 19), (3, 29), (6, 39)):
        mass: dict[float, float] = {}
        for m in range(big_b + 1):
            if m < h:                                       # never stops: all B drawn, m reach the statistic
                null = np.r_[np.ones(m), np.zeros(big_b - m)]
                p = sequential_pvalue(0.5, null, h, big_b)
                mass[p] = mass.get(p, 0.0) + 1 / (big_b + 1)
                continue
            for stop in range(h, big_b - (m - h) + 1):      # the h-th hit at draw `stop`
                null = np.r_[np.zeros(stop - h), np.ones(h)]
                p = sequential_pvalue(0.5, null, h, big_b)
                prob = comb(stop - 1, h - 1) * comb(big_b - stop, m - h) / comb(big_b, m) / (big_b + 1)
                mass[p] = mass.get(p, 0.0) + prob
        assert sum(mass.values()) == pytest.approx(1.0)
        for alpha in (0.01, 0.05, 0.1, 0.25, 0.5, *mass):
            level = sum(q for p, q in mass.items() if p <= alpha)
            assert level <= alpha + 1e-9, (h, big_b, alpha, level)
