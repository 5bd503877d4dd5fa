"""ShapesWorld evaluation data: seeded items with prompts, generation seeds and exact masks; COCO export.

Each item is one scene rendered as a prompt. Its masks are exact (the rasterizer's own pixels) and are
attached to every prompt word that names an object: the shape noun and its colour and size adjectives
all point at the object's mask. ``to_coco`` writes them as COCO instance annotations with RLE masks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .grammar import Prompt, describe
from .scene import SHAPES, Scene, render, sample_scene

__all__ = ["Annotation", "Item", "dataset", "iter_dataset", "to_coco"]


@dataclass
class Annotation:
    """One grounded prompt word with its object's exact mask."""

    word: str
    role: str  # "noun", "color" or "size"
    start: int  # character offset in the prompt
    occurrence: int  # 0-based occurrence of the word in the prompt
    object_index: int
    shape: str
    color: str
    size: str
    mask: np.ndarray = field(repr=False)  # (H, W) bool


@dataclass
class Item:
    """One evaluation item: prompt, generation seed, image size, the scene and its exact annotations."""

    index: int
    prompt: str
    seed: int  # seed for the diffusion sampler's initial noise
    image_size: tuple[int, int]  # (height, width)
    scene: Scene
    annotations: list[Annotation]
    image: np.ndarray = field(repr=False)  # the rendered reference scene (H, W, 3) uint8

    @property
    def object_masks(self) -> list[np.ndarray]:
        """One exact mask per object, in scene order."""
        masks: dict[int, np.ndarray] = {}
        for a in self.annotations:
            masks.setdefault(a.object_index, a.mask)
        return [masks[i] for i in sorted(masks)]

    @property
    def nouns(self) -> list[str]:
        """The distinct shape nouns of the prompt, in prompt order."""
        return list(dict.fromkeys(a.word for a in self.annotations if a.role == "noun"))

    def masks(self, role: str | None = "noun") -> dict[str, np.ndarray]:
        """Word -> exact mask, the union over the word's occurrences (as attribution averages them).

        ``role`` restricts to "noun", "color" or "size" words (None: all grounded words).
        """
        out: dict[str, np.ndarray] = {}
        for a in self.annotations:
            if role is None or a.role == role:
                out[a.word] = a.mask if a.word not in out else (out[a.word] | a.mask)
        return out


def _item(index: int, seed: int, size: int, n_objects: int | None, phrasing: str) -> Item:
    scene_rng = np.random.default_rng([seed, index, 0])
    k = n_objects if n_objects is not None else None
    scene = sample_scene(scene_rng, size=size, n_objects=k, seed=int(seed * 1_000_003 + index))
    prompt: Prompt = describe(scene, None if phrasing == "plain" else np.random.default_rng([seed, index, 1]))
    image, masks = render(scene)
    annotations = [
        Annotation(
            word=w.word, role=w.role, start=w.start, occurrence=w.occurrence, object_index=w.object_index,
            shape=scene.objects[w.object_index].shape, color=scene.objects[w.object_index].color,
            size=scene.objects[w.object_index].size, mask=masks[w.object_index],
        )
        for w in prompt.words
    ]
    gen_seed = int(seed) * 10_000 + index
    return Item(index, prompt.text, gen_seed, (size, size), scene, annotations, image)


def iter_dataset(
    n: int,
    seed: int = 0,
    *,
    size: int = 64,
    n_objects: int | Sequence[int] | None = None,
    phrasing: str = "random",
) -> Iterator[Item]:
    """Yield ``n`` items; item ``i`` depends only on ``(seed, i)`` (and the options), never on ``n``.

    ``n_objects``: a fixed count, a sequence cycled over items, or None for 1-3 at random.
    ``phrasing``: "random" (the full grammar: positions, relations, fillers) or "plain"
    ("a <size> <colour> <noun> and ...").
    """
    if phrasing not in ("random", "plain"):
        raise ValueError(f"phrasing must be 'random' or 'plain', got {phrasing!r}")
    counts = [n_objects] if n_objects is None or isinstance(n_objects, int) else list(n_objects)
    for i in range(n):
        yield _item(i, seed, size, counts[i % len(counts)], phrasing)


def dataset(
    n: int,
    seed: int = 0,
    *,
    size: int = 64,
    n_objects: int | Sequence[int] | None = None,
    phrasing: str = "random",
) -> list[Item]:
    """A list of ``n`` ShapesWorld items (see :func:`iter_dataset`)."""
    return list(iter_dataset(n, seed, size=size, n_objects=n_objects, phrasing=phrasing))


def to_coco(items: Sequence[Item]) -> dict:
    """COCO instance-segmentation dict: one annotation per grounded prompt word, masks as compressed RLE.

    Images carry ``prompt`` and ``seed``; annotations carry the ``word`` they ground, its ``role``,
    character offset ``word_start``, ``occurrence`` and ``object_index``. Categories are the shapes.
    """
    from pycocotools import mask as mask_utils

    categories = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]
    cat_id = {s: i + 1 for i, s in enumerate(SHAPES)}
    images, annotations = [], []
    for item in items:
        h, w = item.image_size
        image_id = item.index + 1
        images.append({
            "id": image_id, "file_name": f"shapesworld_{item.index:06d}.png", "height": h, "width": w,
            "prompt": item.prompt, "seed": item.seed, "scene_seed": item.scene.seed,
        })
        for a in item.annotations:
            rle = mask_utils.encode(np.asfortranarray(a.mask.astype(np.uint8)))
            area = float(mask_utils.area(rle))
            bbox = [float(v) for v in mask_utils.toBbox(rle)]
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": cat_id[a.shape],
                "segmentation": rle, "area": area, "bbox": bbox, "iscrowd": 0,
                "word": a.word, "role": a.role, "word_start": a.start, "occurrence": a.occurrence,
                "object_index": a.object_index, "color": a.color, "size": a.size,
            })
    return {
        "info": {"description": "ShapesWorld: exact masks for grounded prompt words", "version": "1.0"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
