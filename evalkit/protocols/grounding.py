"""The suite's ``ground_truth:`` applied to its items. ``exact`` / ``coco`` leave the data's masks as they are;
``grounded-sam`` gives every item a grounder (``EvalItem.ground``) that detects the item's words in the case's
generated image with Grounding DINO and segments them with SAM (:class:`evalkit.groundtruth.GroundedSam`, masks
cached as COCO RLE by image hash), so :func:`evalkit.protocols.common.case_masks` stores those masks in the case
entry like any other. The words are the data's masked words, else (captions, prompt files) the prompt's nouns by
spaCy. The pipeline is loaded once per process, on the first mask a run needs: a run whose cases are all cached
loads neither model."""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import numpy as np

from ..items import EvalItem
from .common import prompt_nouns

#: Grounded-SAM pipelines of this process by configuration and device (loaded lazily, then reused).
_GROUNDERS: dict[str, Any] = {}


def with_ground_truth(spec: Any, items: list[EvalItem]) -> list[EvalItem]:
    """``items`` with the suite's ground truth: unchanged for the data's own masks; for Grounded-SAM, each with a
    grounder of its words (reference-masked words, else the prompt's nouns, which become ``unmasked`` words)."""
    gt = spec.ground_truth
    if not gt.grounded_sam:
        return items
    config = gt.model_dump()
    out = []
    for item in items:
        unmasked = () if item.masks else tuple(dict.fromkeys(w.lower() for w in prompt_nouns(item.prompt)))
        words = tuple(item.masks) or unmasked
        ground = functools.partial(grounded_sam_masks, config, spec.device, words)
        out.append(dataclasses.replace(item, unmasked=unmasked, ground=ground))
    return out


def grounded_sam_masks(config: dict, device: str, words: tuple[str, ...], image: Any) -> dict[str, np.ndarray]:
    """Grounded-SAM masks (bool, image size) of ``words`` in ``image`` (a module-level function, so an item's
    grounder pickles to other processes: Ray actors load their own pipeline)."""
    if not words:
        return {}
    return grounder(config, device).masks(image, list(words))


def grounder(config: dict, device: str) -> Any:
    """The process's :class:`~evalkit.groundtruth.GroundedSam` for a ``ground_truth`` configuration (loaded from
    local folders or the Hugging Face cache only: the preflight has checked they are there)."""
    key = json.dumps({"config": config, "device": device}, sort_keys=True)
    if key not in _GROUNDERS:
        from ..groundtruth.grounded_sam import GroundedSam, is_sam_checkpoint, sam_type_for

        segmenter = config["segmenter"]
        checkpoint = is_sam_checkpoint(segmenter)
        sam_type = sam_type_for(segmenter, config.get("sam_type")) if checkpoint else "vit_h"  # (unused for SamModel)
        _GROUNDERS[key] = GroundedSam.from_pretrained(
            config["detector"], segmenter, sam_type=sam_type, device=device, box_threshold=config["box_threshold"],
            text_threshold=config["text_threshold"], cache_dir=config.get("cache"), keep=config["keep"],
            local_files_only=True)
    return _GROUNDERS[key]


def grounded_sam_stats() -> dict[str, int]:
    """Word masks served by this process's Grounded-SAM pipelines so far: ``cache_hits``, ``computed``, ``no_box``
    (running totals; a run reports the difference)."""
    total = {"cache_hits": 0, "computed": 0, "no_box": 0}
    for gsam in _GROUNDERS.values():
        for k in total:
            total[k] += gsam.stats[k]
    return total
