"""The attribution API: a method turns one :class:`~evalkit.trace.Trace` into an :class:`Attribution`
(per-word maps on the latent grid), using the shared aggregation machinery below."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..npz import save_npz
from ..trace import LayerInfo, Trace

LayerFilter = Callable[[LayerInfo, tuple[int, int]], bool]


@dataclass
class Attribution:
    """Per-word attribution maps of one generation, as a method computed them.

    ``maps[word]`` is ``(h, w)`` float32 on the latent grid, before any normalization.
    ``upsample`` is the interpolation the method uses to reach image size.
    """

    method: str
    prompt: str
    tokens: list[str]
    maps: dict[str, torch.Tensor]
    image_hw: tuple[int, int]
    upsample: str = "bicubic"
    params: dict = field(default_factory=dict)

    @property
    def words(self) -> list[str]:
        """The attributed words, in request order."""
        return list(self.maps)

    def to_image(self, size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """Maps upsampled to ``size`` (default: the generated image's size), ``(H, W)`` each, unnormalized."""
        size = tuple(size or self.image_hw)
        out = {}
        for word, m in self.maps.items():
            x = m[None, None].float()
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode=self.upsample)
            out[word] = x[0, 0]
        return out

    def normalized(self, size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """Image-size maps min-max normalized to [0, 1] per word (DAAM's rule, with its 1e-8 guard)."""
        out = {}
        for word, m in self.to_image(size).items():
            out[word] = (m - m.min()) / (m.max() - m.min() + 1e-8)
        return out

    def binarize(self, tau: float, size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """Binary masks: min-max normalize the image-size map, then ``> tau`` (as DAAM does)."""
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"threshold tau={tau} must lie in [0, 1]")
        return {w: m > tau for w, m in self.normalized(size).items()}

    def save_npz(self, path: str | Path, size: tuple[int, int] | None = None) -> None:
        """One float32 array per word at image size (after upsampling, before normalization); any word is a valid
        key (see :mod:`evalkit.npz`)."""
        arrays = {w: m.numpy().astype(np.float32) for w, m in self.to_image(size).items()}
        save_npz(path, arrays)

    def overlay(self, image, word: str, ax=None, alpha: float = 0.5, cmap: str = "jet"):
        """Draw the normalized map of ``word`` over ``image`` (PIL image); returns the matplotlib Axes."""
        import matplotlib.pyplot as plt

        if word not in self.maps:
            raise KeyError(f"word {word!r} was not attributed; attributed words: {self.words}")
        if ax is None:
            _, ax = plt.subplots(figsize=(4, 4))
        w, h = image.size
        heat = self.normalized((h, w))[word].numpy()
        ax.imshow(image)
        ax.imshow(heat, cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0)
        ax.set_title(f"{self.method}: {word}")
        ax.axis("off")
        return ax


class AttributionMethod:
    """Base class of attribution methods: one ``attribute(trace, words)`` per class.

    Subclasses set ``name`` (via :func:`~evalkit.methods.register_method`), ``needs`` (the trace
    statistics they read, see :data:`evalkit.trace.STAT_DOCS`), ``summary`` (one line for listings)
    and ``upsample`` (interpolation to image size).
    """

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    #: Denoisers the method works on: "unet" (SD 1.x/2.x, SDXL) and/or "transformer" (MM-DiT: SD3, Flux).
    backbones: ClassVar[frozenset[str]] = frozenset({"unet", "transformer"})
    #: False for methods whose maps are not means of per-token maps (the conformance kit then skips the
    #: repeated-word and multi-token invariants); such a method overrides :meth:`attribute`.
    token_level: ClassVar[bool] = True
    summary: ClassVar[str] = ""
    upsample: ClassVar[str] = "bicubic"

    def params(self) -> dict:
        """The method's parameters (logged with results)."""
        return {}

    def token_maps(self, trace: Trace, positions: Sequence[int]) -> torch.Tensor:
        """Per-token maps ``(len(positions), h, w)`` on the latent grid; the method's core."""
        raise NotImplementedError

    def attribute(self, trace: Trace, words: Sequence[str]) -> Attribution:
        """Maps for ``words``: a word's map is the mean over its token maps (all occurrences)."""
        if isinstance(words, str):
            words = [words]
        trace.require(self.needs, who=f"method {self.name!r}")
        per_word = {w: trace.tokens.positions(w) for w in words}
        unique = sorted({p for ps in per_word.values() for p in ps})
        maps = self.token_maps(trace, unique)
        index = {p: i for i, p in enumerate(unique)}
        out = {w: maps[[index[p] for p in ps]].mean(0) for w, ps in per_word.items()}
        return Attribution(
            method=self.name,
            prompt=trace.prompt,
            tokens=list(trace.tokens.pieces),
            maps=out,
            image_hw=trace.image_hw,
            upsample=self.upsample,
            params=self.params(),
        )


def aggregate(
    trace: Trace,
    stat: str,
    positions: Sequence[int],
    *,
    layer_filter: LayerFilter | None = None,
    heads: dict[int, list[int]] | None = None,
    mode: str = "bicubic",
    clamp: bool = True,
    time: str = "sum",
) -> torch.Tensor:
    """Mean over selected (layer, head) maps of one statistic, each resized to the latent grid.

    ``heads`` maps layer index -> head indices (None: all heads of every selected layer).
    Each map is resized with ``mode`` (then clamped at 0 if ``clamp``) before averaging, since
    resizing and clamping do not commute with the mean. ``time`` is "sum" (the statistic as
    accumulated over steps) or "mean" (divided by the number of steps). Returns ``(P, h, w)``.
    """
    total: torch.Tensor | None = None
    count = 0
    for li, layer in enumerate(trace.layers):
        if layer_filter is not None and not layer_filter(layer, trace.latent_hw):
            continue
        chosen = None if heads is None else heads.get(li, [])
        if chosen is not None and not chosen:
            continue
        maps = trace.layer_maps(stat, li, positions)  # (H, P, h, w)
        if chosen is not None:
            maps = maps[chosen]
        maps = F.interpolate(maps.float(), size=trace.latent_hw, mode=mode)
        if clamp:
            maps = maps.clamp_(min=0)
        s = maps.sum(0)
        total = s if total is None else total + s
        count += maps.shape[0]
    if total is None:
        raise ValueError("no (layer, head) was selected: the method's layer/head selection is empty for this model")
    out = total / count
    if time == "mean":
        out = out / max(trace.n_steps, 1)
    elif time != "sum":
        raise ValueError(f"time reduction must be 'sum' or 'mean', got {time!r}")
    return out
