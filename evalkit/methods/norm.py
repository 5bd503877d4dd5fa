"""Norm-based attribution (paper 000, Eq. 6-7): attention weighted by the size of what it carries."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..trace import Trace
from .base import AttributionMethod, aggregate
from .registry import register_method


@register_method("norm")
class NormAttribution(AttributionMethod):
    """Norm: H_i(q) = E_{t,h} ||A[h,q,i] v[h,i] W_O^(h)||_2 = E_{t,h} A[h,q,i] ||v[h,i] W_O^(h)||_2,
    with W_O^(h) the head's slice of the output projection (bias excluded). Mean over steps and
    over (layer, head) of all attn2 layers (mid block included); each (layer, head) map is resized
    to the latent grid with bicubic interpolation and clamped at 0, like DAAM. To image size:
    bicubic. Binarization: min-max normalize, then > tau."""

    needs = frozenset({"norm"})
    summary = "Norm: attention x ||value W_O|| per head (paper 000 Eq. 7), mean over all attn2 heads and steps"
    upsample = "bicubic"
    stat = "norm"

    def token_maps(self, trace: Trace, positions: Sequence[int]) -> torch.Tensor:
        return aggregate(trace, self.stat, positions, mode="bicubic", clamp=True, time="mean")


@register_method("norm-sq")
class SquaredNormAttribution(NormAttribution):
    """Norm-sq (paper 000 Fig. 3): like ``norm`` but averages the squared contribution norm,
    E_{t,h} (A[h,q,i] ||v[h,i] W_O^(h)||_2)^2, which weights strong heads and steps more."""

    needs = frozenset({"norm_sq"})
    summary = "Norm-sq: squared contribution norm (paper 000 Fig. 3), mean over all attn2 heads and steps"
    stat = "norm_sq"


def head_strengths(trace: Trace) -> list[torch.Tensor]:
    """G_h(k) per layer: ``(heads, K)``, mean over steps and query positions of the norm contribution."""
    trace.require(["norm"], who="head sensitivity")
    out = []
    for x in trace.stats["norm"]:
        q = x.shape[1]
        out.append(x.double().sum(dim=1) / (max(trace.n_steps, 1) * q))
    return out
