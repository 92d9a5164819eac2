"""Paired-comparison statistics for replicated experiments (numpy and the standard library only).

The demo compares arms that share a replicate (same split, same pretraining, same fine-tuning
seed), so every comparison is on the per-replicate differences ``d_k = treatment_k - control_k``:

- :func:`t_interval` -- mean of ``d`` with a Student-t confidence interval (``n >= 2``);
- :func:`sign_flip_pvalue` -- two-sided sign-flip permutation test of "the differences are
  symmetric around 0": exact over all ``2^n`` sign patterns up to ``exact_max`` replicates,
  Monte-Carlo (``(1 + hits) / (1 + samples)``) beyond;
- :func:`wins_ties_losses` -- counts of ``d > 0``, ``d == 0``, ``d < 0``;
- :func:`compare_paired` bundles the three into a :class:`PairedComparison`, and
  :func:`conclusion_sentence` states in one sentence what such a comparison supports.

No scipy: the t quantile inverts the t distribution function written with the regularized
incomplete beta function (continued fraction, as in Numerical Recipes section 6.4).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

__all__ = [
    "PairedComparison",
    "compare_paired",
    "conclusion_sentence",
    "min_attainable_pvalue",
    "sign_flip_pvalue",
    "student_t_cdf",
    "student_t_quantile",
    "t_interval",
    "wins_ties_losses",
]


def _as_finite_1d(name: str, values: Sequence[float] | np.ndarray) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of numbers, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {arr.tolist()}")
    return arr


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz), converges for x < (a+1)/(a+b+2)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def _regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # The continued fraction converges fast on one side of the mean; use the symmetry I_x(a,b) = 1 - I_{1-x}(b,a).
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """``P(T <= t)`` for Student's t with ``df > 0`` degrees of freedom."""
    if not df > 0:
        raise ValueError(f"df must be > 0, got {df}")
    tail = 0.5 * _regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def student_t_quantile(q: float, df: float) -> float:
    """The ``q``-quantile (``0 < q < 1``) of Student's t with ``df > 0`` degrees of freedom."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be in (0, 1), got {q}")
    if q == 0.5:
        return 0.0
    if q < 0.5:
        return -student_t_quantile(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while student_t_cdf(hi, df) < q:
        hi *= 2.0
    for _ in range(200):  # bisection to double precision
        mid = 0.5 * (lo + hi)
        if student_t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-14 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def t_interval(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of ``values`` ``[n]`` with its two-sided Student-t interval (``n >= 2``)."""
    arr = _as_finite_1d("values", values)
    if arr.size < 2:
        raise ValueError(f"a t-interval needs at least 2 values, got {arr.size}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    mean = float(arr.mean())
    half = student_t_quantile(0.5 + confidence / 2.0, arr.size - 1) * float(arr.std(ddof=1)) / math.sqrt(arr.size)
    return mean, mean - half, mean + half


def min_attainable_pvalue(n: int) -> float:
    """Smallest two-sided exact sign-flip p-value with ``n`` non-zero differences: ``2 / 2^n``."""
    return min(1.0, 2.0 / 2.0**n)


def sign_flip_pvalue(
    diffs: Sequence[float] | np.ndarray, *, exact_max: int = 20, samples: int = 200_000, seed: int = 0
) -> tuple[float, str]:
    """Two-sided sign-flip permutation p-value of ``mean(diffs) != 0``; returns ``(p, "exact" | "monte-carlo")``.

    Under the null each difference ``[n]`` is as likely to have either sign, so the statistic
    ``|mean(s * d)|`` over sign patterns ``s`` is the reference distribution; the p-value is the
    fraction of patterns at least as extreme as the observed one (the observed pattern included).
    Exact for ``n <= exact_max`` (``2^n`` patterns), else ``samples`` random patterns from ``seed``.
    """
    d = _as_finite_1d("diffs", diffs)
    n = d.size
    observed = abs(d.mean())
    # Equal statistics reached by different summation orders may differ in the last bits.
    tol = 1e-9 * (np.abs(d).mean() + 1e-300)
    if n <= exact_max:
        patterns = np.arange(2**n, dtype=np.int64)[:, None] >> np.arange(n, dtype=np.int64)
        signs = 1.0 - 2.0 * (patterns & 1)
        stats = np.abs(signs @ d) / n
        return float(np.mean(stats >= observed - tol)), "exact"
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, samples, 10_000):
        count = min(10_000, samples - start)
        signs = rng.choice(np.array([-1.0, 1.0]), size=(count, n))
        hits += int(np.sum(np.abs(signs @ d) / n >= observed - tol))
    return (1.0 + hits) / (1.0 + samples), "monte-carlo"


def wins_ties_losses(diffs: Sequence[float] | np.ndarray, tie_tolerance: float = 1e-12) -> tuple[int, int, int]:
    """Counts of ``diffs`` above, within and below ``+-tie_tolerance`` of zero."""
    d = _as_finite_1d("diffs", diffs)
    wins = int(np.sum(d > tie_tolerance))
    losses = int(np.sum(d < -tie_tolerance))
    return wins, d.size - wins - losses, losses


@dataclass(frozen=True)
class PairedComparison:
    """Summary of ``treatment - control`` over ``n`` paired replicates (same units as the inputs).

    ``ci_low`` / ``ci_high`` are the Student-t interval at ``confidence`` (None when ``n < 2``);
    ``p_value`` the two-sided sign-flip p-value (``p_method`` says exact or Monte-Carlo).
    """

    n: int
    mean: float
    ci_low: float | None
    ci_high: float | None
    confidence: float
    p_value: float
    p_method: str
    wins: int
    ties: int
    losses: int
    differences: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["differences"] = list(self.differences)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PairedComparison":
        return cls(**{**data, "differences": tuple(data["differences"])})


def compare_paired(
    treatment: Sequence[float] | np.ndarray, control: Sequence[float] | np.ndarray, confidence: float = 0.95
) -> PairedComparison:
    """Paired comparison of ``treatment[k]`` with ``control[k]`` (both ``[n]``, replicate ``k`` in both)."""
    a = _as_finite_1d("treatment", treatment)
    b = _as_finite_1d("control", control)
    if a.shape != b.shape:
        raise ValueError(f"treatment and control must pair up, got {a.size} and {b.size} values")
    d = a - b
    if d.size >= 2:
        mean, low, high = t_interval(d, confidence)
    else:
        mean, low, high = float(d.mean()), None, None
    p, method = sign_flip_pvalue(d)
    wins, ties, losses = wins_ties_losses(d)
    return PairedComparison(d.size, mean, low, high, confidence, p, method, wins, ties, losses, tuple(float(x) for x in d))


def _pp(value: float) -> str:
    return f"{100.0 * value:+.1f}"


def conclusion_sentence(
    comparison: PairedComparison, subject: str, reference: str, label: str, alpha: float = 0.05
) -> str:
    """One sentence stating what ``comparison`` (of accuracies in ``[0, 1]``) supports at level ``alpha``.

    A difference is claimed only when the sign-flip p-value is below ``alpha`` AND the interval
    excludes zero on the same side as the mean; otherwise the sentence reports no distinguishable
    difference, and says so when ``n`` is too small for the exact test ever to reach ``alpha``.
    Numbers are in percentage points (pp).
    """
    c = comparison
    if c.ci_low is None or c.ci_high is None:
        interval = "no interval with 1 replicate"
    else:
        interval = f"{100 * c.confidence:.0f}% CI [{_pp(c.ci_low)}, {_pp(c.ci_high)}]"
    replicates = f"{c.n} replicate{'s' if c.n != 1 else ''}"
    numbers = (
        f"({label} = {_pp(c.mean)} pp, {interval}, p = {c.p_value:.2g}, "
        f"{c.wins}/{c.ties}/{c.losses} W/T/L over {replicates})"
    )
    significant = c.p_value < alpha and c.ci_low is not None and c.ci_high is not None
    if significant and c.ci_low > 0:
        verdict = f"{subject} beat {reference}"
    elif significant and c.ci_high < 0:
        verdict = f"{subject} did worse than {reference}"
    else:
        verdict = f"{subject} was not distinguishable from {reference}"
    caveat = ""
    if c.p_method == "exact" and min_attainable_pvalue(c.n) >= alpha:
        caveat = f"; {replicates} cannot reach p < {alpha:g} with the exact sign-flip test"
    return f"{verdict} {numbers}{caveat}."
