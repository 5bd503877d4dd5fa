"""ShapesWorld scenes: a seeded procedural generator, an exact rasterizer and an English prompt grammar.

A scene is 1-3 flat-coloured shapes on a plain background. Each object has a shape noun, a colour
adjective, a size adjective and a position; objects never overlap or touch and have distinct colours,
so every object's mask is exactly the set of pixels painted in its colour. Rendering uses hard
pixel-centre tests (no anti-aliasing): the returned masks match the rendered pixels exactly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = [
    "BACKGROUND",
    "COLORS",
    "FILLER_ADVERBS",
    "FILLER_VERBS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "Scene",
    "SceneObject",
    "render",
    "sample_scene",
    "shape_mask",
    "vocabulary",
]

#: Shape nouns (each a single CLIP BPE token).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "cross")

#: Colour adjective -> RGB. Chosen far apart in hue so analytic colour segmentation is unambiguous.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}

#: Size adjective -> radius range as a fraction of the canvas side.
SIZES: dict[str, tuple[float, float]] = {
    "small": (0.11, 0.14),
    "large": (0.19, 0.23),
}

#: Background RGB (light gray).
BACKGROUND: tuple[int, int, int] = (240, 240, 240)

#: Spatial relations between two objects (the picture decides which one holds).
RELATIONS: tuple[str, ...] = ("above", "below", "left of", "right of", "next to")

#: Verbs and adverbs that never change the picture (material for POS ablations).
FILLER_VERBS: tuple[str, ...] = ("resting", "sitting", "floating", "lying")
FILLER_ADVERBS: tuple[str, ...] = ("quietly", "softly", "gently", "still")

_DETERMINERS: tuple[str, ...] = ("a", "an", "one", "the")
_POSITIONS_3x3 = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)


@dataclass(frozen=True)
class SceneObject:
    """One object: shape noun, colour and size adjectives, centre and radius in pixels."""

    shape: str
    color: str
    size: str
    cx: float
    cy: float
    radius: float


@dataclass(frozen=True)
class Scene:
    """A full scene: canvas side, objects (drawing order) and the seed that produced it."""

    size: int
    objects: tuple[SceneObject, ...]
    seed: int = 0
    meta: dict = field(default_factory=dict, compare=False)

    def position(self, obj: SceneObject) -> str:
        """Position phrase of ``obj`` on a 3x3 grid of the canvas."""
        col = min(int(3 * obj.cx / self.size), 2)
        row = min(int(3 * obj.cy / self.size), 2)
        return _POSITIONS_3x3[row][col]

    def relation(self, a: SceneObject, b: SceneObject) -> str:
        """The relation that holds from ``a`` to ``b`` along the dominant axis ("above", "left of", ...)."""
        dx, dy = b.cx - a.cx, b.cy - a.cy
        if abs(dy) >= abs(dx):
            return "above" if dy > 0 else "below"
        return "left of" if dx > 0 else "right of"

    def to_dict(self) -> dict:
        """JSON-friendly description."""
        return {"size": self.size, "seed": self.seed, "objects": [asdict(o) for o in self.objects]}


def _polygon_mask(xs: np.ndarray, ys: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test for all points (vectorised over points, looped over edges)."""
    inside = np.zeros(xs.shape, dtype=bool)
    n = len(poly)
    for i in range(n):
        x1, y1 = poly[i]
        x2, y2 = poly[(i + 1) % n]
        crosses = (y1 > ys) != (y2 > ys)
        with np.errstate(divide="ignore", invalid="ignore"):
            xint = x1 + (ys - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (xs < xint)
    return inside


def shape_mask(shape: str, cx: float, cy: float, radius: float, size: int | tuple[int, int]) -> np.ndarray:
    """Boolean ``(H, W)`` mask of ``shape`` centred at ``(cx, cy)`` with outer radius ``radius`` (pixels).

    Pixel ``(i, j)`` is inside when its centre ``(j + 0.5, i + 0.5)`` is. All shapes fit in the
    circle of ``radius`` around the centre, so non-overlap of those circles means non-overlap of shapes.
    """
    h, w = (size, size) if isinstance(size, int) else size
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    dx, dy = (xs - cx) / radius, (ys - cy) / radius  # unit coordinates, y down
    if shape == "circle":
        return dx**2 + dy**2 <= 0.97**2
    if shape == "square":
        return (np.abs(dx) <= 0.7) & (np.abs(dy) <= 0.7)
    if shape == "triangle":
        poly = np.array([(0.0, -0.98), (-0.9, 0.62), (0.9, 0.62)])
        return _polygon_mask(dx, dy, poly)
    if shape == "star":
        pts = []
        for k in range(10):
            r = 0.98 if k % 2 == 0 else 0.42
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((r * math.cos(a), r * math.sin(a)))
        return _polygon_mask(dx, dy, np.array(pts))
    if shape == "heart":
        x, y = dx / 0.82, -(dy + 0.1) / 0.82  # y up; classic implicit heart curve
        return (x**2 + y**2 - 1) ** 3 - x**2 * y**3 <= 0
    if shape == "cross":
        arm = 0.3
        return ((np.abs(dx) <= 0.85) & (np.abs(dy) <= arm)) | ((np.abs(dy) <= 0.85) & (np.abs(dx) <= arm))
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def sample_scene(
    rng: np.random.Generator | int,
    *,
    size: int = 64,
    n_objects: int | None = None,
    max_objects: int = 3,
    seed: int = 0,
) -> Scene:
    """Draw a random scene: ``n_objects`` (default 1..max_objects) shapes with distinct colours, not touching.

    Placement is by rejection sampling of centres; sizes are re-drawn smaller if a layout cannot be found.
    """
    if isinstance(rng, int):
        seed = rng
        rng = np.random.default_rng(rng)
    n = int(n_objects if n_objects is not None else rng.integers(1, max_objects + 1))
    if not 1 <= n <= 3:
        raise ValueError(f"a scene has 1 to 3 objects, got {n}")
    colors = list(COLORS)
    chosen_colors = [colors[i] for i in rng.permutation(len(colors))[:n]]
    objects: list[SceneObject] = []
    margin = 2.0
    for color in chosen_colors:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        size_word = "small" if (n == 3 or rng.random() < 0.5) and rng.random() < 0.6 else "large"
        if n == 1:
            size_word = "small" if rng.random() < 0.5 else "large"
        for attempt in range(200):
            if attempt == 100:
                size_word = "small"
            lo, hi = SIZES[size_word]
            r = float(rng.uniform(lo, hi)) * size
            cx = float(rng.uniform(r + 1, size - r - 1))
            cy = float(rng.uniform(r + 1, size - r - 1))
            if all(math.hypot(cx - o.cx, cy - o.cy) > r + o.radius + margin for o in objects):
                objects.append(SceneObject(shape, color, size_word, cx, cy, r))
                break
        else:  # pragma: no cover - 3 small objects always fit on a 64 px canvas
            raise RuntimeError("could not place objects without overlap")
    return Scene(size=size, objects=tuple(objects), seed=seed)


def render(scene: Scene) -> tuple[np.ndarray, list[np.ndarray]]:
    """Rasterize ``scene``: ``(H, W, 3)`` uint8 image and one exact boolean mask per object (scene order)."""
    s = scene.size
    image = np.empty((s, s, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    masks = []
    for obj in scene.objects:
        m = shape_mask(obj.shape, obj.cx, obj.cy, obj.radius, s)
        image[m] = COLORS[obj.color]
        masks.append(m)
    return image, masks


def vocabulary() -> list[str]:
    """Every word the prompt grammar can emit (for tokenizer checks and model cards)."""
    words = set(SHAPES) | set(COLORS) | set(SIZES) | set(FILLER_VERBS) | set(FILLER_ADVERBS) | set(_DETERMINERS)
    for phrase in RELATIONS + tuple(p for row in _POSITIONS_3x3 for p in row):
        words |= set(phrase.split())
    words |= {"and", "with", "in", "at", "the", "is", "on"}
    return sorted(words)
