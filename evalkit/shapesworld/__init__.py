"""ShapesWorld: a procedural world of coloured shapes with exact ground truth, and a model trained on it.

- :mod:`.scene`: seeded scene generator and exact rasterizer (1-3 shapes, distinct colours, no overlap);
- :mod:`.grammar`: the English prompt grammar, recording which prompt words name which object;
- :mod:`.dataset`: evaluation items (prompt, seed, image size, exact masks per grounded word), COCO export;
- :mod:`.checker`: analytic adherence checker (colour segmentation + shape templates);
- :mod:`.evaluate`: presence accuracy and DAAM localization of a trained model.

The trained pipeline is the built-in model ``shapesworld`` (``evalkit.models.load("shapesworld")``).
"""

from .checker import Check, ObjectCheck, ObjectSpec, check, parse_prompt, segment_colors
from .dataset import Annotation, Item, dataset, iter_dataset, to_coco
from .grammar import GroundedWord, Prompt, describe
from .scene import COLORS, SHAPES, SIZES, Scene, SceneObject, render, sample_scene, shape_mask, vocabulary

__all__ = [
    "COLORS",
    "SAMPLING",
    "SHAPES",
    "SIZES",
    "Annotation",
    "Check",
    "GroundedWord",
    "Item",
    "ObjectCheck",
    "ObjectSpec",
    "Prompt",
    "Scene",
    "SceneObject",
    "check",
    "dataset",
    "describe",
    "iter_dataset",
    "parse_prompt",
    "render",
    "sample_scene",
    "segment_colors",
    "shape_mask",
    "to_coco",
    "vocabulary",
]

#: Default sampling settings of the ShapesWorld model (DDIM is the pipeline's scheduler).
SAMPLING: dict = {"steps": 25, "guidance": 4.0, "height": 64, "width": 64}
