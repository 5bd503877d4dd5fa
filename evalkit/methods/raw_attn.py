"""Raw cross-attention probabilities, averaged with no selection: the plainest baseline."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..trace import Trace
from .base import AttributionMethod, aggregate
from .registry import register_method


@register_method("raw-attn")
class RawAttn(AttributionMethod):
    """RawAttn: plain mean of attention probabilities over all attn2 layers (mid block and the
    lowest resolution included), all heads and all steps; each (layer, head) map is resized to
    the latent grid with bilinear interpolation; no clamping (bilinear cannot undershoot).
    To image size: bilinear. Binarization: min-max normalize, then > tau."""

    needs = frozenset({"attn"})
    summary = "RawAttn: mean attention probability over all attn2 layers, heads and steps (bilinear)"
    upsample = "bilinear"

    def token_maps(self, trace: Trace, positions: Sequence[int]) -> torch.Tensor:
        return aggregate(trace, "attn", positions, mode="bilinear", clamp=False, time="mean")
