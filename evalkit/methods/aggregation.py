"""The aggregation ablation's methods (paper 000 Table 7): the norm map restricted to one timestep
(heads only) or to one head (timesteps only), so the effect of each averaging can be measured."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .base import Attribution, AttributionMethod, aggregate
from .norm import head_strengths
from .registry import register_method


@register_method("norm-heads-only")
class NormHeadsOnly(AttributionMethod):
    """Heads only: the norm contribution at ONE UNet call (``step``; default the middle call,
    ``n_steps // 2``), averaged over heads (the trace's per-step statistic ``norm_steps`` is the mean over a
    layer's heads), then over layers, each layer's map resized bicubically to the latent grid and clamped
    at 0. Keeps the timestep-specific variability that ``norm`` averages out."""

    needs = frozenset({"norm_steps"})
    summary = "Norm, heads only: one timestep (the middle UNet call) of the norm map, mean over heads and layers"
    upsample = "bicubic"

    def __init__(self, step: int | None = None) -> None:
        self.step = step

    def params(self) -> dict:
        return {"step": self.step}

    def token_maps(self, trace, positions: Sequence[int]) -> torch.Tensor:
        n = trace.stats["norm_steps"][0].shape[0]
        step = n // 2 if self.step is None else self.step
        if not -n <= step < n:
            raise ValueError(f"step {step} out of range: the trace has {n} UNet calls")
        total = None
        for li, layer in enumerate(trace.layers):
            x = trace.stats["norm_steps"][li][step]  # (Q, K)
            h, w = layer.grid(trace.latent_hw)
            maps = x[:, list(positions)].T.reshape(1, len(positions), h, w).float()
            maps = F.interpolate(maps, size=trace.latent_hw, mode="bicubic").clamp_(min=0)[0]
            total = maps if total is None else total + maps
        return total / len(trace.layers)


@register_method("norm-timesteps-only")
class NormTimestepsOnly(AttributionMethod):
    """Timesteps only: the norm map averaged over all UNet calls, of the single (layer, head) with the
    largest G_h(word) (mean over the word's tokens of G_h(k), see :func:`evalkit.analysis.head_strengths`),
    chosen per word; resized bicubically to the latent grid and clamped at 0. Keeps head-specific
    variability that ``norm`` averages out."""

    needs = frozenset({"norm"})
    summary = "Norm, timesteps only: mean over steps of the one (layer, head) with the largest G_h(word)"
    upsample = "bicubic"

    def best_head(self, trace, positions: Sequence[int]) -> tuple[int, int]:
        """(layer index, head index) with the largest mean G_h over ``positions``."""
        best, where = -math.inf, (0, 0)
        for li, g in enumerate(head_strengths(trace)):
            vals = g[:, list(positions)].mean(1)
            h = int(vals.argmax())
            if float(vals[h]) > best:
                best, where = float(vals[h]), (li, h)
        return where

    def token_maps(self, trace, positions: Sequence[int]) -> torch.Tensor:
        li, h = self.best_head(trace, positions)
        return aggregate(trace, "norm", positions, heads={li: [h]}, mode="bicubic", clamp=True, time="mean")

    def attribute(self, trace, words: Sequence[str]) -> Attribution:
        """One head per word (the token maps of a word come from its own best head)."""
        if isinstance(words, str):
            words = [words]
        trace.require(self.needs, who=f"method {self.name!r}")
        maps = {w: self.token_maps(trace, trace.tokens.positions(w)).mean(0) for w in words}
        return Attribution(method=self.name, prompt=trace.prompt, tokens=list(trace.tokens.pieces), maps=maps,
                           image_hw=trace.image_hw, upsample=self.upsample, params=self.params())
