"""ConceptAttention (Helbling et al., ICML 2025): saliency in the attention output space of an MM-DiT."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..trace import LayerInfo, Trace
from .base import Attribution, AttributionMethod, aggregate
from .registry import register_method


@register_method("concept-attention")
class ConceptAttention(AttributionMethod):
    """ConceptAttention: concept tokens (each attributed word, plus the prompt's other words and
    "background" as competitors) pass through the joint / double-stream blocks with the text stream's
    weights, attending to the image and to each other but never attended to (the image is unchanged).
    Per layer and step, each image token's attention output ``o_x`` is compared with every concept's
    ``o_c`` in the attention output space, ``phi = softmax over concepts (o_x . o_c)``; the word's map is
    phi of its concept averaged over steps and over the joint (SD3) / double-stream (Flux) layers, or only
    the last ``last_layers`` of them (0: all; the authors' Flux code takes double-stream blocks 10-17 of 19).
    Patch grid to latent grid: bilinear; to image size: bilinear.
    Definition and the choice of space: :mod:`evalkit.trace.concept`. MM-DiT models only."""

    needs = frozenset({"concept"})
    backbones = frozenset({"transformer"})
    token_level = False  # one map per concept (a word of the prompt), not a mean of token maps
    summary = "ConceptAttention: softmax over concepts of image x concept attention outputs (MM-DiT only)"
    upsample = "bilinear"

    def __init__(self, last_layers: int = 0) -> None:
        if int(last_layers) < 0:
            raise ValueError(f"last_layers={last_layers} must be >= 0 (0: every joint layer)")
        self.last_layers = int(last_layers)

    def params(self) -> dict:
        return {"last_layers": self.last_layers}

    def _layers(self, trace: Trace) -> set[str]:
        carrying = [layer.name for i, layer in enumerate(trace.layers) if trace.stats["concept"][i].shape[0] > 0]
        return set(carrying[-self.last_layers:] if self.last_layers else carrying)

    def attribute(self, trace: Trace, words: Sequence[str]) -> Attribution:
        """Maps for ``words``, each one of the traced concepts (``trace.settings["concepts"]``)."""
        if isinstance(words, str):
            words = [words]
        trace.require(self.needs, who=f"method {self.name!r}")
        concepts = [c.lower() for c in trace.settings.get("concepts", [])]
        chosen = self._layers(trace)

        def keep(layer: LayerInfo, _hw) -> bool:
            return layer.name in chosen

        maps = {}
        for word in words:
            if word.lower() not in concepts:
                raise ValueError(f"concept-attention: {word!r} is not one of the traced concepts {concepts}: "
                                 "trace with generate(..., concepts=[...]) naming it")
            index = concepts.index(word.lower())
            maps[word] = aggregate(trace, "concept", [index], layer_filter=keep, mode="bilinear", clamp=False,
                                   time="mean")[0]
        return Attribution(method=self.name, prompt=trace.prompt, tokens=list(trace.tokens.pieces), maps=maps,
                           image_hw=trace.image_hw, upsample=self.upsample, params=self.params())

    def token_maps(self, trace: Trace, positions: Sequence[int]) -> torch.Tensor:
        raise NotImplementedError("concept-attention attributes concepts, not token positions: use attribute()")
