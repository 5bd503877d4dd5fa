"""evalkit's one COCO RLE codec (pycocotools underneath): JSON-ready encoding, decoding of every COCO RLE
form (compressed with str or bytes counts, uncompressed run lengths)."""

from __future__ import annotations

from typing import Any

import numpy as np


def encode_rle(mask: Any) -> dict:
    """JSON-ready compressed COCO RLE of a binary (H, W) mask (``pycocotools.mask.encode``): ``size`` as
    ``[H, W]`` ints, ``counts`` as an ASCII ``str`` (how COCO JSON stores it). evalkit's one RLE encoder."""
    from pycocotools import mask as mask_utils

    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"a mask to encode must be 2-D (H, W), got shape {tuple(m.shape)}")
    m = m.astype(bool)
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def for_pycocotools(rle: dict) -> dict:
    """An RLE dict as pycocotools' C functions take it (compressed, ``counts`` as bytes)."""
    from pycocotools import mask as mask_utils

    if isinstance(rle["counts"], list):
        h, w = rle["size"]
        return mask_utils.frPyObjects(dict(rle), h, w)
    if isinstance(rle["counts"], str):
        return {"size": list(rle["size"]), "counts": rle["counts"].encode("ascii")}
    return rle


def decode_rle(rle: dict) -> np.ndarray:
    """Bool (H, W) mask of a COCO RLE dict; compressed (``counts`` bytes/str) or uncompressed (list).
    evalkit's one RLE decoder."""
    from pycocotools import mask as mask_utils

    if "size" not in rle or "counts" not in rle:
        raise ValueError(f"a COCO RLE dict needs 'size' and 'counts', got keys {sorted(rle)}")
    return mask_utils.decode(for_pycocotools(rle)).astype(bool)
