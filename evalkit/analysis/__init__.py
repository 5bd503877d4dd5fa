"""Analyses built on traces and interventions: head sensitivity (KL), POS aggregation, HRV
construction, ordered-weakening curves, and their figures."""

from .hrv_build import build_hrv
from .sensitivity import (
    DEFAULT_EPSILON,
    FUNCTION_POS,
    HeadScores,
    alignment_problem,
    head_sensitivity,
    head_strengths,
    kl_divergence,
    load_spacy,
    pos_groups,
    pos_sensitivity,
    pos_tags,
    try_pos_tags,
)
from .weakening import WeakeningCurves, weakening_curves, weakening_order

__all__ = [
    "DEFAULT_EPSILON",
    "FUNCTION_POS",
    "HeadScores",
    "WeakeningCurves",
    "build_hrv",
    "alignment_problem",
    "head_sensitivity",
    "head_strengths",
    "kl_divergence",
    "load_spacy",
    "pos_groups",
    "pos_sensitivity",
    "pos_tags",
    "try_pos_tags",
    "weakening_curves",
    "weakening_order",
]
