"""Attribution methods: the base API, the registry, and the built-in methods."""

from . import aggregation, concept_attention, daam, hrv, norm, raw_attn  # noqa: F401  (registers the built-ins)
from .aggregation import NormHeadsOnly, NormTimestepsOnly
from .base import Attribution, AttributionMethod, aggregate
from .concept_attention import ConceptAttention
from .daam import DAAM
from .hrv import SHIPPED_HRVS, HeadRelevance, HRVSelective, hrv_for_model
from .norm import NormAttribution, SquaredNormAttribution, head_strengths
from .raw_attn import RawAttn
from .registry import (
    UnknownMethodError,
    available_methods,
    create_method,
    get_method_class,
    register_method,
)

__all__ = [
    "DAAM",
    "Attribution",
    "AttributionMethod",
    "ConceptAttention",
    "HRVSelective",
    "HeadRelevance",
    "NormAttribution",
    "NormHeadsOnly",
    "NormTimestepsOnly",
    "RawAttn",
    "SHIPPED_HRVS",
    "SquaredNormAttribution",
    "UnknownMethodError",
    "aggregate",
    "available_methods",
    "create_method",
    "get_method_class",
    "head_strengths",
    "hrv_for_model",
    "register_method",
]
