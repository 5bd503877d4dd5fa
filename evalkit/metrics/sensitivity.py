"""Avg. KL (paper 000 Tables 5-6): the mean head sensitivity S(h, i) of a token removal."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .base import Metric
from .registry import register_metric


@register_metric("avg-kl")
class AvgKL(Metric):
    """Avg. KL (paper 000 Tables 5-6): one sample is one removed word's S(h, i) over all heads; its value
    is their mean (nats). Reduced as the mean over samples with a Student-t 95% CI."""

    category = "map-statistics"
    direction = "higher"
    summary = "avg-kl: mean over heads of the head sensitivity S(h, i) of a token removal (nats)"
    source = "paper 000 Eq. 10, Tables 5-6"

    def update(self, scores: Any) -> float:
        """Score one removal: ``scores`` is a HeadScores or an array of per-head S(h, i)."""
        values = scores.values if isinstance(getattr(scores, "values", None), list) else [scores]
        arr = np.concatenate([np.ravel(np.asarray(v, dtype=np.float64)) for v in values])
        arr = arr[np.isfinite(arr)]
        return self._record(float(arr.mean()) if arr.size else math.nan, reason="no finite head sensitivity")
