"""Input handling shared by the metric functions: torch/numpy/RLE -> float64 or bool numpy arrays,
shape checks with errors that say how to fix them, and the map normalizations the metrics use."""

from __future__ import annotations

from typing import Any

import numpy as np

from .rle import decode_rle

NORMALIZATIONS = ("minmax", "none")
MINMAX_EPS = 1e-8  # the guard of DAAM's (and Attribution.normalized's) min-max normalization


def to_numpy(x: Any) -> np.ndarray:
    """A numpy view/copy of a torch tensor (any device, detached) or array-like."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def as_map(x: Any, what: str = "heat map") -> np.ndarray:
    """A 2-D float64 array ``(H, W)``; anything else is a ValueError naming ``what`` and its shape."""
    a = to_numpy(x)
    if a.ndim != 2:
        raise ValueError(f"{what} must be a 2-D (H, W) array, got shape {tuple(a.shape)}")
    if a.size == 0:
        raise ValueError(f"{what} is empty (shape {tuple(a.shape)})")
    a = a.astype(np.float64, copy=False)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what} contains NaN or infinite values")
    return a


def as_mask(x: Any, what: str = "mask") -> np.ndarray:
    """A 2-D bool array ``(H, W)``. Accepts bool/0-1 arrays or tensors, and COCO RLE dicts
    (``{"size": [H, W], "counts": ...}``, compressed or not), which pycocotools decodes."""
    if isinstance(x, dict):
        return decode_rle(x)
    a = to_numpy(x)
    if a.ndim != 2:
        raise ValueError(f"{what} must be a 2-D (H, W) array, got shape {tuple(a.shape)}")
    if a.dtype == np.bool_:
        return a
    if not np.all(np.isin(a, (0, 1))):
        raise ValueError(f"{what} must be binary (bool or 0/1); binarize heat maps first (see binarize_daam)")
    return a.astype(bool)


def check_same_shape(a: np.ndarray, b: np.ndarray, what_a: str = "heat map", what_b: str = "mask") -> None:
    """ValueError naming both shapes and the fix when ``a`` and ``b`` differ in shape."""
    if a.shape != b.shape:
        raise ValueError(
            f"{what_a} shape {tuple(a.shape)} does not match {what_b} shape {tuple(b.shape)}: resize the map to "
            f"the mask's size first, e.g. attribution.to_image(size={tuple(b.shape)}) (or .normalized/.binarize "
            f"with size=...), or resize the mask to the map"
        )


def minmax(a: np.ndarray) -> np.ndarray:
    """Min-max normalize to [0, 1] with DAAM's 1e-8 guard (a constant map becomes all zeros)."""
    return (a - a.min()) / (a.max() - a.min() + MINMAX_EPS)


def prepare(a: np.ndarray, normalize: str) -> np.ndarray:
    """Apply ``normalize`` ("minmax" or "none") and clip negatives to 0 (relevance is non-negative mass)."""
    if normalize == "minmax":
        a = minmax(a)
    elif normalize != "none":
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    return np.clip(a, 0.0, None)


def check_normalize(normalize: str) -> str:
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    return normalize


def to_distribution(x: Any, what: str = "distribution") -> np.ndarray:
    """Flattened non-negative values divided by their sum; an all-zero input becomes uniform.

    Why uniform: a map or score vector with no mass carries no information about where (or on which
    token) it concentrates, which is exactly what the uniform distribution expresses; any other choice
    would make an all-zero map look concentrated.
    """
    a = to_numpy(x).astype(np.float64, copy=False).ravel()
    if a.size == 0:
        raise ValueError(f"{what} is empty")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what} contains NaN or infinite values")
    if np.any(a < 0):
        raise ValueError(f"{what} has negative entries (min {a.min():.3g}); pass non-negative scores or maps")
    s = a.sum()
    if s == 0:
        return np.full(a.size, 1.0 / a.size)
    return a / s
