"""Statistics behind every verdict: seeded percentile-bootstrap intervals of a row's statistic and of
the paired difference of two rows, Holm's step-down correction, and the sample size a replication
needs for 80 % power. Pure numpy/scipy (no torch), so stored results and ``evalkit compare`` use it.

Definitions (docs/suites.md, "Verdicts"):

- A row's *statistic* is the mean of its per-item values (reduction ``per-sample``) or the ratio of
  summed numerators to summed denominators (``pooled``), over the items used.
- The bootstrap resamples items (for a paired comparison: item *pairs*, so both rows keep the same
  items in every resample) ``n_resamples`` times with a numpy generator seeded by ``seed``; the
  interval is the percentile interval, the ``(1 - c) / 2`` and ``(1 + c) / 2`` quantiles of the
  resampled statistic (Efron & Tibshirani 1993, ch. 13).
- Two-sided bootstrap p-value of "difference = 0": ``min(1, 2 min(P*(D <= 0), P*(D >= 0)))``, floored
  at ``1 / n_resamples``. It orders claims for Holm's procedure (Holm 1979).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Default number of bootstrap resamples (the minimum a suite may set).
N_RESAMPLES = 10_000
#: Largest index block drawn at once (resamples x items), bounding memory for large suites.
_BLOCK = 4_000_000


@dataclass(frozen=True)
class RowSample:
    """The per-item values of one row (method or variant) and metric, aligned by item key.

    ``values`` are the per-item metric values (NaN: excluded); for a pooled metric ``num`` and ``den``
    hold each item's numerator and denominator (the row statistic is ``sum(num) / sum(den)``)."""

    keys: tuple[str, ...]
    values: np.ndarray
    reduction: str = "per-sample"
    num: np.ndarray | None = None
    den: np.ndarray | None = None

    @classmethod
    def build(cls, keys: Sequence[str], values: Sequence[float], reduction: str = "per-sample",
              num: Sequence[float] | None = None, den: Sequence[float] | None = None) -> RowSample:
        """Check alignment and make float arrays."""
        vals = np.asarray(values, dtype=np.float64)
        if len(keys) != vals.size:
            raise ValueError(f"{len(keys)} item keys for {vals.size} values")
        if len(set(keys)) != len(keys):
            dup = sorted({k for k in keys if list(keys).count(k) > 1})[:3]
            raise ValueError(f"item keys must be unique within a row, repeated: {dup}")
        pooled = reduction == "pooled" and num is not None and den is not None and len(num) == vals.size
        return cls(tuple(keys), vals, "pooled" if pooled else "per-sample",
                   np.asarray(num, dtype=np.float64) if pooled else None,
                   np.asarray(den, dtype=np.float64) if pooled else None)

    def valid(self) -> dict[str, int]:
        """Item key -> position, for the items with a finite value."""
        return {k: i for i, k in enumerate(self.keys) if math.isfinite(self.values[i])}

    def columns(self, idx: np.ndarray) -> list[np.ndarray]:
        """The arrays the statistic reads, restricted to positions ``idx``."""
        if self.reduction == "pooled":
            return [self.num[idx], self.den[idx]]
        return [self.values[idx]]

    @property
    def width(self) -> int:
        return 2 if self.reduction == "pooled" else 1


def statistic(reduction: str, cols: Sequence[np.ndarray]) -> np.ndarray:
    """The row statistic over the last axis: mean, or ratio of sums for ``pooled`` (NaN for a zero sum)."""
    if reduction == "pooled":
        num, den = cols
        d = den.sum(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(d > 0, num.sum(-1) / np.where(d > 0, d, 1.0), np.nan)
    return cols[0].mean(-1)


def bootstrap_distribution(columns: Sequence[np.ndarray], stat, n_resamples: int = N_RESAMPLES,
                           seed: int = 0) -> np.ndarray:
    """``stat`` of ``n_resamples`` resamples (with replacement, same indices for every column, so
    pairs stay paired) of the rows of ``columns`` (arrays of equal length n). ``stat`` maps arrays of
    shape (resamples, n) to (resamples,)."""
    n = len(columns[0])
    rng = np.random.default_rng(seed)
    out = np.empty(n_resamples, dtype=np.float64)
    block = max(1, _BLOCK // max(n, 1))
    for start in range(0, n_resamples, block):
        b = min(block, n_resamples - start)
        idx = rng.integers(0, n, size=(b, n))
        out[start:start + b] = stat(*(c[idx] for c in columns))
    return out


def percentile_interval(dist: np.ndarray, confidence: float) -> tuple[float, float]:
    """The percentile interval of a bootstrap distribution (NaN resamples dropped)."""
    d = dist[np.isfinite(dist)]
    if d.size == 0:
        return math.nan, math.nan
    a = (1.0 - confidence) / 2.0
    low, high = np.quantile(d, [a, 1.0 - a])
    return float(low), float(high)


def bootstrap_p(dist: np.ndarray, null: float = 0.0) -> float:
    """Two-sided bootstrap p-value of ``statistic = null`` (see the module docstring)."""
    d = dist[np.isfinite(dist)]
    if d.size == 0:
        return 1.0
    p = 2.0 * min(float(np.mean(d <= null)), float(np.mean(d >= null)))
    return float(min(1.0, max(p, 1.0 / d.size)))


def seed_for(text: str, base: int = 0) -> int:
    """A stable per-claim seed (crc32 of the claim text, offset by ``base``): a claim's resamples do
    not depend on the other claims of the suite or their order."""
    return (zlib.crc32(text.encode()) + base) % (2**32)


@dataclass(frozen=True)
class Comparison:
    """A bootstrap estimate: the statistic (``left - right - offset`` for two rows; the row's statistic
    minus ``offset`` for one row), its resampled distribution and the items it used."""

    left: float
    right: float
    diff: float
    dist: np.ndarray
    n: int
    paired: bool
    n_left: int
    n_right: int

    def interval(self, confidence: float) -> tuple[float, float] | None:
        if self.n < 2:
            return None
        return percentile_interval(self.dist, confidence)

    def p_value(self, null: float = 0.0) -> float:
        """Two-sided bootstrap p-value of ``diff = null``."""
        return bootstrap_p(self.dist, null) if self.n >= 2 else 1.0

    def standard_error(self) -> float:
        d = self.dist[np.isfinite(self.dist)]
        return float(d.std(ddof=1)) if d.size > 1 else math.nan


def compare_rows(a: RowSample, b: RowSample | None, offset: float = 0.0, *, n_resamples: int = N_RESAMPLES,
                 seed: int = 0) -> Comparison:
    """Bootstrap ``stat(a) - stat(b) - offset`` (or ``stat(a) - offset`` when ``b`` is None).

    Two rows are paired on the items both have a finite value for. When they share no item at all
    (rows that are different words by construction, e.g. POS groups) the rows are resampled
    independently (an unpaired two-sample bootstrap) and ``paired`` is False."""
    va = a.valid()
    if b is None:
        ia = np.fromiter(va.values(), dtype=np.int64, count=len(va))
        cols = a.columns(ia)
        est = float(statistic(a.reduction, cols)) if ia.size else math.nan
        dist = (bootstrap_distribution(cols, lambda *c: statistic(a.reduction, c) - offset, n_resamples, seed)
                if ia.size >= 2 else np.array([]))
        return Comparison(est, offset, est - offset, dist, int(ia.size), True, int(ia.size), 0)
    vb = b.valid()
    shared = [k for k in va if k in vb]
    if shared:
        ia = np.asarray([va[k] for k in shared], dtype=np.int64)
        ib = np.asarray([vb[k] for k in shared], dtype=np.int64)
        cols_a, cols_b = a.columns(ia), b.columns(ib)
        left, right = float(statistic(a.reduction, cols_a)), float(statistic(b.reduction, cols_b))

        def diff(*c):
            return statistic(a.reduction, c[:a.width]) - statistic(b.reduction, c[a.width:]) - offset

        dist = (bootstrap_distribution([*cols_a, *cols_b], diff, n_resamples, seed) if len(shared) >= 2
                else np.array([]))
        n = len(shared)
        return Comparison(left, right, left - right - offset, dist, n, True, n, n)
    ia = np.fromiter(va.values(), dtype=np.int64, count=len(va))
    ib = np.fromiter(vb.values(), dtype=np.int64, count=len(vb))
    cols_a, cols_b = a.columns(ia), b.columns(ib)
    left = float(statistic(a.reduction, cols_a)) if ia.size else math.nan
    right = float(statistic(b.reduction, cols_b)) if ib.size else math.nan
    n = int(min(ia.size, ib.size))
    if n >= 2:
        rng = np.random.default_rng(seed)
        da = bootstrap_distribution(cols_a, lambda *c: statistic(a.reduction, c), n_resamples,
                                    int(rng.integers(2**32)))
        db = bootstrap_distribution(cols_b, lambda *c: statistic(b.reduction, c), n_resamples,
                                    int(rng.integers(2**32)))
        dist = da - db - offset
    else:
        dist = np.array([])
    return Comparison(left, right, left - right - offset, dist, n, False, int(ia.size), int(ib.size))


def holm_levels(p_values: Sequence[float], alpha: float, decided) -> list[float]:
    """Holm's step-down procedure on intervals: the significance level each test is judged at.

    Tests are visited in increasing p; the r-th (1-based) of m is judged at ``alpha / (m - r + 1)``.
    ``decided(i, level)`` says whether test i's interval at confidence ``1 - level`` excludes its null;
    at the first test that is not decided the procedure stops, and it and every later test keep that
    step's level (their intervals, at least as wide, are reported with it)."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: (p_values[i], i))
    levels = [alpha] * m
    stop: float | None = None
    for r, i in enumerate(order, start=1):
        level = stop if stop is not None else alpha / (m - r + 1)
        levels[i] = level
        if stop is None and not decided(i, level):
            stop = level
    return levels


def t_test_power(effect_size: float, n: int, alpha: float) -> float:
    """Power of the two-sided one-sample (or paired) t-test with ``n`` items at standardized effect
    ``effect_size`` = mean / sd (noncentral t, as statsmodels' ``TTestPower``)."""
    from scipy.stats import nct
    from scipy.stats import t as student_t

    df = n - 1
    crit = student_t.ppf(1 - alpha / 2, df)
    nc = effect_size * math.sqrt(n)
    return float(nct.sf(crit, df, nc) + nct.cdf(-crit, df, nc))


def n_for_power(effect_size: float, alpha: float = 0.05, power: float = 0.8, cap: int = 10**7) -> int | None:
    """The smallest number of items for which the two-sided paired t-test at level ``alpha`` has at
    least ``power`` at standardized effect ``effect_size``; None when the effect is 0 (no finite n) or
    the answer exceeds ``cap``."""
    es = abs(float(effect_size))
    if not math.isfinite(es) or es == 0:
        return None
    from scipy.stats import norm

    guess = ((norm.ppf(1 - alpha / 2) + norm.ppf(power)) / es) ** 2  # normal approximation, a lower bound
    n = max(2, int(math.floor(guess)))
    if n > cap:
        return None
    while n > 2 and t_test_power(es, n - 1, alpha) >= power:
        n -= 1
    while t_test_power(es, n, alpha) < power:
        n += 1
        if n > cap:
            return None
    return n


def items_for_power(comparison: Comparison, alpha: float, power: float = 0.8, null: float = 0.0) -> int | None:
    """Items a replication needs for ``power`` at the observed effect: the paired t-test sample size for
    the standardized effect ``diff / (SE * sqrt(n))`` (SE: the bootstrap standard error of ``diff``, so
    ``SE * sqrt(n)`` is the per-item standard deviation of a mean; for a pooled statistic, its analogue),
    the effect measured from ``null`` (a claim's margin)."""
    se = comparison.standard_error()
    if comparison.n < 2 or not math.isfinite(se) or not math.isfinite(comparison.diff):
        return None
    if se == 0:
        return None
    return n_for_power((comparison.diff - null) / (se * math.sqrt(comparison.n)), alpha, power)
