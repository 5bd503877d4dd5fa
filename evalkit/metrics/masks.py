"""Binary masks: IoU on (H, W) masks, and pycocotools-backed COCO run-length encoding (RLE), polygon
rasterization and RLE IoU, so ground truth can be stored and read in COCO's own format.

:func:`iou` counts pixels with numpy; it agrees with ``pycocotools.mask.iou`` on every pair except
two empty masks, where pycocotools returns 0 and evalkit returns NaN (the IoU is undefined: nothing
to localize). The tests check that agreement.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._inputs import as_mask, check_same_shape
from .rle import encode_rle, for_pycocotools


def iou_counts(pred_mask: Any, gt_mask: Any) -> tuple[int, int]:
    """``(|pred ∩ gt|, |pred ∪ gt|)`` in pixels, for pooled reductions (sum of intersections / sum of unions)."""
    p = as_mask(pred_mask, "predicted mask")
    g = as_mask(gt_mask, "ground-truth mask")
    check_same_shape(p, g, "predicted mask", "ground-truth mask")
    return int(np.count_nonzero(p & g)), int(np.count_nonzero(p | g))


def iou(pred_mask: Any, gt_mask: Any) -> float:
    """Intersection over union ``|P ∩ G| / |P ∪ G|`` of two binary (H, W) masks; NaN if both are empty.

    Inputs: bool or 0/1 torch tensors / numpy arrays, or COCO RLE dicts. A shape mismatch is a
    ValueError naming both shapes. An empty prediction against a non-empty mask is 0 (a miss).
    """
    inter, union = iou_counts(pred_mask, gt_mask)
    return inter / union if union else math.nan


def polygons_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Rasterize COCO polygon segmentation (a list of ``[x1, y1, x2, y2, ...]``) into a bool (H, W) mask."""
    from pycocotools import mask as mask_utils

    rles = mask_utils.frPyObjects([list(map(float, p)) for p in polygons], height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def rle_iou(pred: Any, gt: Any) -> float:
    """IoU computed by ``pycocotools.mask.iou`` (arrays are RLE-encoded first); 0 for two empty masks."""
    from pycocotools import mask as mask_utils

    p = pred if isinstance(pred, dict) else encode_rle(pred)
    g = gt if isinstance(gt, dict) else encode_rle(gt)
    if list(p["size"]) != list(g["size"]):
        raise ValueError(f"RLE sizes differ: prediction {list(p['size'])} vs ground truth {list(g['size'])}")
    return float(mask_utils.iou([for_pycocotools(p)], [for_pycocotools(g)], [0])[0, 0])
