"""Adherence by ShapesWorld's analytic checker (a stand-in for the CLIP similarities of paper 000
Table 2 on the embedded model): is every object of the prompt in the image, and how well."""

from __future__ import annotations

import math
from typing import Any

from .base import Metric
from .registry import register_metric

NO_PHRASE = "prompt has no ShapesWorld object phrase (the checker cannot score it)"


@register_metric("checker-full-prompt")
class CheckerFullPrompt(Metric):
    """Full-prompt adherence by ShapesWorld's analytic checker: 1 when every object phrase of the prompt is
    present in the image, else 0 (the mean is the all-present rate). A prompt without ShapesWorld object
    phrases is undefined (NaN)."""

    category = "adherence"
    direction = "higher"
    summary = "full-prompt adherence: share of images in which the checker finds every object of the prompt"
    source = "paper 000 Table 2 (Full Prompt Sim.), ShapesWorld analytic stand-in"

    def __init__(self, min_iou: float = 0.7) -> None:
        super().__init__()
        self.min_iou = float(min_iou)

    def params(self) -> dict:
        return {"min_iou": self.min_iou}

    def _check(self, image, prompt: str):
        from ..shapesworld import check, parse_prompt

        specs = parse_prompt(prompt)
        return check(image, specs, min_iou=self.min_iou) if specs else None

    def update(self, image: Any, prompt: str) -> float:
        c = self._check(image, prompt)
        return self._record(math.nan if c is None else float(c.all_present), reason=NO_PHRASE)


@register_metric("checker-mos")
class CheckerMinObjectScore(CheckerFullPrompt):
    """Minimum object score by ShapesWorld's analytic checker: the minimum over the prompt's objects of the
    best template IoU of the object's shape among components of its colour (0 when one is missing)."""

    summary = "min-object score: minimum over objects of the checker's per-object score"
    source = "paper 000 Table 2 (MOS), ShapesWorld analytic stand-in"

    def update(self, image: Any, prompt: str) -> float:
        c = self._check(image, prompt)
        return self._record(math.nan if c is None else float(c.min_score), reason=NO_PHRASE)
