"""Continuous-map localization (XAI localization literature): pointing game, relevance mass, relevance
rank accuracy and top-k intersection. A sample is one (map, mask) pair of the same (H, W) shape; an empty
mask is undefined (NaN, excluded and counted)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._inputs import as_map, as_mask, check_normalize, check_same_shape, prepare
from .base import Metric
from .grounding import EMPTY_MASK
from .registry import register_metric

#: Pointing-game tolerance of Zhang et al. (2016, "Top-down neural attention by excitation backprop").
DEFAULT_TOLERANCE_PX = 15


def _map_and_mask(heat: Any, mask: Any) -> tuple[np.ndarray, np.ndarray]:
    """The map and the mask as arrays, checked to have the same shape."""
    h = as_map(heat)
    m = as_mask(mask, "ground-truth mask")
    check_same_shape(h, m)
    return h, m


def pointing_game(heat: Any, mask: Any, tolerance_px: float = DEFAULT_TOLERANCE_PX) -> float:
    """Pointing game (Zhang et al. 2016): 1 if the map's maximum lies within ``tolerance_px`` pixels
    (Euclidean) of the mask, else 0. NaN for an empty mask.

    Ties: if several pixels share the maximum (a constant or all-zero map ties everywhere), the value
    is the fraction of tied maxima that hit, i.e. the expected hit under uniform random tie-breaking;
    an all-zero map therefore scores the chance level of its (dilated) mask area, not a hit.
    """
    h, m = _map_and_mask(heat, mask)
    if not m.any():
        return math.nan
    peaks = h == h.max()
    if tolerance_px > 0:
        from scipy.ndimage import distance_transform_edt

        near = distance_transform_edt(~m) <= tolerance_px
    else:
        near = m
    return float(np.count_nonzero(peaks & near) / np.count_nonzero(peaks))


def relevance_mass(heat: Any, mask: Any, normalize: str = "none") -> float:
    """Relevance mass accuracy (Arras et al. 2022, CLEVR-XAI): the share of the map's (non-negative)
    mass inside the mask, ``sum(heat * mask) / sum(heat)``, in [0, 1]. NaN for an empty mask.

    Negative values are clipped to 0 (relevance is mass). ``normalize="minmax"`` first min-max
    normalizes the map, removing the additive floor that attention maps carry. An all-zero map has
    no preferred location and is treated as uniform: its value is ``|mask| / (H * W)`` (chance).
    """
    h, m = _map_and_mask(heat, mask)
    if not m.any():
        return math.nan
    p = prepare(h, check_normalize(normalize))
    total = p.sum()
    if total == 0:
        return float(m.mean())
    return float(p[m].sum() / total)


def _expected_topk_hits(h: np.ndarray, m: np.ndarray, k: int) -> float:
    """Expected number of mask pixels among the ``k`` highest-valued pixels, ties broken uniformly at random."""
    flat, hits = h.ravel(), m.ravel()
    kth = np.partition(flat, flat.size - k)[flat.size - k]  # the k-th largest value
    above = flat > kth
    tied = flat == kth
    n_above = int(np.count_nonzero(above))
    return float(
        np.count_nonzero(above & hits) + (k - n_above) * np.count_nonzero(tied & hits) / np.count_nonzero(tied)
    )


def relevance_rank(heat: Any, mask: Any) -> float:
    """Relevance rank accuracy (Arras et al. 2022): with K = |mask|, the share of the K highest-valued
    pixels that lie in the mask, in [0, 1]. NaN for an empty mask. Ties at the K-th value count
    fractionally (expected value under random tie-breaking), so a constant map scores K / (H * W).
    """
    h, m = _map_and_mask(heat, mask)
    k = int(np.count_nonzero(m))
    if k == 0:
        return math.nan
    return _expected_topk_hits(h, m, k) / k


def top_k_intersection(heat: Any, mask: Any, k: int | float = 0.05) -> float:
    """Top-k intersection (Theiner et al. 2022; Quantus ``TopKIntersection``): the share of the ``k``
    highest-valued pixels that lie in the mask, in [0, 1]. ``k`` is a pixel count (int) or a fraction
    of the image (float in (0, 1]). NaN for an empty mask; ties count fractionally as in
    :func:`relevance_rank`.
    """
    h, m = _map_and_mask(heat, mask)
    if not m.any():
        return math.nan
    kk = _k_pixels(k, h.size)
    return _expected_topk_hits(h, m, kk) / kk


def _k_pixels(k: int | float, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | float):
        raise TypeError(f"k must be an int (pixels) or a float fraction, got {k!r}")
    if isinstance(k, float):
        if not 0.0 < k <= 1.0:
            raise ValueError(f"k as a fraction must lie in (0, 1], got {k}")
        return max(1, round(k * n))
    if not 1 <= k <= n:
        raise ValueError(f"k={k} pixels must lie in [1, {n}] (the map's pixel count)")
    return k


# ---------------------------------------------------------------------------------------------
# Metric classes
# ---------------------------------------------------------------------------------------------
#: Why a grounding sample is excluded (reasons shown with n_excluded in tables and reports).


class _ContinuousLocalization(Metric):
    """Shared machinery of the continuous-map metrics: one function of (heat, mask) per sample."""

    category = "grounding"
    direction = "higher"

    def _score(self, heat: Any, mask: Any) -> float:
        raise NotImplementedError

    def update(self, heat: Any, mask: Any, word: str | None = None) -> float:
        """Score one (continuous map, mask) pair; NaN for an empty mask (excluded and counted)."""
        return self._record(self._score(heat, mask), reason=EMPTY_MASK)


@register_metric("pointing-game")
class PointingGame(_ContinuousLocalization):
    """Hit rate of the map's maximum on the mask within ``tolerance_px`` (see :func:`pointing_game`)."""

    summary = "pointing game: does the map's maximum fall on the mask (within tolerance_px)"
    source = "Zhang et al. 2016 (excitation backprop)"

    def __init__(self, tolerance_px: float = DEFAULT_TOLERANCE_PX) -> None:
        super().__init__()
        if tolerance_px < 0:
            raise ValueError(f"tolerance_px must be >= 0, got {tolerance_px}")
        self.tolerance_px = tolerance_px

    def params(self) -> dict[str, Any]:
        return {"tolerance_px": self.tolerance_px}

    def _score(self, heat: Any, mask: Any) -> float:
        return pointing_game(heat, mask, self.tolerance_px)


@register_metric("relevance-mass")
class RelevanceMass(_ContinuousLocalization):
    """Share of the map's mass inside the mask (see :func:`relevance_mass`).

    Default ``normalize="minmax"``: cross-attention maps carry a method-specific additive floor
    (softmax spreads mass over all tokens), so raw mass mostly measures the floor; min-max
    normalization (evalkit's view of a map, as in ``Attribution.normalized``) makes methods comparable.
    """

    summary = "relevance mass: share of the (min-max normalized) map's mass inside the mask"
    source = "Arras et al. 2022 (CLEVR-XAI)"

    def __init__(self, normalize: str = "minmax") -> None:
        super().__init__()
        self.normalize = check_normalize(normalize)

    def params(self) -> dict[str, Any]:
        return {"normalize": self.normalize}

    def _score(self, heat: Any, mask: Any) -> float:
        return relevance_mass(heat, mask, self.normalize)


@register_metric("relevance-rank")
class RelevanceRank(_ContinuousLocalization):
    """Share of the |mask| highest-valued pixels inside the mask (see :func:`relevance_rank`)."""

    summary = "relevance rank accuracy: share of the top-|mask| pixels inside the mask"
    source = "Arras et al. 2022 (CLEVR-XAI)"

    def _score(self, heat: Any, mask: Any) -> float:
        return relevance_rank(heat, mask)


@register_metric("top-k-intersection")
class TopKIntersection(_ContinuousLocalization):
    """Share of the top-``k`` pixels inside the mask (see :func:`top_k_intersection`)."""

    summary = "top-k intersection: share of the k highest-valued pixels inside the mask"
    source = "Theiner et al. 2022; Quantus TopKIntersection"

    def __init__(self, k: int | float = 0.05) -> None:
        super().__init__()
        _k_pixels(k, 10**12)  # validate early
        self.k = k

    def params(self) -> dict[str, Any]:
        return {"k": self.k}

    def _score(self, heat: Any, mask: Any) -> float:
        return top_k_intersection(heat, mask, self.k)
