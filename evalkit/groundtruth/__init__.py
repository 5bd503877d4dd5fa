"""Ground-truth masks for attribution evaluation: COCO-format sets, DAAM folder import, Grounded-SAM masks.

* :class:`GroundTruth` -- images (prompt, seed) and per-word masks; COCO JSON that pycocotools loads.
* :func:`import_daam_folder` -- DAAM's COCO-Gen / Unreal-Gen experiment folders -> :class:`GroundTruth`.
* :class:`GroundedSam` -- Grounding DINO boxes -> SAM masks, cached as COCO RLE (imported lazily: it pulls in torch
  and transformers, which reading a COCO file does not need).

See ``docs/groundtruth.md`` for the formats and the pipeline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .coco import (
    Annotation,
    GroundTruth,
    GroundTruthError,
    ImageRecord,
    MissingMaskError,
    atomic_write_json,
    decode_rle,
    encode_rle,
)
from .daam import import_daam_folder

if TYPE_CHECKING:
    from .grounded_sam import GroundedSam, Grounding, image_sha256

__all__ = [
    "Annotation",
    "GroundTruth",
    "GroundTruthError",
    "GroundedSam",
    "Grounding",
    "ImageRecord",
    "MissingMaskError",
    "atomic_write_json",
    "decode_rle",
    "encode_rle",
    "image_sha256",
    "import_daam_folder",
]

_LAZY = {"GroundedSam", "Grounding", "image_sha256"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import grounded_sam

        return getattr(grounded_sam, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
