"""HRV ordered weakening (paper 001 sec. 4): a score against the number of weakened heads, for the
most-relevant-first (MoRHF) and least-relevant-first (LeRHF) orders, and the area between them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from ..interventions import HeadReweighting
from ..methods.hrv import HeadRelevance
from ..trace import generate


@dataclass
class WeakeningCurves:
    """Scores at each number of weakened heads, per order ("MoRHF", "LeRHF")."""

    n_heads: list[int]
    scores: dict[str, list[float]]
    total_heads: int

    def area_between(self) -> float:
        """Integral of (LeRHF - MoRHF) over the weakened fraction n / H in [0, 1] (trapezoid rule).
        Positive when the concept disappears faster with MoRHF, as expected of a good HRV."""
        x = np.asarray(self.n_heads, dtype=float) / self.total_heads
        diff = np.asarray(self.scores["LeRHF"]) - np.asarray(self.scores["MoRHF"])
        return float(np.sum((diff[1:] + diff[:-1]) * np.diff(x) / 2.0))


def weakening_order(hrv: HeadRelevance, concept: str, order: str) -> list[str]:
    """All heads sorted for weakening: MoRHF (most relevant first) or LeRHF (least relevant first)."""
    if order not in ("MoRHF", "LeRHF"):
        raise ValueError(f"order must be 'MoRHF' or 'LeRHF', got {order!r}")
    return hrv.select(concept, len(hrv.heads), "most" if order == "MoRHF" else "least")


def weakening_curves(
    pipe,
    prompt: str,
    *,
    hrv: HeadRelevance,
    concept: str,
    score: Callable[[object, str], float],
    n_heads: Sequence[int] | None = None,
    factor: float = -2.0,
    seed: int = 0,
    steps: int = 20,
    guidance: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    progress: bool = True,
) -> WeakeningCurves:
    """Generate ``prompt`` with the first n heads of each order weakened by ``factor`` and score each
    image with ``score(image, prompt)`` (e.g. CLIP similarity or ShapesWorld's checker)."""
    total = len(hrv.heads)
    n_list = sorted(set(n_heads if n_heads is not None else range(0, total + 1)))
    if n_list[0] < 0 or n_list[-1] > total:
        raise ValueError(f"n_heads must lie in [0, {total}]")
    scores: dict[str, list[float]] = {"MoRHF": [], "LeRHF": []}
    cache: dict[tuple[str, ...], float] = {}
    jobs = [(o, n) for o in ("MoRHF", "LeRHF") for n in n_list]
    for order, n in tqdm(jobs, desc="ordered weakening", disable=not progress):
        heads = tuple(weakening_order(hrv, concept, order)[:n])
        key = tuple(sorted(heads))
        if key not in cache:
            ivs = [HeadReweighting(list(heads), factor)] if heads else []
            gen = generate(pipe, prompt, seeds=seed, steps=steps, guidance=guidance, height=height, width=width,
                           stats=(), interventions=ivs)
            cache[key] = float(score(gen.images[0], prompt))
        scores[order].append(cache[key])
    return WeakeningCurves(n_heads=n_list, scores=scores, total_heads=total)
