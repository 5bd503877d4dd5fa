"""Map statistics: precise definitions of the terms paper 000 (norm-based attribution) uses loosely in
its ablations (Tables 4, 6, 7): Specificity, Shift, Stability, Variance, Noise and Grounding loss.

The paper describes these in words only ("how concentrated the heatmaps are on the intended token
region", "how strongly attention distributions move under intervention", "consistency across
runs", "run-to-run instability", a qualitative Noise rating, "relative drop vs. baseline"); each
function below fixes one operational definition, stated in its docstring and in docs/metrics.md.
Its numbers are therefore evalkit's, not a reproduction of the paper's.

Unless stated otherwise a map is min-max normalized first (``normalize="minmax"``, as
``Attribution.normalized`` does) and negative values are clipped to 0; an all-zero map is treated
as uniform (it expresses no location).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._inputs import as_map, check_normalize, check_same_shape, prepare, to_distribution, to_numpy
from .base import PER_SAMPLE, POOLED, Metric
from .grounding import DEFAULT_TAU, binarize_daam
from .localization import relevance_mass
from .masks import iou
from .registry import register_metric

DIVERGENCES = ("js", "kl")
STABILITY_MEASURES = ("iou", "pearson")
NOISE_MEASURES = ("tv", "hf")


# ---------------------------------------------------------------------------------------------
# Functions
# ---------------------------------------------------------------------------------------------
def normalized_entropy(heat: Any, normalize: str = "minmax") -> float:
    """Shannon entropy of the map as a distribution over pixels, divided by its maximum ``log(H*W)``:
    0 when all mass is on one pixel, 1 for a uniform (or all-zero) map."""
    a = prepare(as_map(heat), check_normalize(normalize))
    p = to_distribution(a, "heat map")
    if p.size == 1:
        return 0.0
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum() / math.log(p.size))


def concentration(heat: Any, normalize: str = "minmax") -> float:
    """``1 - normalized_entropy(heat)``, in [0, 1]: 1 for a one-pixel map, 0 for a uniform map. A map
    spread evenly over k of N pixels scores ``1 - log(k) / log(N)``."""
    return 1.0 - normalized_entropy(heat, normalize)


def specificity(heat: Any, mask: Any | None = None, normalize: str = "minmax") -> float:
    """Specificity, how concentrated a map is on the intended region, in [0, 1], higher = more specific.

    With a ground-truth ``mask``: the relevance mass, the share of the (min-max normalized) map's
    mass inside the mask (:func:`~evalkit.metrics.relevance_mass`; NaN for an empty mask).
    Without one: the concentration ``1 - H(p) / log(N)`` of the map as a pixel distribution p
    (:func:`concentration`). The two are different quantities and are not comparable.
    """
    if mask is not None:
        return relevance_mass(heat, mask, normalize=normalize)
    return concentration(heat, normalize)


def kl_divergence(p: Any, q: Any, eps: float = 0.0) -> float:
    """``KL(p || q) = sum p log(p / q)`` in nats, after normalizing each input to sum 1 (an all-zero
    input becomes uniform). ``eps`` > 0 is added to every entry of both before normalizing, so a zero
    in q where p > 0 gives a large finite value instead of ``inf``. This is paper 000's Eq. 10 head
    sensitivity when p and q are a head's baseline and intervened token distributions (Eq. 9)."""
    a, b = _pair(p, q)
    if eps > 0:
        a, b = to_distribution(a + eps), to_distribution(b + eps)
    nz = a > 0
    if np.any(b[nz] == 0):
        return math.inf
    return float((a[nz] * np.log(a[nz] / b[nz])).sum())


def js_divergence(p: Any, q: Any, base: float = 2.0) -> float:
    """Jensen-Shannon divergence ``JS = KL(p || m) / 2 + KL(q || m) / 2`` with ``m = (p + q) / 2``,
    after normalizing each input to sum 1 (all-zero -> uniform). In bits by default (``base=2``), so
    it lies in [0, 1]: 0 for identical distributions, 1 for disjoint supports. Symmetric and always
    finite, unlike KL. (scipy's ``jensenshannon`` returns the square root of this.)"""
    a, b = _pair(p, q)
    m = 0.5 * (a + b)

    def kl(x: np.ndarray) -> float:
        nz = x > 0
        return float((x[nz] * np.log(x[nz] / m[nz])).sum())

    return (0.5 * kl(a) + 0.5 * kl(b)) / math.log(base)


def _pair(p: Any, q: Any) -> tuple[np.ndarray, np.ndarray]:
    pa, qa = to_numpy(p), to_numpy(q)
    if pa.shape != qa.shape:
        raise ValueError(
            f"baseline shape {tuple(pa.shape)} does not match intervened shape {tuple(qa.shape)}: compare maps at "
            f"the same size (e.g. attribution.to_image(size=...)) or token distributions over the same tokens"
        )
    return to_distribution(pa, "baseline"), to_distribution(qa, "intervened")


def shift(baseline: Any, intervened: Any, divergence: str = "js") -> float:
    """Shift, how far an intervention moves a distribution: the divergence between the baseline and
    the intervened token distributions (e.g. a head's norm-based token contributions, paper 000
    Eq. 9) or maps (each normalized to sum 1 over pixels). ``divergence="js"`` (default): Jensen-
    Shannon in bits, in [0, 1]. ``"kl"``: ``KL(baseline || intervened)`` in nats, paper 000's Eq. 10."""
    if divergence == "js":
        return js_divergence(baseline, intervened)
    if divergence == "kl":
        return kl_divergence(baseline, intervened)
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")


def pearson(a: Any, b: Any) -> float:
    """Pearson correlation of two maps' pixel values; NaN when either map is constant."""
    x, y = as_map(a, "map"), as_map(b, "map")
    check_same_shape(x, y, "map", "other map")
    x, y = x.ravel() - x.mean(), y.ravel() - y.mean()
    den = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum() / den) if den > 0 else math.nan


def stability(maps: Sequence[Any], measure: str = "iou", tau: float = DEFAULT_TAU) -> float:
    """Stability, agreement of one word's maps across seeds or runs: the mean over all unordered pairs
    of runs of a pairwise agreement, in [0, 1] for IoU (1 = identical masks).

    ``measure="iou"`` (default): IoU of the maps binarized with DAAM's rule at ``tau`` (pairs where
    both masks are empty are skipped; NaN if every pair is). ``"pearson"``: Pearson correlation of
    the pixel values (in [-1, 1]; constant maps make a pair NaN and it is skipped). Needs >= 2 maps.
    """
    if measure not in STABILITY_MEASURES:
        raise ValueError(f"measure must be one of {STABILITY_MEASURES}, got {measure!r}")
    maps = list(maps)
    if len(maps) < 2:
        raise ValueError(f"stability needs at least 2 maps (runs), got {len(maps)}")
    arrays = [as_map(m, f"map {i}") for i, m in enumerate(maps)]
    for i, a in enumerate(arrays[1:], 1):
        check_same_shape(a, arrays[0], f"map {i}", "map 0")
    if measure == "iou":
        masks = [binarize_daam(a, tau) for a in arrays]
        values = [iou(x, y) for x, y in itertools.combinations(masks, 2)]
    else:
        values = [pearson(x, y) for x, y in itertools.combinations(arrays, 2)]
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def run_variance(values: Sequence[float], ddof: int = 1) -> float:
    """Variance, run-to-run spread of a metric: the sample variance (``ddof=1``) of one quantity
    measured over several seeds or runs (e.g. one prompt's specificity under 5 seeds). NaN for fewer
    than ``ddof + 1`` finite values. Lower = more reproducible."""
    x = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if x.size <= ddof:
        return math.nan
    return float(x.var(ddof=ddof))


def total_variation(heat: Any, normalize: str = "minmax") -> float:
    """Noise as total variation: the mean absolute difference between 4-connected neighbour pixels of
    the (min-max normalized) map, ``(sum|dx| + sum|dy|) / (H(W-1) + W(H-1))``, in [0, 1] for a
    normalized map: 0 for a constant map, 1 for a 0/1 checkerboard. Depends on resolution for smooth
    maps (a step edge scores about 1 / (2W)), so compare maps at the same size."""
    a = prepare(as_map(heat), check_normalize(normalize))
    h, w = a.shape
    pairs = h * (w - 1) + w * (h - 1)
    if pairs == 0:
        return 0.0
    return float((np.abs(np.diff(a, axis=1)).sum() + np.abs(np.diff(a, axis=0)).sum()) / pairs)


def high_frequency_energy(heat: Any, cutoff: float = 0.25, normalize: str = "minmax") -> float:
    """Noise as spectral energy: the share of the (mean-removed, min-max normalized) map's power
    spectrum at radial frequencies above ``cutoff`` cycles per pixel (Nyquist = 0.5), in [0, 1]:
    0 for a smooth map, 1 for a checkerboard. A constant map has no power and scores 0."""
    if not 0.0 < cutoff < math.sqrt(0.5):
        raise ValueError(f"cutoff must lie in (0, 0.707) cycles/pixel, got {cutoff}")
    a = prepare(as_map(heat), check_normalize(normalize))
    power = np.abs(np.fft.fft2(a - a.mean())) ** 2
    fy = np.fft.fftfreq(a.shape[0])[:, None]
    fx = np.fft.fftfreq(a.shape[1])[None, :]
    total = power.sum()
    if total <= 0:
        return 0.0
    return float(power[np.hypot(fy, fx) > cutoff].sum() / total)


def grounding_loss(value: float, baseline: float) -> float:
    """Grounding loss, the relative drop of a grounding score versus its baseline:
    ``(baseline - value) / baseline``. 0 = no change, 1 = grounding gone, negative = improvement.
    NaN when the baseline is 0 or either input is NaN. For a higher-is-better score (IoU, specificity)."""
    if not (math.isfinite(value) and math.isfinite(baseline)) or baseline == 0:
        return math.nan
    return (baseline - value) / baseline


# ---------------------------------------------------------------------------------------------
# Metric classes
# ---------------------------------------------------------------------------------------------
@register_metric("specificity")
class Specificity(Metric):
    """Mean :func:`specificity` over maps: relevance mass when masks are given, concentration when not.

    Mixing samples with and without masks in one instance is an error (different quantities);
    ``extra["mode"]`` records which one was used.
    """

    category = "map-statistics"
    direction = "higher"
    summary = "specificity: relevance mass with a mask, 1 - normalized entropy without"
    source = "paper 000 Tables 4-7 (Spec.); definition evalkit's"

    def __init__(self, normalize: str = "minmax") -> None:
        super().__init__()
        self.normalize = check_normalize(normalize)
        self._mode: str | None = None

    def params(self) -> dict[str, Any]:
        return {"normalize": self.normalize}

    def update(self, heat: Any, mask: Any | None = None) -> float:
        """Score one map (optionally against its ground-truth mask)."""
        mode = "relevance-mass" if mask is not None else "concentration"
        if self._mode is not None and mode != self._mode:
            raise ValueError(
                f"specificity was computed as {self._mode} so far; a sample "
                f"{'with' if mask is not None else 'without'} a mask would mix two quantities: "
                f"use one Specificity per mode"
            )
        self._mode = mode
        self._extra["mode"] = mode
        return self._record(specificity(heat, mask, self.normalize),
                            reason="empty ground-truth mask (object not in the image)" if mask is not None else None)

    def reset(self) -> None:
        super().reset()
        self._mode = None


@register_metric("shift")
class Shift(Metric):
    """Mean :func:`shift` (JS divergence by default) between baseline and intervened distributions or maps."""

    category = "map-statistics"
    direction = "higher"
    summary = "shift: JS divergence (bits) between baseline and intervened distributions or maps"
    source = "paper 000 Tables 4, 6 (Shift), Eq. 10 (KL); definition evalkit's"

    def __init__(self, divergence: str = "js") -> None:
        super().__init__()
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
        self.divergence = divergence

    def params(self) -> dict[str, Any]:
        return {"divergence": self.divergence}

    def update(self, baseline: Any, intervened: Any) -> float:
        """Score one (baseline, intervened) pair of token distributions or maps of equal shape."""
        return self._record(shift(baseline, intervened, self.divergence))


@register_metric("stability")
class Stability(Metric):
    """Mean :func:`stability` over samples; one sample is one word's maps from several seeds/runs."""

    category = "map-statistics"
    direction = "higher"
    summary = "stability: mean pairwise IoU (or Pearson r) of one word's maps across seeds/runs"
    source = "paper 000 Table 7 (Stab.); definition evalkit's"

    def __init__(self, measure: str = "iou", tau: float = DEFAULT_TAU) -> None:
        super().__init__()
        if measure not in STABILITY_MEASURES:
            raise ValueError(f"measure must be one of {STABILITY_MEASURES}, got {measure!r}")
        self.measure = measure
        self.tau = float(tau)

    def params(self) -> dict[str, Any]:
        return {"measure": self.measure, "tau": self.tau} if self.measure == "iou" else {"measure": self.measure}

    def update(self, maps: Sequence[Any]) -> float:
        """Score one word's maps across runs (a sequence of >= 2 equal-shape maps)."""
        return self._record(stability(maps, self.measure, self.tau), reason="maps undefined across seeds")


@register_metric("variance")
class Variance(Metric):
    """Mean :func:`run_variance` over samples; one sample is one quantity's values over seeds/runs."""

    category = "map-statistics"
    direction = "lower"
    summary = "variance: sample variance (ddof=1) of a metric across seeds, averaged over samples"
    source = "paper 000 Table 6 (Var.); definition evalkit's"

    def __init__(self, ddof: int = 1) -> None:
        super().__init__()
        self.ddof = int(ddof)

    def params(self) -> dict[str, Any]:
        return {"ddof": self.ddof}

    def update(self, values: Sequence[float]) -> float:
        """Score one sample's values over seeds/runs."""
        return self._record(run_variance(values, self.ddof),
                            reason=f"fewer than {self.ddof + 1} finite values across seeds")


@register_metric("noise")
class Noise(Metric):
    """Mean noise of maps: total variation (default) or high-frequency energy of the normalized map."""

    category = "map-statistics"
    direction = "lower"
    summary = "noise: total variation (mean |neighbour diff|) or high-frequency energy of the normalized map"
    source = "paper 000 Table 7 (qualitative Noise); definition evalkit's"

    def __init__(self, measure: str = "tv", cutoff: float = 0.25, normalize: str = "minmax") -> None:
        super().__init__()
        if measure not in NOISE_MEASURES:
            raise ValueError(f"measure must be one of {NOISE_MEASURES}, got {measure!r}")
        self.measure = measure
        self.cutoff = float(cutoff)
        self.normalize = check_normalize(normalize)

    def params(self) -> dict[str, Any]:
        p: dict[str, Any] = {"measure": self.measure, "normalize": self.normalize}
        if self.measure == "hf":
            p["cutoff"] = self.cutoff
        return p

    def update(self, heat: Any) -> float:
        """Score one map (compare maps at one resolution: TV depends on it)."""
        if self.measure == "tv":
            return self._record(total_variation(heat, self.normalize))
        return self._record(high_frequency_energy(heat, self.cutoff, self.normalize))


@register_metric("grounding-loss")
class GroundingLoss(Metric):
    """Relative drop of a grounding score vs baseline.

    ``reduction="per-sample"`` (default): mean over samples of ``(b_i - v_i) / b_i`` (samples with
    ``b_i = 0`` are NaN, excluded and counted). ``reduction="pooled"``: ``1 - sum v / sum b``, the
    relative drop of the dataset means, which weights samples by their baseline score.
    """

    category = "map-statistics"
    direction = "lower"
    reductions = (PER_SAMPLE, POOLED)
    summary = "grounding loss: relative drop (baseline - value) / baseline of a grounding score"
    source = "paper 000 Table 4 (Loss); definition evalkit's"

    def update(self, value: float, baseline: float) -> float:
        """Score one sample: its grounding score after the intervention and at baseline."""
        loss = grounding_loss(float(value), float(baseline))
        return self._record(loss, float(baseline) - float(value), float(baseline))
