"""Ground-truth masks for prompt words, stored as COCO-format JSON.

A :class:`GroundTruth` is the in-memory form of one evaluation set: the generated images (with the prompt and seed
that produced them, so a suite can regenerate them) and, per image, binary masks for the prompt words they ground.
On disk it is a COCO-style JSON file that :class:`pycocotools.coco.COCO` loads unchanged; two non-standard fields
carry what attribution evaluation needs and COCO lacks:

* ``images[*].prompt`` / ``images[*].seed`` -- the generation inputs;
* ``annotations[*].word`` -- the prompt word the mask grounds (the COCO category may be coarser, e.g. word
  ``"puppy"`` under category ``"dog"``; it defaults to the word itself).

Masks are stored as compressed COCO RLE (``{"size": [h, w], "counts": str}``), the format pycocotools' ``iou``,
``area`` and ``annToMask`` work on directly.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from ..metrics.rle import decode_rle, encode_rle

__all__ = [
    "Annotation",
    "GroundTruth",
    "GroundTruthError",
    "ImageRecord",
    "MissingMaskError",
    "atomic_write_json",
    "decode_rle",
    "encode_rle",
]

FORMAT_NAME = "evalkit.groundtruth/1"


class GroundTruthError(ValueError):
    """Malformed or inconsistent ground-truth data; the message names the file or record at fault."""


class MissingMaskError(GroundTruthError, LookupError):
    """A mask was requested for a word (or image) the ground truth has no annotation for."""


# ----------------------------------------------------------------------------------------------------------------- RLE


def _to_compressed_rle(segmentation: Any, height: int, width: int, where: str) -> dict[str, Any]:
    """Normalise any COCO segmentation (polygons, uncompressed or compressed RLE) to JSON-ready compressed RLE."""
    try:
        if isinstance(segmentation, list):  # polygons
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation, Mapping) and isinstance(segmentation.get("counts"), list):
            rle = mask_utils.frPyObjects(dict(segmentation), height, width)
        elif isinstance(segmentation, Mapping) and isinstance(segmentation.get("counts"), str | bytes):
            rle = dict(segmentation)
        else:
            raise TypeError(f"unsupported segmentation of type {type(segmentation).__name__}")
    except (TypeError, ValueError, KeyError) as err:
        raise GroundTruthError(f"{where}: cannot read segmentation ({err})") from err
    counts = rle["counts"]
    size = [int(rle["size"][0]), int(rle["size"][1])]
    if size != [height, width]:
        raise GroundTruthError(f"{where}: segmentation size {size} != image size {[height, width]}")
    return {"size": size, "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON so readers never see a half-written file: write a temp file in the same folder, then ``os.replace``.

    ``os.replace`` is atomic on POSIX and Windows when source and target are on the same file system, which a
    sibling temp file guarantees. Concurrent writers cannot corrupt the file; the last one wins.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------------------------ records


@dataclass
class ImageRecord:
    """One generated image: ``file_name`` is relative to :attr:`GroundTruth.root` (the JSON file's folder)."""

    id: int
    file_name: str
    height: int
    width: int
    prompt: str
    seed: int | None = None


@dataclass
class Annotation:
    """One mask grounding ``word`` in image ``image_id``; ``segmentation`` is compressed RLE with ``str`` counts.

    ``area`` (pixels) and ``bbox`` (``[x, y, w, h]``) are derived from the mask, as COCO defines them. ``category``
    is the COCO category name (defaults to the word).
    """

    id: int
    image_id: int
    word: str
    segmentation: dict[str, Any]
    area: int
    bbox: list[float]
    category: str

    def mask(self) -> np.ndarray:
        """The mask as a boolean ``(H, W)`` array."""
        return decode_rle(self.segmentation)


@dataclass
class GroundTruth:
    """Images with prompt/seed and word masks, loadable from and savable to pycocotools-compatible COCO JSON.

    Several annotations may share ``(image_id, word)`` (e.g. one per instance); :meth:`masks_for` returns their
    union, which is what a per-word attribution map is compared against.
    """

    images: list[ImageRecord] = field(default_factory=list)
    annotations: list[Annotation] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    root: Path | None = None

    def __post_init__(self) -> None:
        self._images_by_id: dict[int, ImageRecord] = {}
        self._anns_by_image: dict[int, list[Annotation]] = {}
        self._max_ann_id = max((a.id for a in self.annotations), default=0)
        self._max_image_id = 0
        for image in self.images:
            self._index_image(image)
        for ann in self.annotations:
            self._index_annotation(ann)

    def _index_image(self, image: ImageRecord) -> None:
        if image.id in self._images_by_id:
            raise GroundTruthError(f"duplicate image id {image.id} ({image.file_name!r})")
        self._images_by_id[image.id] = image
        self._anns_by_image.setdefault(image.id, [])
        self._max_image_id = max(self._max_image_id, image.id)

    def _index_annotation(self, ann: Annotation) -> None:
        image = self.image(ann.image_id)
        if list(ann.segmentation["size"]) != [image.height, image.width]:
            raise GroundTruthError(
                f"annotation {ann.id} ({ann.word!r}): mask size {list(ann.segmentation['size'])} != size "
                f"{[image.height, image.width]} of image {image.id} ({image.file_name!r})"
            )
        self._anns_by_image[ann.image_id].append(ann)

    # ------------------------------------------------------------------------------------------------------- build

    def add_image(
        self, file_name: str, height: int, width: int, prompt: str, seed: int | None = None,
        image_id: int | None = None,
    ) -> ImageRecord:
        """Append an image record; ``image_id`` defaults to one more than the largest id so far."""
        if image_id is None:
            image_id = self._max_image_id + 1
        image = ImageRecord(int(image_id), str(file_name), int(height), int(width), str(prompt),
                            None if seed is None else int(seed))
        self._index_image(image)
        self.images.append(image)
        return image

    def add_mask(self, image_id: int, word: str, mask: np.ndarray, category: str | None = None) -> Annotation:
        """Append the mask grounding ``word`` in ``image_id``; the mask must have the image's ``(H, W)``."""
        mask = np.asarray(mask).astype(bool, copy=False)
        rle = encode_rle(mask)
        ann = Annotation(
            id=self._max_ann_id + 1,
            image_id=int(image_id),
            word=str(word),
            segmentation=rle,
            area=int(mask.sum()),
            bbox=[float(v) for v in mask_utils.toBbox(_bytes_rle(rle))],
            category=str(word) if category is None else str(category),
        )
        self._index_annotation(ann)
        self.annotations.append(ann)
        self._max_ann_id = max(self._max_ann_id, ann.id)
        return ann

    # ------------------------------------------------------------------------------------------------------ query

    def image(self, image_id: int) -> ImageRecord:
        """The record of ``image_id``; :class:`MissingMaskError` if there is none."""
        try:
            return self._images_by_id[image_id]
        except KeyError:
            raise MissingMaskError(f"no image with id {image_id} in the ground truth") from None

    def image_path(self, image_id: int) -> Path:
        """Where the image file is: ``file_name`` resolved against :attr:`root` (when set)."""
        file_name = Path(self.image(image_id).file_name)
        return file_name if self.root is None else self.root / file_name

    def words(self, image_id: int) -> list[str]:
        """The words that have at least one mask in ``image_id``, in annotation order, without repeats."""
        self.image(image_id)
        return list(dict.fromkeys(a.word for a in self._anns_by_image[image_id]))

    def masks_for(self, image_id: int, words: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Boolean ``(H, W)`` mask per word of ``image_id`` (all its words, or the requested ones).

        Raises :class:`MissingMaskError` naming the word, the image and the words that do have masks when a
        requested word has none -- silently skipping it would bias an average over words.
        """
        image = self.image(image_id)
        by_word: dict[str, np.ndarray] = {}
        for ann in self._anns_by_image[image_id]:
            m = ann.mask()
            by_word[ann.word] = by_word[ann.word] | m if ann.word in by_word else m
        if words is None:
            return by_word
        out: dict[str, np.ndarray] = {}
        for word in words:
            if word not in by_word:
                raise MissingMaskError(
                    f"no mask for word {word!r} in image {image.id} ({image.file_name!r}, prompt {image.prompt!r}); "
                    f"words with masks: {sorted(by_word)}"
                )
            out[word] = by_word[word]
        return out

    # ------------------------------------------------------------------------------------------------------- COCO

    def to_coco(self) -> dict[str, Any]:
        """The COCO dict: ``info``, ``images``, ``annotations`` and ``categories`` (one per distinct category)."""
        categories = list(dict.fromkeys(a.category for a in self.annotations))
        cat_ids = {name: i + 1 for i, name in enumerate(categories)}
        return {
            "info": {"format": FORMAT_NAME, **self.info},
            "images": [
                {"id": im.id, "file_name": im.file_name, "height": im.height, "width": im.width,
                 "prompt": im.prompt, "seed": im.seed}
                for im in self.images
            ],
            "annotations": [
                {"id": a.id, "image_id": a.image_id, "category_id": cat_ids[a.category], "word": a.word,
                 "segmentation": a.segmentation, "area": a.area, "bbox": a.bbox, "iscrowd": 0}
                for a in self.annotations
            ],
            "categories": [{"id": cat_ids[name], "name": name, "supercategory": ""} for name in categories],
        }

    @classmethod
    def from_coco(cls, data: Mapping[str, Any], root: str | os.PathLike[str] | None = None,
                  source: str = "<dict>") -> GroundTruth:
        """Build from a COCO dict (any segmentation type is normalised to compressed RLE).

        Annotations without ``word`` (plain COCO files) take the category name as the word; images without
        ``prompt`` get an empty prompt. ``source`` names the file in error messages.
        """
        try:
            cat_names = {int(c["id"]): str(c["name"]) for c in data.get("categories", [])}
            images = [
                ImageRecord(int(im["id"]), str(im["file_name"]), int(im["height"]), int(im["width"]),
                            str(im.get("prompt", "")), None if im.get("seed") is None else int(im["seed"]))
                for im in data["images"]
            ]
        except (KeyError, TypeError, ValueError) as err:
            raise GroundTruthError(f"{source}: malformed images/categories ({type(err).__name__}: {err})") from err
        sizes = {im.id: (im.height, im.width) for im in images}
        annotations = []
        for i, raw in enumerate(data.get("annotations", [])):
            where = f"{source}: annotation #{i} (id {raw.get('id')})"
            try:
                image_id = int(raw["image_id"])
                category = cat_names.get(int(raw["category_id"])) if "category_id" in raw else None
                word = str(raw.get("word", category if category is not None else ""))
                if not word:
                    raise GroundTruthError(f"{where}: has neither 'word' nor a known 'category_id'")
                if image_id not in sizes:
                    raise GroundTruthError(f"{where}: image_id {image_id} is not among the images")
                rle = _to_compressed_rle(raw["segmentation"], *sizes[image_id], where=where)
                annotations.append(Annotation(
                    id=int(raw.get("id", i + 1)), image_id=image_id, word=word, segmentation=rle,
                    area=int(raw["area"]) if "area" in raw else int(mask_utils.area(_bytes_rle(rle))),
                    bbox=[float(v) for v in raw["bbox"]] if "bbox" in raw
                    else [float(v) for v in mask_utils.toBbox(_bytes_rle(rle))],
                    category=category if category is not None else word,
                ))
            except (KeyError, TypeError, ValueError) as err:
                if isinstance(err, GroundTruthError):
                    raise
                raise GroundTruthError(f"{where}: malformed ({type(err).__name__}: {err})") from err
        info = {k: v for k, v in dict(data.get("info", {})).items() if k != "format"}
        return cls(images=images, annotations=annotations, info=info, root=None if root is None else Path(root))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the COCO JSON atomically; ``file_name``s stay relative, so keep the JSON next to the images."""
        path = Path(path)
        atomic_write_json(path, self.to_coco())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> GroundTruth:
        """Read a COCO JSON file; :attr:`root` becomes the file's folder, against which ``file_name`` resolves."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise GroundTruthError(f"{path}: cannot read ground-truth JSON ({err})") from err
        if not isinstance(data, dict) or "images" not in data:
            raise GroundTruthError(f"{path}: not a COCO JSON file (no 'images' list)")
        return cls.from_coco(data, root=path.parent, source=str(path))


def _bytes_rle(rle: Mapping[str, Any]) -> dict[str, Any]:
    """pycocotools' C functions want ``counts`` as ``bytes``; our JSON-ready RLE keeps ``str``."""
    counts = rle["counts"]
    return {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
