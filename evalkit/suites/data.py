"""Evaluation items for suites: prompt, seed, the words to attribute and their ground-truth masks,
from ShapesWorld (exact masks), a COCO-format JSON, or a DAAM experiment folder."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .schema import DataSpec


@dataclass
class EvalItem:
    """One prompt to generate and the masks its words are scored against (``(H, W)`` bool)."""

    id: str
    prompt: str
    seed: int
    masks: dict[str, np.ndarray] = field(repr=False)

    @property
    def words(self) -> list[str]:
        return list(self.masks)


def load_items(spec: DataSpec, limit: int | None = None) -> list[EvalItem]:
    """Items of a data spec (at most ``limit``)."""
    n = min(spec.n, limit) if limit else spec.n
    if spec.source == "shapesworld":
        from ..shapesworld import dataset

        role = "noun" if spec.words == "nouns" else None
        return [
            EvalItem(id=f"sw-{spec.seed}-{it.index}", prompt=it.prompt, seed=it.seed, masks=it.masks(role))
            for it in dataset(n, spec.seed, size=spec.size, n_objects=spec.n_objects, phrasing=spec.phrasing)
        ]
    from ..groundtruth import GroundTruth, import_daam_folder

    if spec.path is None:
        raise ValueError(f"data source {spec.source!r} needs `path:` (a COCO json file or a DAAM folder)")
    gt = GroundTruth.load(spec.path) if spec.source == "coco" else import_daam_folder(spec.path)
    items = []
    for img in gt.images[:n]:
        if img.seed is None:
            raise ValueError(
                f"{spec.path}: image {img.id} ({img.file_name}) has no seed: add 'seed' to the image record"
            )
        items.append(EvalItem(id=f"{spec.source}-{img.id}", prompt=img.prompt, seed=int(img.seed),
                              masks=gt.masks_for(img.id)))
    return items
