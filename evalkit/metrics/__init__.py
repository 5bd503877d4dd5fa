"""Metrics shared by every suite and method: grounding (IoU, DAAM's mIoU80 / mIoU-inf, best over
thresholds, pointing game, relevance mass / rank, top-k intersection), map statistics (specificity,
shift, stability, variance, noise, grounding loss), adherence (CLIP full-prompt / minimum-object
similarity, CLIPScore) and an aesthetic score. See docs/metrics.md for every definition.

Metrics are :class:`Metric` subclasses created by name (``create_metric("miou80", tau=0.4)``), fed one
sample at a time with ``update`` and reduced with ``compute`` to a :class:`MetricResult` (value, 95%
CI, counts, reduction). The math is also available as plain functions on (H, W) arrays/tensors.
open_clip is imported only when a CLIP metric first scores something.
"""

from . import adherence, aesthetic, checker, grounding, localization, mapstats, sensitivity  # noqa: F401
from .adherence import (
    CLIPSCORE_W,
    ClipAdherence,
    ClipFullPromptSimilarity,
    ClipMinObjectSimilarity,
    ClipScore,
    ClipWeightsUnavailableError,
    load_open_clip,
    to_pil_images,
)
from .aesthetic import AestheticHead, AestheticScore, load_aesthetic_head
from .base import (
    PER_SAMPLE,
    POOLED,
    Metric,
    MetricResult,
    MetricUnavailableError,
    mean_ci95,
    pooled_ci95,
    score_map,
    wilson_ci95,
)
from .coco import COCO80_CLASSES, SYNONYMS, coco_class, is_coco_class
from .grounding import (
    DEFAULT_TAU,
    DEFAULT_TAUS,
    IoU,
    MIoU80,
    MIoUBestTau,
    MIoUInf,
    binarize_daam,
)
from .localization import (
    PointingGame,
    RelevanceMass,
    RelevanceRank,
    TopKIntersection,
    pointing_game,
    relevance_mass,
    relevance_rank,
    top_k_intersection,
)
from .mapstats import (
    GroundingLoss,
    Noise,
    Shift,
    Specificity,
    Stability,
    Variance,
    concentration,
    grounding_loss,
    high_frequency_energy,
    js_divergence,
    kl_divergence,
    normalized_entropy,
    pearson,
    run_variance,
    shift,
    specificity,
    stability,
    total_variation,
)
from .masks import iou, iou_counts, polygons_to_mask, rle_iou
from .registry import UnknownMetricError, available_metrics, create_metric, get_metric_class, register_metric
from .rle import decode_rle, encode_rle

__all__ = [
    "score_map",
    "CLIPSCORE_W",
    "COCO80_CLASSES",
    "DEFAULT_TAU",
    "DEFAULT_TAUS",
    "PER_SAMPLE",
    "POOLED",
    "SYNONYMS",
    "AestheticHead",
    "AestheticScore",
    "ClipAdherence",
    "ClipFullPromptSimilarity",
    "ClipMinObjectSimilarity",
    "ClipScore",
    "ClipWeightsUnavailableError",
    "GroundingLoss",
    "IoU",
    "MIoU80",
    "MIoUBestTau",
    "MIoUInf",
    "Metric",
    "MetricResult",
    "MetricUnavailableError",
    "Noise",
    "PointingGame",
    "RelevanceMass",
    "RelevanceRank",
    "Shift",
    "Specificity",
    "Stability",
    "TopKIntersection",
    "UnknownMetricError",
    "Variance",
    "available_metrics",
    "binarize_daam",
    "coco_class",
    "concentration",
    "create_metric",
    "decode_rle",
    "encode_rle",
    "get_metric_class",
    "grounding_loss",
    "high_frequency_energy",
    "iou",
    "iou_counts",
    "is_coco_class",
    "js_divergence",
    "kl_divergence",
    "load_aesthetic_head",
    "load_open_clip",
    "mean_ci95",
    "wilson_ci95",
    "normalized_entropy",
    "pearson",
    "pointing_game",
    "polygons_to_mask",
    "pooled_ci95",
    "register_metric",
    "relevance_mass",
    "relevance_rank",
    "rle_iou",
    "run_variance",
    "shift",
    "specificity",
    "stability",
    "to_pil_images",
    "top_k_intersection",
    "total_variation",
]
