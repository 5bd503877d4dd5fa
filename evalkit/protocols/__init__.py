"""Suite protocols, one module each: attribution fidelity (Task A), seed control, aggregation ablation,
head removal, POS ablation and steering adherence. A protocol is a :class:`Protocol` subclass registered
by name (decorator or the ``evalkit.protocols`` entry point), named by a suite's ``protocol:``."""

from . import aggregation, attribution, head_removal, pos_ablation, seed_control, steering  # noqa: F401
from .base import (
    ENTRY_POINT_GROUP,
    Protocol,
    Scores,
    UnknownProtocolError,
    available_protocols,
    get_protocol,
    register_protocol,
)
from .common import case_masks
from .steering import model_hrv

__all__ = [
    "ENTRY_POINT_GROUP",
    "Protocol",
    "Scores",
    "UnknownProtocolError",
    "available_protocols",
    "case_masks",
    "get_protocol",
    "model_hrv",
    "register_protocol",
]
