"""Analytic prompt-adherence checker for ShapesWorld: colour segmentation plus shape template matching.

ShapesWorld's stand-in for CLIP-score style adherence metrics. For each object phrase of a prompt
("a small red circle") it decides whether an object of that colour and shape is in the image:

1. every pixel is assigned to the nearest palette colour or the background (RGB distance), pixels far
   from all of them are left unassigned;
2. the pixels of the phrase's colour are split into 8-connected components; tiny ones are dropped;
3. each component is compared with every shape's template fitted to its bounding box (IoU); the
   best-matching template is the component's shape.

An object is *present* when some isolated component of its colour (objects never touch, so a region
bordering other colours is noise or a merged blob) is classified as its shape with template IoU >= ``min_iou``;
its *score* is the best template IoU of its shape over components of its colour.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache

import numpy as np
from scipy import ndimage

from .scene import BACKGROUND, COLORS, SHAPES, SIZES, shape_mask

__all__ = [
    "Check",
    "Component",
    "ObjectCheck",
    "ObjectSpec",
    "check",
    "classify_component",
    "color_components",
    "object_mask",
    "parse_prompt",
    "segment_colors",
]

_PALETTE_NAMES = ("background", *COLORS)
_PALETTE = np.array([BACKGROUND, *COLORS.values()], dtype=np.float32)
_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class ObjectSpec:
    """An object phrase of a prompt: shape noun, colour and (optional) size adjective."""

    shape: str
    color: str | None
    size: str | None = None

    @property
    def phrase(self) -> str:
        """The phrase as words, e.g. "small red circle"."""
        return " ".join(w for w in (self.size, self.color, self.shape) if w)


@dataclass
class Component:
    """A connected region of one palette colour with its best-matching shape."""

    color: str
    mask: np.ndarray
    shape: str
    ious: dict[str, float]
    radius: float
    isolated: bool = True  # mostly surrounded by background (objects never touch in ShapesWorld)

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass
class ObjectCheck:
    """The verdict for one object phrase."""

    spec: ObjectSpec
    present: bool
    score: float  # best template IoU of the phrase's shape over components of its colour
    size_ok: bool | None  # None when the prompt gives no size or the object is absent
    mask: np.ndarray | None = field(default=None, repr=False)  # the matching component, if present


@dataclass
class Check:
    """Per-object verdicts for one image and prompt, with the minimum over objects."""

    prompt: str
    objects: list[ObjectCheck]

    @property
    def all_present(self) -> bool:
        """True when every object phrase is present."""
        return all(o.present for o in self.objects)

    @property
    def min_score(self) -> float:
        """Minimum per-object score (0 for a prompt without objects)."""
        return min((o.score for o in self.objects), default=0.0)

    @property
    def presence(self) -> list[bool]:
        """Per-object presence, in prompt order."""
        return [o.present for o in self.objects]


def parse_prompt(prompt: str) -> list[ObjectSpec]:
    """The object phrases of a ShapesWorld prompt: each shape noun with the colour/size words just before it."""
    words = _WORD.findall(prompt.lower())
    specs = []
    for i, w in enumerate(words):
        if w not in SHAPES:
            continue
        color = size = None
        for prev in reversed(words[max(0, i - 3) : i]):
            if prev in COLORS and color is None:
                color = prev
            elif prev in SIZES and size is None:
                size = prev
            elif prev in SHAPES:
                break
        specs.append(ObjectSpec(w, color, size))
    return specs


def _as_array(image) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(arr * 255.0 if arr.max() <= 1.0 else arr, 0, 255).astype(np.uint8)
    if arr.ndim != 3 or arr.shape[2] < 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {arr.shape}")
    return arr[..., :3]


def segment_colors(image, max_distance: float = 90.0) -> np.ndarray:
    """Label map ``(H, W)``: 0 background, k >= 1 the k-th colour of :data:`COLORS`, -1 unassigned."""
    arr = _as_array(image).astype(np.float32)
    d = np.linalg.norm(arr[:, :, None, :] - _PALETTE[None, None], axis=-1)
    labels = d.argmin(-1)
    labels[d.min(-1) > max_distance] = -1
    return labels


@cache
def _unit_extent(shape: str) -> tuple[float, float, float, float]:
    """Bounding box ``(x0, x1, y0, y1)`` of a shape of radius 1 centred at 0 (from a fine rasterization)."""
    n, r = 401, 180.0
    m = shape_mask(shape, n / 2, n / 2, r, n)
    ys, xs = np.nonzero(m)
    return ((xs.min() - n / 2) / r, (xs.max() + 1 - n / 2) / r, (ys.min() - n / 2) / r, (ys.max() + 1 - n / 2) / r)


def _template_iou(mask: np.ndarray, shape: str, box: tuple[int, int, int, int]) -> tuple[float, float]:
    """IoU of ``mask`` with ``shape`` fitted to the component's bounding box; also the fitted radius."""
    y0, y1, x0, x1 = box
    ux0, ux1, uy0, uy1 = _unit_extent(shape)
    r = 0.5 * ((x1 - x0) / (ux1 - ux0) + (y1 - y0) / (uy1 - uy0))
    cx = 0.5 * (x0 + x1) - r * 0.5 * (ux0 + ux1)
    cy = 0.5 * (y0 + y1) - r * 0.5 * (uy0 + uy1)
    pad = 2
    h, w = mask.shape
    sy0, sy1, sx0, sx1 = max(0, y0 - pad), min(h, y1 + pad), max(0, x0 - pad), min(w, x1 + pad)
    crop = mask[sy0:sy1, sx0:sx1]
    tmpl = shape_mask(shape, cx - sx0, cy - sy0, max(r, 0.5), crop.shape)
    inter = np.logical_and(crop, tmpl).sum()
    union = np.logical_or(crop, tmpl).sum()
    return (float(inter / union) if union else 0.0), float(r)


def classify_component(mask: np.ndarray) -> tuple[str, dict[str, float], float]:
    """Best-matching shape of a component mask, the template IoU of every shape and the fitted radius."""
    ys, xs = np.nonzero(mask)
    box = (int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1)
    fits = {s: _template_iou(mask, s, box) for s in SHAPES}
    ious = {s: f[0] for s, f in fits.items()}
    best = max(ious, key=ious.get)
    return best, ious, fits[best][1]


def color_components(image, color: str, *, labels: np.ndarray | None = None,
                     min_area_frac: float = 0.008, min_isolation: float = 0.5) -> list[Component]:
    """The connected components of one palette colour (8-connectivity), each classified by shape.

    Components under ``min_area_frac`` of the image are dropped; a component is *isolated* when at least
    ``min_isolation`` of the ring 2-3 pixels around it (past the blurred edge) is background, not noise.
    """
    if labels is None:
        labels = segment_colors(image)
    k = _PALETTE_NAMES.index(color)
    region = labels == k
    if not region.any():
        return []
    lab, n = ndimage.label(region, structure=np.ones((3, 3), dtype=bool))
    min_area = max(4, int(round(min_area_frac * labels.size)))
    out = []
    for i in range(1, n + 1):
        m = lab == i
        if m.sum() < min_area:
            continue
        m = ndimage.binary_fill_holes(m)
        shape, ious, r = classify_component(m)
        ring = ndimage.binary_dilation(m, iterations=3) & ~ndimage.binary_dilation(m, iterations=1)
        isolated = bool((labels[ring] == 0).mean() >= min_isolation) if ring.any() else True
        out.append(Component(color, m, shape, ious, r, isolated))
    return out


def _size_word(radius: float, side: int) -> str:
    small_hi, large_lo = SIZES["small"][1], SIZES["large"][0]
    return "small" if radius / side < 0.5 * (small_hi + large_lo) else "large"


def check(image, prompt: str | list[ObjectSpec], *, min_iou: float = 0.7) -> Check:
    """Check every object phrase of ``prompt`` in ``image`` (PIL image or ``(H, W, 3)`` array).

    A phrase without a colour matches components of any colour.
    """
    specs = parse_prompt(prompt) if isinstance(prompt, str) else list(prompt)
    arr = _as_array(image)
    labels = segment_colors(arr)
    cache: dict[str, list[Component]] = {}
    results = []
    for spec in specs:
        colors = [spec.color] if spec.color else list(COLORS)
        comps = []
        for c in colors:
            if c not in cache:
                cache[c] = color_components(arr, c, labels=labels)
            comps += cache[c]
        best: Component | None = None
        score = 0.0
        for comp in comps:
            iou = comp.ious[spec.shape]
            ok = comp.isolated and comp.shape == spec.shape and iou >= min_iou
            if ok and (best is None or iou > best.ious[spec.shape]):
                best = comp
            score = max(score, iou)
        size_ok = None
        if best is not None and spec.size is not None:
            size_ok = _size_word(best.radius, min(arr.shape[:2])) == spec.size
        results.append(ObjectCheck(spec, best is not None, score, size_ok, None if best is None else best.mask))
    text = prompt if isinstance(prompt, str) else ", ".join(s.phrase for s in specs)
    return Check(text, results)


def object_mask(image, spec: ObjectSpec) -> np.ndarray | None:
    """The pixel mask of the component that realises ``spec`` in ``image`` (None when absent)."""
    return check(image, [spec]).objects[0].mask
