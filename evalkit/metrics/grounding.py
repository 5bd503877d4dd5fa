"""Grounding metrics: does a word's attribution map land on the word's ground-truth mask?

Binary (thresholded) maps: IoU at a threshold, DAAM's mIoU80 and mIoU-inf (paper 003, sec. 3.1),
and the best-over-thresholds reading of paper 000. Continuous maps: :mod:`evalkit.metrics.localization`.

A sample is one (map, mask) pair, i.e. one word of one image. All functions take (H, W) torch
tensors or numpy arrays of the same shape; a shape mismatch is a ValueError saying how to resize.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ._inputs import as_map, as_mask, check_same_shape, minmax
from .base import PER_SAMPLE, POOLED, Metric, MetricResult, mean_ci95
from .coco import MATCH_RULES, coco_class
from .masks import iou_counts
from .registry import register_metric

#: DAAM's thresholds (paper 003, sec. 3.1: tau in {0.3, 0.4, 0.5}; 0.4 was best on every split).
DEFAULT_TAUS: tuple[float, ...] = (0.3, 0.4, 0.5)
DEFAULT_TAU = 0.4

Binarizer = Callable[[np.ndarray, float], np.ndarray]


# ---------------------------------------------------------------------------------------------
# Binarization
# ---------------------------------------------------------------------------------------------
def binarize_daam(heat: Any, tau: float) -> np.ndarray:
    """DAAM's rule (its code and :meth:`evalkit.methods.Attribution.binarize`): min-max normalize with
    a 1e-8 guard, then ``> tau``. A constant (e.g. all-zero) map gives an empty mask.

    (Paper 003's Eq. 7 writes ``D >= tau * max D`` without subtracting the minimum; evalkit follows
    the released code, which the ``daam`` method reproduces numerically.)
    """
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"threshold tau={tau} must lie in [0, 1]")
    return minmax(as_map(heat)) > tau


BINARIZERS: dict[str, Binarizer] = {"daam": binarize_daam}


def _binarizer(binarize: str | Binarizer) -> Binarizer:
    if callable(binarize):
        return binarize
    if binarize not in BINARIZERS:
        raise ValueError(f"unknown binarization rule {binarize!r}; known: {sorted(BINARIZERS)} or a callable")
    return BINARIZERS[binarize]


def _predicted_mask(heat: Any, tau: float, binarize: Binarizer) -> np.ndarray:
    """A bool map is taken as already binarized (by the method's own rule); a float map is binarized."""
    if getattr(heat, "dtype", None) is not None and str(heat.dtype) in ("bool", "torch.bool"):
        return as_mask(heat, "predicted mask")
    return np.asarray(binarize(as_map(heat), tau), dtype=bool)


EMPTY_MASK = "empty ground-truth mask (object not in the image)"
NOT_COCO = "word is not a COCO-80 class"

class _ThresholdIoU(Metric):
    """Shared machinery: binarize a map at ``tau``, IoU against the mask, optional COCO restriction."""

    category = "grounding"
    direction = "higher"
    vocabulary = "all"  # "all" or "coco80"

    match = "exact"

    def __init__(
        self, tau: float = DEFAULT_TAU, binarize: str | Binarizer = "daam", reduction: str | None = None
    ) -> None:
        super().__init__(reduction)
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"threshold tau={tau} must lie in [0, 1]")
        self.tau = float(tau)
        self.binarize = binarize
        self._binarize = _binarizer(binarize)
        self._skipped_words: list[str] = []

    def params(self) -> dict[str, Any]:
        p: dict[str, Any] = {"tau": self.tau}
        if not isinstance(self.binarize, str) or self.binarize != "daam":
            p["binarize"] = getattr(self.binarize, "__name__", repr(self.binarize))
        if self.vocabulary == "coco80":
            p["match"] = self.match
        return p

    def _in_vocabulary(self, word: str | None) -> bool:
        if self.vocabulary == "all":
            return True
        if word is None:
            raise ValueError(f"metric {self.name!r} restricts to COCO classes: pass word=... with each sample")
        if coco_class(word, self.match) is None:
            self._skipped_words.append(word)
            return False
        return True

    def update(self, heat: Any, mask: Any, word: str | None = None) -> float:
        """Score one (map, mask) pair: ``heat`` is a float map (binarized here at ``tau``) or a bool
        mask already binarized by the method; ``mask`` the ground truth (array or COCO RLE).
        Returns the IoU, NaN for an empty ground-truth mask (excluded and counted), or NaN without
        recording anything when ``word`` is outside the vocabulary (counted in ``extra``)."""
        if not self._in_vocabulary(word):
            return self._record(math.nan, reason=NOT_COCO)
        g = as_mask(mask, "ground-truth mask")
        p = _predicted_mask(heat, self.tau, self._binarize)
        check_same_shape(p, g)
        inter, union = iou_counts(p, g)
        if not g.any():
            return self._record(math.nan, 0, 0, reason=EMPTY_MASK)
        return self._record(inter / union, inter, union)

    def _compute_extra(self) -> dict[str, Any]:
        extra = super()._compute_extra()
        if self.vocabulary == "coco80":
            extra["n_not_coco"] = len(self._skipped_words)
            extra["not_coco_words"] = sorted(set(self._skipped_words))
        return extra

    def reset(self) -> None:
        super().reset()
        self._skipped_words.clear()


@register_metric("iou")
class IoU(_ThresholdIoU):
    """IoU of the map binarized at ``tau`` against the mask, over all words.

    ``reduction="per-sample"`` (default): mean of per-pair IoUs, with a t-interval CI.
    ``reduction="pooled"``: sum of intersections / sum of unions over all pairs (cumulative IoU),
    with a bootstrap CI; large objects weigh more, so it is usually higher than the per-pair mean.
    """

    reductions = (PER_SAMPLE, POOLED)
    summary = "IoU of the tau-binarized map vs the mask (per-pair mean, or pooled sum I / sum U)"
    source = "paper 003 sec. 3.1 (binarization Eq. 7 / daam code)"


@register_metric("miou80")
class MIoU80(_ThresholdIoU):
    """DAAM's mIoU80 (paper 003, sec. 3.1): the mean over (prediction, ground-truth mask) pairs of
    the IoU at one threshold ``tau``, restricted to pairs whose word names one of the 80 COCO
    classes (rule ``match``, default exact as DAAM's evaluator). Other words are skipped, not scored,
    and reported in ``extra["n_not_coco"]``. DAAM reports one number per tau (DAAM-0.3/0.4/0.5)."""

    vocabulary = "coco80"
    summary = "DAAM mIoU80: mean per-pair IoU at tau over words naming a COCO class"
    source = "paper 003 sec. 3.1, Table 1"

    def __init__(self, tau: float = DEFAULT_TAU, binarize: str | Binarizer = "daam", match: str = "exact") -> None:
        super().__init__(tau, binarize)
        if match not in MATCH_RULES:
            raise ValueError(f"match must be one of {MATCH_RULES}, got {match!r}")
        self.match = match


@register_metric("miou-inf")
class MIoUInf(_ThresholdIoU):
    """DAAM's mIoU-inf (paper 003, sec. 3.1): the mean per-pair IoU at ``tau`` without the class
    restriction (every ground-truth noun). Not a best-over-thresholds number: see ``miou-best-tau``."""

    summary = "DAAM mIoU-inf: mean per-pair IoU at tau over all words (no class restriction)"
    source = "paper 003 sec. 3.1, Table 1"

    def __init__(self, tau: float = DEFAULT_TAU, binarize: str | Binarizer = "daam") -> None:
        super().__init__(tau, binarize)


@register_metric("miou-best-tau")
class MIoUBestTau(Metric):
    """Best over thresholds, paper 000's reading of its Table 1 ("the best IoU across thresholds (an
    upper envelope)"). Kept apart from ``miou-inf`` because DAAM defines mIoU-inf differently.

    ``select="per-sample"`` (default, the upper envelope): each pair scores ``max_tau IoU_tau`` and the
    value is their mean. ``select="dataset"``: the single ``tau`` with the highest mean IoU is chosen
    for the whole dataset (reported in ``extra["best_tau"]``, every tau's mean in ``extra["per_tau"]``);
    its per-pair IoUs give the CI, ignoring the selection. Per-sample >= dataset always.
    ``vocabulary="coco80"`` restricts words as ``miou80`` does.
    """

    category = "grounding"
    direction = "higher"
    summary = "best IoU over thresholds (per-pair max, or best single tau for the dataset)"
    source = "paper 000 sec. 4.1, Table 1"

    def __init__(
        self,
        taus: Sequence[float] = DEFAULT_TAUS,
        select: str = "per-sample",
        vocabulary: str = "all",
        match: str = "exact",
        binarize: str | Binarizer = "daam",
    ) -> None:
        super().__init__()
        if select not in ("per-sample", "dataset"):
            raise ValueError(f"select must be 'per-sample' or 'dataset', got {select!r}")
        if vocabulary not in ("all", "coco80"):
            raise ValueError(f"vocabulary must be 'all' or 'coco80', got {vocabulary!r}")
        if match not in MATCH_RULES:
            raise ValueError(f"match must be one of {MATCH_RULES}, got {match!r}")
        self.taus = tuple(float(t) for t in taus)
        if not self.taus or not all(0.0 <= t <= 1.0 for t in self.taus):
            raise ValueError(f"taus must be a non-empty sequence in [0, 1], got {taus!r}")
        self.select = select
        self.vocabulary = vocabulary
        self.match = match
        self.binarize = binarize
        self._binarize = _binarizer(binarize)
        self._per_tau: list[list[float]] = []
        self._n_not_coco = 0

    def params(self) -> dict[str, Any]:
        p: dict[str, Any] = {"taus": list(self.taus), "select": self.select, "vocabulary": self.vocabulary}
        if self.vocabulary == "coco80":
            p["match"] = self.match
        return p

    def update(self, heat: Any, mask: Any, word: str | None = None) -> float:
        """Score one (continuous map, mask) pair at every tau; returns the best IoU (NaN for an empty mask)."""
        if self.vocabulary == "coco80":
            if word is None:
                raise ValueError("vocabulary='coco80' needs word=... with each sample")
            if coco_class(word, self.match) is None:
                self._n_not_coco += 1
                self._per_tau.append([math.nan] * len(self.taus))
                return self._record(math.nan, reason=NOT_COCO)
        g = as_mask(mask, "ground-truth mask")
        ious = []
        for tau in self.taus:
            p = _predicted_mask(heat, tau, self._binarize)
            check_same_shape(p, g)
            inter, union = iou_counts(p, g)
            ious.append(inter / union if g.any() else math.nan)
        self._per_tau.append(ious)
        return self._record(max(ious) if g.any() else math.nan, reason=EMPTY_MASK)

    def compute(self) -> MetricResult:
        """As :meth:`Metric.compute`; with ``select="dataset"`` the value is the best single tau's mean."""
        result = super().compute()
        if self.select == "dataset" and self._per_tau:
            table = np.asarray(self._per_tau, dtype=np.float64)  # (samples, taus)
            means = [mean_ci95(table[:, j].tolist())[0] for j in range(len(self.taus))]
            best = int(np.nanargmax(means)) if not all(math.isnan(v) for v in means) else 0
            column = table[:, best].tolist()
            result.value, result.ci95 = mean_ci95(column)
            result.per_sample = column
            result.extra["best_tau"] = self.taus[best]
            result.extra["per_tau"] = dict(zip(self.taus, means))
        if self.vocabulary == "coco80":
            result.extra["n_not_coco"] = self._n_not_coco
        return result

    def reset(self) -> None:
        super().reset()
        self._per_tau.clear()
        self._n_not_coco = 0
