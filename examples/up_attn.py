"""A user-defined attribution method in one small file: DAAM-style aggregation over the up-block
(decoder-side) heads only. Register it with the decorator (one line) or an entry point."""

from __future__ import annotations

from evalkit.methods import AttributionMethod, aggregate, register_method


@register_method("up-attn")
class UpBlocksAttention(AttributionMethod):
    """Attention summed over steps, each up-block head's map bicubic-resized to the latent grid and
    clamped at 0, mean over the up-block (layer, head) pairs only."""

    needs = frozenset({"attn"})
    backbones = frozenset({"unet"})  # up blocks exist in UNets; an MM-DiT (SD3, Flux) has none
    summary = "Up-attn (example): DAAM-style aggregation over up-block heads only"

    def token_maps(self, trace, positions):
        return aggregate(trace, "attn", positions, layer_filter=lambda layer, latent_hw: layer.place == "up")
