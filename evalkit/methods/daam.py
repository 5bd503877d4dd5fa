"""DAAM (Tang et al., 2023; paper 003), reproducing castorini's ``daam`` 0.2.0."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..trace import LayerInfo, Trace
from .base import AttributionMethod, aggregate
from .registry import register_method


def daam_layers(layer: LayerInfo, latent_hw: tuple[int, int]) -> bool:
    """DAAM's layer rule: attn2 of down and up blocks (no mid block), without maps whose side is
    1/8 of the latent side. On an MM-DiT (places ``joint``, ``double``, ``single``) every layer runs on the
    same patch grid and none is a bottleneck, so every joint-attention layer counts."""
    if layer.place in ("joint", "double", "single"):
        return True
    return layer.place in ("down", "up") and layer.downsample != 8


@register_method("daam")
class DAAM(AttributionMethod):
    """DAAM: for each attn2 layer of the down and up blocks (mid block excluded; layers whose map
    side is 1/8 of the latent side excluded), each head's attention map of a token is summed over
    all denoising steps (conditional half of CFG), resized to the latent grid with bicubic
    interpolation and clamped at 0; the maps are averaged over all (layer, head) pairs; a word's
    map is the mean over its tokens (all occurrences). To image size: bicubic. Binarization:
    min-max normalize, then > tau."""

    needs = frozenset({"attn"})
    summary = "DAAM: bicubic-upsampled attention summed over steps, mean over down/up heads (no mid, no 1/8 side)"
    upsample = "bicubic"

    def token_maps(self, trace: Trace, positions: Sequence[int]) -> torch.Tensor:
        return aggregate(trace, "attn", positions, layer_filter=daam_layers, mode="bicubic", clamp=True, time="sum")
