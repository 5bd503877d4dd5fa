"""The metric API every suite and method shares: :class:`Metric` (update one sample, compute, reset)
and :class:`MetricResult` (value, 95% CI, counts, the reduction used, per-sample values).

Why an explicit reduction: a dataset-level IoU can be the mean of per-sample IoUs or the ratio of
pooled intersections to pooled unions, and the two differ (one large object dominates the pooled
number). Every metric therefore declares the reduction it uses, and every result records it.

Why NaN samples are counted, not dropped silently: an undefined sample (for example an empty
ground-truth mask) carries no evidence either way, so it is left out of the mean, but how many were
left out is part of the result (``n_excluded``) so a suite can flag a broken dataset.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..labels import metric_label

PER_SAMPLE = "per-sample"
POOLED = "pooled"
REDUCTIONS = (PER_SAMPLE, POOLED)
DIRECTIONS = ("higher", "lower")
CATEGORIES = ("grounding", "map-statistics", "adherence", "image-quality")

#: Percentile-bootstrap settings for pooled metrics (fixed seed: results are reproducible).
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


class MetricUnavailableError(RuntimeError):
    """A metric cannot run in this configuration (e.g. no weights configured); the message says how to fix it."""


@dataclass
class MetricResult:
    """What :meth:`Metric.compute` returns; plain data, ready to log as JSON via :meth:`to_dict`.

    ``value`` is the reduced number (NaN when no sample was valid); ``ci95`` the 95% confidence
    interval ``(low, high)`` or None (fewer than two valid samples); ``n`` the number of valid samples
    that entered ``value``; ``n_excluded`` the number of samples whose value was NaN (undefined) and
    were left out; ``per_sample`` every sample's value in update order, NaNs included, and ``keys`` the
    item key of each (see :meth:`Metric.set_items`; claims pair rows on them); ``reasons`` says why each
    excluded item was left out; ``numerators``/``denominators`` are each sample's parts of a pooled
    value (NaN for an excluded sample; empty for per-sample metrics). ``params`` are the metric's
    parameters, ``extra`` metric-specific details (e.g. the threshold chosen).
    """

    name: str
    value: float
    ci95: tuple[float, float] | None
    n: int
    n_excluded: int
    direction: str
    reduction: str
    category: str = ""
    per_sample: list[float] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    numerators: list[float] = field(default_factory=list)
    denominators: list[float] = field(default_factory=list)

    def reason_counts(self) -> dict[str, int]:
        """Excluded items per reason, most frequent first."""
        return dict(Counter(self.reasons.values()).most_common())

    def item_keys(self) -> list[str]:
        """``keys``, or positional keys ``#0, #1, ...`` for samples recorded without one."""
        return self.keys if len(self.keys) == len(self.per_sample) else [f"#{i}" for i in range(len(self.per_sample))]

    @property
    def label(self) -> str:
        """``name`` plus its parameters, e.g. ``miou80_tau0.4`` (:func:`evalkit.labels.metric_label`)."""
        return metric_label(self.name, self.params)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN stays float NaN; tuples become lists)."""
        d = asdict(self)
        d["ci95"] = list(self.ci95) if self.ci95 is not None else None
        d["label"] = self.label
        return d

    def __str__(self) -> str:
        ci = f" [{self.ci95[0]:.4f}, {self.ci95[1]:.4f}]" if self.ci95 else ""
        arrow = "↑" if self.direction == "higher" else "↓"
        return f"{self.label} {arrow} = {self.value:.4f}{ci} (n={self.n}, excluded={self.n_excluded}, {self.reduction})"


def mean_ci95(values: Sequence[float]) -> tuple[float, tuple[float, float] | None]:
    """Mean of the finite ``values`` and its two-sided 95% confidence interval.

    CI = mean ± t(0.975, n-1) · s / sqrt(n), with s the sample standard deviation (ddof=1). None for
    n < 2. (DAAM's own evaluator prints 1.96 · population std / sqrt(n); the t-interval is slightly
    wider for small n and equal in the limit.) When every value is 0 or 1 (hit rates: pointing game,
    all-objects-present) the mean is a proportion and the CI is the Wilson score interval, which stays
    inside [0, 1] and keeps its coverage at small n. Non-finite values are ignored.
    """
    x = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if x.size == 0:
        return math.nan, None
    mean = float(x.mean())
    if x.size < 2:
        return mean, None
    if np.isin(x, (0.0, 1.0)).all():
        return mean, wilson_ci95(int(x.sum()), int(x.size))
    from scipy.stats import t as student_t

    half = float(student_t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, (mean - half, mean + half)


def wilson_ci95(successes: int, n: int) -> tuple[float, float]:
    """Wilson score 95% interval of a proportion ``successes / n`` (z = 1.959964)."""
    z = 1.959963984540054
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def pooled_ci95(
    numerators: Sequence[float],
    denominators: Sequence[float],
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, tuple[float, float] | None]:
    """Pooled ratio ``sum(num) / sum(den)`` and its 95% percentile-bootstrap CI over samples.

    Samples (pairs ``(num_i, den_i)``) are resampled with replacement ``n_resamples`` times with a
    fixed-seed numpy generator; the CI is the 2.5th and 97.5th percentile of the resampled ratios
    (resamples whose denominator sums to 0 are dropped). None for fewer than two samples.
    """
    num = np.asarray(numerators, dtype=np.float64)
    den = np.asarray(denominators, dtype=np.float64)
    if num.size == 0 or den.sum() == 0:
        return math.nan, None
    value = float(num.sum() / den.sum())
    if num.size < 2:
        return value, None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, num.size, size=(n_resamples, num.size))
    d = den[idx].sum(1)
    ok = d > 0
    ratios = num[idx].sum(1)[ok] / d[ok]
    if ratios.size == 0:
        return value, None
    low, high = np.percentile(ratios, [2.5, 97.5])
    return value, (float(low), float(high))


class Metric:
    """Base class of evalkit metrics, in the torchmetrics style: ``update`` per sample, ``compute``, ``reset``.

    Subclasses set the class attributes below (``name`` is set by
    :func:`~evalkit.metrics.register_metric`) and implement ``update(...)``, which computes one
    sample's value and records it with :meth:`_record`; :meth:`compute` does the reduction.

    - ``direction``: "higher" or "lower" is better.
    - ``category``: "grounding", "map-statistics", "adherence" or "image-quality".
    - ``reduction``: the default reduction; "per-sample" (one value per sample, then the mean with a
      Student-t 95% CI, see :func:`mean_ci95`) or "pooled" (ratio of summed numerators and
      denominators over the dataset, with a fixed-seed percentile-bootstrap 95% CI, see
      :func:`pooled_ci95`). ``reductions`` lists what a metric supports; pass ``reduction=`` to choose.
    - ``summary`` (one line) and ``source`` (paper or reference) feed :func:`available_metrics`.

    A sample whose value is NaN (undefined, e.g. an empty ground-truth mask) is kept in
    ``per_sample`` but excluded from the value and counted in ``n_excluded``, with its reason.

    Item keys: a caller names the item(s) the next sample(s) belong to with :meth:`set_items` (e.g.
    ``"scene-3/s0/circle"``); :meth:`exclude` records an item that never reached the metric (no mask,
    word not steerable, ...) as an excluded sample with its reason.
    """

    name: ClassVar[str] = ""
    direction: ClassVar[str] = "higher"
    category: ClassVar[str] = ""
    reduction: str = PER_SAMPLE
    reductions: ClassVar[tuple[str, ...]] = (PER_SAMPLE,)
    summary: ClassVar[str] = ""
    source: ClassVar[str] = ""

    def __init__(self, reduction: str | None = None) -> None:
        if reduction is not None:
            if reduction not in self.reductions:
                raise ValueError(
                    f"metric {self.name!r} supports reduction(s) {list(self.reductions)}, got {reduction!r}"
                )
            self.reduction = reduction
        self._values: list[float] = []
        self._nums: list[float] = []
        self._dens: list[float] = []
        self._extra: dict[str, Any] = {}
        self._keys: list[str] = []
        self._reasons: dict[str, str] = {}
        self._pending: deque[str] = deque()

    # -- subclass API -------------------------------------------------------------------------
    def update(self, *args: Any, **kwargs: Any) -> float:
        """Score one sample, record it, and return its value (NaN if undefined)."""
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """The metric's parameters (logged with every result)."""
        return {}

    def unavailable_reason(self) -> str | None:
        """Why this metric cannot run as configured (a suite skips it with this message), or None."""
        return None

    def set_items(self, keys: str | Sequence[str]) -> None:
        """Name the item(s) the next recorded sample(s) belong to, in order (replaces unused names)."""
        self._pending = deque([keys] if isinstance(keys, str) else keys)

    def exclude(self, key: str, reason: str) -> float:
        """Record item ``key`` as excluded (NaN) because of ``reason``; returns NaN."""
        self.set_items(key)
        return self._record(math.nan, math.nan, math.nan, reason=reason)

    def _record(self, value: float, numerator: float | None = None, denominator: float | None = None,
                reason: str | None = None) -> float:
        """Store one sample's value and, for pooled metrics, its numerator and denominator; a NaN
        value is excluded with ``reason`` (default: the metric's value is undefined)."""
        value = float(value)
        key = self._pending.popleft() if self._pending else f"#{len(self._values)}"
        self._values.append(value)
        self._keys.append(key)
        if not math.isfinite(value):
            self._reasons[key] = reason or f"{self.name} undefined (NaN)"
        if self.reduction == POOLED:
            if math.isfinite(value) and (numerator is None or denominator is None):
                raise TypeError(f"metric {self.name!r} is pooled but recorded a sample without numerator/denominator")
            ok = math.isfinite(value)
            self._nums.append(float(numerator) if ok else math.nan)
            self._dens.append(float(denominator) if ok else math.nan)
        return value

    # -- public API ---------------------------------------------------------------------------
    def record(self, value: float, reason: str | None = None) -> float:
        """Record a value derived elsewhere (e.g. a protocol's per-head mean) as one sample of a mean-
        reduced metric; NaN is excluded with ``reason``."""
        return self._record(value, reason=reason)

    def compute(self) -> MetricResult:
        """Reduce the recorded samples to a :class:`MetricResult` (does not reset)."""
        reason = self.unavailable_reason()
        if reason is not None:
            raise MetricUnavailableError(f"metric {self.name!r} is unavailable: {reason}")
        finite = [v for v in self._values if math.isfinite(v)]
        params = self.params()
        if self.reduction != type(self).reduction:  # a non-default reduction is part of the label
            params["reduction"] = self.reduction
        if self.reduction == POOLED:
            ok = [i for i, v in enumerate(self._values) if math.isfinite(v)]
            value, ci = pooled_ci95([self._nums[i] for i in ok], [self._dens[i] for i in ok])
        else:
            value, ci = mean_ci95(finite)
        return MetricResult(
            name=self.name,
            value=value,
            ci95=ci,
            n=len(finite),
            n_excluded=len(self._values) - len(finite),
            direction=self.direction,
            reduction=self.reduction,
            category=self.category,
            per_sample=list(self._values),
            params=params,
            extra=self._compute_extra(),
            keys=list(self._keys),
            reasons=dict(self._reasons),
            numerators=list(self._nums) if self.reduction == POOLED else [],
            denominators=list(self._dens) if self.reduction == POOLED else [],
        )

    def _compute_extra(self) -> dict[str, Any]:
        """Metric-specific details for :attr:`MetricResult.extra` (override to add more)."""
        return dict(self._extra)

    def reset(self) -> None:
        """Forget every recorded sample."""
        self._values.clear()
        self._nums.clear()
        self._dens.clear()
        self._extra.clear()
        self._keys.clear()
        self._reasons.clear()
        self._pending.clear()

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({params}) <{self.name}, {self.direction}, {self.reduction}, n={len(self)}>"


@functools.cache
def _update_params(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.update).parameters)


def score_map(metric: Metric, heat: Any, mask: Any, word: str, key: str | None = None) -> float:
    """Feed one (map, mask, word) sample to a single-map metric, passing only what its ``update`` takes;
    ``key`` names the item (see :func:`evalkit.items.item_key`)."""
    if key is not None:
        metric.set_items(key)
    params = _update_params(type(metric))
    if "heat" not in params:
        raise ValueError(f"metric {metric.name!r} does not score single attribution maps; "
                         "it belongs to another suite protocol")
    kwargs: dict[str, Any] = {}
    if "mask" in params:
        kwargs["mask"] = mask
    if "word" in params:
        kwargs["word"] = word
    return metric.update(heat, **kwargs)
