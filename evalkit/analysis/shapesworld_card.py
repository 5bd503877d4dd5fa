"""Measure a ShapesWorld model for its model card: prompt adherence with the analytic checker and noun
localization with DAAM, IoU from the metrics package (an undefined mean is NaN, never 0).

Both measurements use held-out items (a dataset seed that training never draws from, and generation
seeds from :class:`~evalkit.shapesworld.dataset.Item`). Localization is scored against the exact
pixel mask of the generated object, which the checker recovers from the generated image (flat colours
make this segmentation exact up to the VAE's edge blur); the whole-image baseline predicts every pixel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..methods import create_method
from ..metrics import iou
from ..shapesworld import SAMPLING
from ..shapesworld.checker import Check, ObjectSpec, check, color_components
from ..shapesworld.dataset import Item
from ..trace import generate

__all__ = ["SAMPLING", "LocalizationResult", "PresenceResult", "localization", "presence", "sample"]

@dataclass
class PresenceResult:
    """Checker verdicts for generated images, with summary rates."""

    checks: list[Check] = field(repr=False)
    object_accuracy: float  # fraction of object phrases present
    all_present: float  # fraction of images with every object present
    mean_min_score: float

    def as_dict(self) -> dict:
        return {"n_images": len(self.checks), "object_accuracy": self.object_accuracy,
                "all_present": self.all_present, "mean_min_score": self.mean_min_score}


@torch.no_grad()
def sample(pipe, prompts: Sequence[str], seeds: Sequence[int], *, steps: int = SAMPLING["steps"],
           guidance: float = SAMPLING["guidance"], batch: int = 16) -> list[np.ndarray]:
    """Generate one ``(H, W, 3)`` uint8 image per prompt, each from its own seeded generator."""
    out: list[np.ndarray] = []
    for i in range(0, len(prompts), batch):
        ps, ss = list(prompts[i : i + batch]), list(seeds[i : i + batch])
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in ss]
        res = pipe(prompt=ps, generator=gens, num_inference_steps=steps, guidance_scale=guidance,
                   output_type="np")
        out += [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in res.images]
    return out


def presence(pipe, items: Sequence[Item], **kwargs) -> tuple[PresenceResult, list[np.ndarray]]:
    """Generate ``items`` and check every object phrase; returns the result and the images."""
    images = sample(pipe, [it.prompt for it in items], [it.seed for it in items], **kwargs)
    checks = [check(img, it.prompt) for img, it in zip(images, items)]
    flags = [p for c in checks for p in c.presence]
    return PresenceResult(
        checks=checks,
        object_accuracy=float(np.mean(flags)) if flags else 0.0,
        all_present=float(np.mean([c.all_present for c in checks])) if checks else 0.0,
        mean_min_score=float(np.mean([c.min_score for c in checks])) if checks else 0.0,
    ), images


@dataclass
class LocalizationResult:
    """Noun-map IoU against the generated objects' masks, and the whole-image baseline on the same objects."""

    method: str
    tau: float
    ious: list[float]
    baseline_ious: list[float]
    n_nouns: int  # nouns asked for
    n_found: int  # nouns whose object the checker found in the generated image (those are scored)
    per_tau: dict[float, float] = field(default_factory=dict)

    @property
    def miou(self) -> float:
        return float(np.mean(self.ious)) if self.ious else float("nan")

    @property
    def baseline_miou(self) -> float:
        return float(np.mean(self.baseline_ious)) if self.baseline_ious else float("nan")

    def as_dict(self) -> dict:
        return {"method": self.method, "tau": self.tau, "miou": self.miou, "baseline_miou": self.baseline_miou,
                "n_nouns": self.n_nouns, "n_found": self.n_found,
                "miou_per_tau": {str(k): v for k, v in self.per_tau.items()}}


def _object_region(image: np.ndarray, spec: ObjectSpec, strict: bool) -> np.ndarray | None:
    """Mask of the generated object for ``spec``: the checker's match (colour + shape); unless ``strict``,
    else the largest region of the phrase's colour (the model drew the object, with a poor shape)."""
    found = check(image, [spec]).objects[0]
    if found.present or strict:
        return found.mask
    comps = color_components(image, spec.color) if spec.color else []
    return max(comps, key=lambda c: c.area).mask if comps else None


def localization(pipe, items: Sequence[Item], *, method: str = "daam", tau: float = 0.4,
                 taus: Sequence[float] = (0.2, 0.3, 0.4, 0.5, 0.6), steps: int = SAMPLING["steps"],
                 guidance: float = SAMPLING["guidance"], batch: int = 8, strict: bool = False,
                 return_details: bool = False):
    """mIoU of ``method``'s binarized noun maps (min-max normalized, ``> tau``) vs the generated objects.

    For each item the noun's object is located in the generated image: the checker's colour + shape match,
    or (unless ``strict``) the largest region of the object's colour. Nouns whose object has no region
    are not scored (``n_found`` counts the scored ones).
    """
    attr = create_method(method)
    ious: list[float] = []
    base: list[float] = []
    per_tau: dict[float, list[float]] = {t: [] for t in taus}
    n_nouns = 0
    details = []
    for i in range(0, len(items), batch):
        chunk = list(items[i : i + batch])
        gen = generate(pipe, [it.prompt for it in chunk], seeds=[it.seed for it in chunk], steps=steps,
                       guidance=guidance)
        for it, image, trace in zip(chunk, gen.images, gen.traces):
            arr = np.asarray(image)[..., :3]
            nouns = it.nouns
            result = attr.attribute(trace, nouns)
            norm = {w: m.numpy() for w, m in result.normalized(arr.shape[:2]).items()}
            for noun in nouns:
                n_nouns += 1
                masks = []
                for a in it.annotations:
                    if a.role == "noun" and a.word == noun:
                        region = _object_region(arr, ObjectSpec(a.shape, a.color, a.size), strict)
                        if region is not None:
                            masks.append(region)
                if not masks:
                    continue
                gt = np.logical_or.reduce(masks)
                ious.append(iou(norm[noun] > tau, gt))
                base.append(float(gt.mean()))
                for t in taus:
                    per_tau[t].append(iou(norm[noun] > t, gt))
                details.append({"item": it.index, "noun": noun, "iou": ious[-1], "baseline": base[-1]})
    res = LocalizationResult(method, tau, ious, base, n_nouns, len(ious),
                             {t: float(np.mean(v)) if v else float("nan") for t, v in per_tau.items()})
    return (res, details) if return_details else res
