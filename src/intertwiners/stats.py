"""The statistics of every experiment, in one place: means with t-intervals, differences, tests, verdicts.

One convention, used by the report, ``intertwiners stitch``, ``rotation-penalty``, ``dissect`` and the
plots, so that the same data always get the same interval:

* the interval of a mean of n values is the Student t interval ``mean ± t(1 - (1 - c)/2, n - 1) · s / √n``
  with ``s`` the sample standard deviation (``ddof=1``) and ``c`` the confidence (0.95 by default);
* with fewer than :data:`MIN_VALUES` (3) values, or values that are all equal, the interval is **undefined**:
  ``half`` is NaN (shown as "n = 2, no interval" or "n = 5, all equal, no interval"), never a zero or
  near-degenerate width — two values, or values with no spread, say nothing reliable about their own
  spread, so no answer may rest on such an interval; with n = 0 the mean is NaN as well;
* a paired difference is the interval of the mean of the differences ``a_i − b_i`` (pairs share a model
  pair, a repeat seed or a rotation); an unpaired difference uses Welch's interval (unequal variances,
  Welch–Satterthwaite degrees of freedom), undefined when either side has fewer than 3 values or neither
  side varies;
* :func:`sign_test` is the two-sided exact binomial test of the signs of paired differences (zeros dropped);
* :func:`permutation_pvalue` is the Monte Carlo p-value with the +1 correction, (1 + #{null ≥ t}) / (1 + B);
  :func:`sequential_pvalue` the sequential one of Besag & Clifford (1991): h / k when the h-th null value
  ≥ t came at draw k, else the fixed-B value.

Claims (:class:`Claim`) turn intervals into one of four answers, each with the numbers and the test named:
**yes** (every interval lies on the claimed side), **no** (some interval lies wholly on the other side),
**inconclusive** (neither: the data cannot decide at this sample size, or an interval is undefined — so
fewer than 3 values, or values that are all equal, always answer inconclusive) and
**not testable** (a precondition fails: e.g. a model at chance, no interpretable units to lose).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

ANSWERS = ("yes", "no", "inconclusive", "not testable")
CONFIDENCE = 0.95
MIN_VALUES = 3      # the fewest values (per side of a Welch difference) an interval is built from


def _values(values: Iterable[float], name: str = "values") -> np.ndarray:
    v = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float).ravel()
    if not np.isfinite(v).all():
        raise ValueError(f"{name}: {int((~np.isfinite(v)).sum())} of {v.size} values are NaN or infinite")
    return v


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _t_quantile(confidence: float, df: float) -> float:
    # scipy.special's inverse of Student's t (what scipy.stats.t.ppf calls) costs a tenth of scipy.stats' import
    from scipy.special import stdtrit

    _check_confidence(confidence)
    return float(stdtrit(df, 0.5 + confidence / 2))


@dataclass(frozen=True)
class Interval:
    """A mean (or a difference of means) with its two-sided t confidence interval.

    ``half`` is the half-width (NaN when undefined, n < 2); ``std`` the sample standard deviation
    (ddof=1; NaN for n < 2; for a Welch difference: the standard error of the difference); ``n`` the
    number of values (for a Welch difference: the smaller side).
    """

    mean: float
    half: float
    n: int
    std: float = math.nan
    confidence: float = CONFIDENCE

    @classmethod
    def from_bounds(cls, mean: float, low: float, high: float, n: int) -> Interval:
        """The interval of a summary row (``mean``, ``ci_low``, ``ci_high``, ``n``); NaN bounds stay undefined."""
        return cls(float(mean), (float(high) - float(low)) / 2, int(n))

    @property
    def defined(self) -> bool:
        """At least :data:`MIN_VALUES` values and a finite, positive width (a zero-width interval, e.g. a
        summary row of equal values read back by :meth:`from_bounds`, is undefined)."""
        return self.n >= MIN_VALUES and math.isfinite(self.half) and self.half > 0

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half

    def side(self, threshold: float = 0.0) -> int:
        """+1 if the whole interval lies above ``threshold``, -1 if below, 0 if it contains it or is undefined."""
        if not self.defined:
            return 0
        return 1 if self.low > threshold else (-1 if self.high < threshold else 0)

    def text(self, digits: int = 2, signed: bool = False) -> str:
        """``1.23 ± 0.45``; ``1.23 (n = 2, no interval)``; ``1.23 (n = 5, all equal, no interval)``; ``–``
        without data."""
        if self.n == 0 or not math.isfinite(self.mean):
            return "–"
        m = f"{self.mean:+.{digits}f}" if signed else f"{self.mean:.{digits}f}"
        if not self.defined:
            equal = ", all equal" if self.n >= MIN_VALUES and (self.std == 0 or self.half == 0) else ""
            return f"{m} (n = {self.n}{equal}, no interval)"
        return f"{m} ± {self.half:.{digits}f}"

    def bracket(self, digits: int = 2) -> str:
        """``+1.23 [+0.78, +1.68]``, or ``+1.23 (n = 2, no interval)``."""
        if not self.defined:
            return self.text(digits, signed=True)
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def mean_ci(values: Iterable[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean of ``values`` with its Student t interval (see the module doc; n < 3 or all values equal:
    undefined, ``half`` NaN; n = 0: the mean is NaN too)."""
    _check_confidence(confidence)
    v = _values(values)
    if v.size == 0:
        return Interval(math.nan, math.nan, 0, math.nan, confidence)
    if v.size == 1:
        return Interval(float(v[0]), math.nan, 1, math.nan, confidence)
    std = float(v.std(ddof=1))
    if v.size < MIN_VALUES or np.all(v == v[0]):
        return Interval(float(v.mean()), math.nan, int(v.size), std, confidence)
    half = _t_quantile(confidence, v.size - 1) * std / math.sqrt(v.size)
    return Interval(float(v.mean()), half, int(v.size), std, confidence)


def paired_difference(a: Iterable[float], b: Iterable[float], confidence: float = CONFIDENCE) -> Interval:
    """Interval of the mean of ``a_i - b_i`` (paired samples of equal length)."""
    a, b = _values(a, "a"), _values(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired samples must have the same length, got {a.size} and {b.size}")
    return mean_ci(a - b, confidence)


def welch_difference(a: Iterable[float], b: Iterable[float], confidence: float = CONFIDENCE) -> Interval:
    """Interval of mean(a) - mean(b) for independent samples (Welch); undefined if either has fewer than
    :data:`MIN_VALUES` values or neither varies."""
    a, b = _values(a, "a"), _values(b, "b")
    n = min(a.size, b.size)
    if n == 0:
        return Interval(math.nan, math.nan, 0, math.nan, confidence)
    mean = float(a.mean() - b.mean())
    if n < 2:
        return Interval(mean, math.nan, n, math.nan, confidence)
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    if n < MIN_VALUES or (np.all(a == a[0]) and np.all(b == b[0])):
        return Interval(mean, math.nan, n, se, confidence)
    df = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
    return Interval(mean, _t_quantile(confidence, df) * se, n, se, confidence)


def sign_test(differences: Iterable[float]) -> float:
    """Two-sided exact sign test of paired differences (zeros dropped); 1.0 when nothing is left.

    Under the null the number of positive differences is Binomial(n, 1/2), symmetric about n/2, so the outcomes
    at most as likely as the observed k are those at most min(k, n - k) from either end:
    p = min(1, 2 P(X <= min(k, n - k))) (scipy.special's binomial CDF; ``binomtest`` gives the same)."""
    from scipy.special import bdtr

    d = _values(differences, "differences")
    d = d[d != 0]
    if d.size == 0:
        return 1.0
    k = int((d > 0).sum())
    return float(min(1.0, 2.0 * bdtr(min(k, d.size - k), int(d.size), 0.5)))


def _reaches(statistic: float, null: np.ndarray) -> np.ndarray:
    """Which null values count as at least as large as ``statistic`` (equal up to rounding, relative 1e-12,
    counts): the one rule of every permutation p-value."""
    tol = 1e-12 * max(1.0, abs(statistic))
    return np.asarray(null, dtype=float) >= statistic - tol


def permutation_pvalue(statistic: float, null: np.ndarray) -> float:
    """(1 + #{null >= statistic}) / (1 + B): the Monte Carlo permutation p-value of "greater than chance".

    Null values equal to the statistic up to rounding (relative 1e-12) count as at least as large.
    """
    null = np.asarray(null, dtype=float)
    if null.size == 0:
        raise ValueError("the null distribution is empty: use at least one permutation")
    return float((1 + np.count_nonzero(_reaches(statistic, null))) / (1 + null.size))


def sequential_stop(statistic: float, null: np.ndarray, h: int) -> int | None:
    """The number of draws k after which ``h`` of the null values (in the order drawn) have reached the
    statistic, or None if fewer than h of them do (Besag & Clifford 1991's stopping time)."""
    hits = np.flatnonzero(_reaches(statistic, null))
    return int(hits[h - 1]) + 1 if hits.size >= h else None


def sequential_pvalue(statistic: float, null: np.ndarray, h: int, max_draws: int) -> float:
    """Besag & Clifford's (1991) sequential Monte Carlo p-value of "greater than chance".

    Null values are drawn one by one, at most ``max_draws``; sampling stops once ``h`` of them reach the
    statistic. Stopped after k draws: p = h / k; otherwise (all ``max_draws`` drawn, fewer than h reached
    it): p = (1 + #{null >= statistic}) / (1 + max_draws), the fixed-B p-value. Valid at every level:
    P(p <= alpha) <= alpha under the null (exchangeable draws). ``null`` holds the draws in order: the
    first k when stopped, else all ``max_draws``.
    """
    if isinstance(h, bool) or int(h) != h or h < 1:
        raise ValueError(f"h must be a positive integer, got {h!r}")
    null = np.asarray(null, dtype=float)
    k = sequential_stop(statistic, null, int(h))
    if k is not None:
        return float(h) / k
    if null.size != max_draws:
        raise ValueError(f"fewer than h = {h} of the {null.size} null values reach the statistic, so sampling "
                         f"cannot have stopped: expected all {max_draws} draws")
    return permutation_pvalue(statistic, null)


# ----------------------------------------------------------------------------------------------------------
# Claims


@dataclass(frozen=True)
class Evidence:
    """One comparison behind a claim: the claim says ``direction * (quantity - threshold) > 0``.

    ``a`` (and ``b``) are the raw values: the quantity is mean(a) when ``b`` is None, mean(a - b) when
    ``paired``, else mean(a) - mean(b) (Welch). Keeping the raw values lets anyone recompute the interval.
    """

    label: str
    a: tuple[float, ...]
    b: tuple[float, ...] | None = None
    paired: bool = True
    threshold: float = 0.0
    direction: int = 1

    @property
    def interval(self) -> Interval:
        if self.b is None:
            return mean_ci(self.a)
        return paired_difference(self.a, self.b) if self.paired else welch_difference(self.a, self.b)

    def verdict(self) -> int:
        """+1 supports the claim, -1 contradicts it, 0 cannot tell (interval contains the threshold)."""
        return self.direction * self.interval.side(self.threshold)

    def text(self, digits: int = 2) -> str:
        return f"{self.label} {self.interval.bracket(digits)}"


def evidence(label: str, a: Sequence[float], b: Sequence[float] | None = None, *, paired: bool = True,
             threshold: float = 0.0, direction: int = 1) -> Evidence:
    """An :class:`Evidence` from plain sequences (converted to float tuples)."""
    return Evidence(label, tuple(float(v) for v in a), None if b is None else tuple(float(v) for v in b),
                    paired, float(threshold), int(direction))


@dataclass
class Claim:
    """A claim of the paper, its answer (one of :data:`ANSWERS`) and the sentence that backs it."""

    text: str
    answer: str
    detail: str
    evidence: list[Evidence] = field(default_factory=list)

    def line(self) -> str:
        return f"- {self.text}: **{self.answer}** ({self.detail})."


def decide(text: str, items: Sequence[Evidence], test: str, *, precondition: str | None = None,
           digits: int = 2) -> Claim:
    """Answer ``text`` from ``items`` (every one must support it for yes; one contradicting is a no).

    ``test`` names the comparison and the interval (e.g. "orthogonal − G_ReLU penalty, paired over repeats,
    95% t-interval"); ``precondition`` (a reason) makes the claim not testable whatever the numbers.
    """
    numbers = "; ".join(e.text(digits) for e in items)
    if precondition:
        return Claim(text, "not testable", f"{precondition}" + (f"; {test}: {numbers}" if items else ""),
                     list(items))
    if not items:
        return Claim(text, "not testable", "no data for this comparison")
    verdicts = [e.verdict() for e in items]
    if all(v > 0 for v in verdicts):
        answer = "yes"
    elif any(v < 0 for v in verdicts):
        answer = "no"
    else:
        answer = "inconclusive"
    why = ""
    if answer == "inconclusive" and any(not e.interval.defined for e in items):
        why = f" (an interval needs at least {MIN_VALUES} values, not all equal)"
    return Claim(text, answer, f"{test}: {numbers}{why}", list(items))


def decide_pvalues(text: str, pvalues: dict[str, float], test: str, *, alpha: float = 0.05,
                   precondition: str | None = None) -> Claim:
    """A claim that every effect is above chance: **yes** when every p-value is at most ``alpha`` (an
    intersection-union test: the claim needs every null rejected, so no multiplicity correction is due),
    else **inconclusive** — a large p-value is no evidence of chance-level similarity, so this kind of
    claim is never answered no."""
    if precondition:
        return Claim(text, "not testable", precondition)
    if not pvalues:
        return Claim(text, "not testable", "no p-values (no permutation tests in the results)")
    worst = max(pvalues, key=pvalues.get)
    answer = "yes" if pvalues[worst] <= alpha else "inconclusive"
    return Claim(text, answer, f"{test}; every one of the {len(pvalues)} tests must reach p ≤ {alpha:g}: the "
                 f"largest p is {pvalues[worst]:.3g} ({worst})")


def summary(claims: Sequence[Claim]) -> str:
    """The claims grouped by answer, as a markdown list per answer (empty answers left out)."""
    parts = []
    for answer in ANSWERS:
        chosen = [c for c in claims if c.answer == answer]
        if chosen:
            parts.append(f"**{answer}** ({len(chosen)}):\n\n" + "\n".join(f"- {c.text}" for c in chosen))
    return "\n\n".join(parts)
