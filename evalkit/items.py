"""Evaluation items: prompt, seed, the words to attribute and their ground-truth masks, from ShapesWorld
(exact masks), a COCO-format JSON, a DAAM experiment folder, or a prompts file (no masks); a case is an item
at one seed. Shared by the suite runner and the protocols (below both in the layers)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .suites.schema import DataSpec


@dataclass
class EvalItem:
    """One prompt to generate and the masks its words are scored against (``(H, W)`` bool).

    ``ground``, when set, derives the masks from the *generated* image instead (ShapesWorld: the
    model places objects itself, so the reference scene's masks do not apply); ``masks`` then
    only fixes the words. ``unmasked`` lists further words to attribute that have no reference mask
    (captions without annotations): only ``ground`` gives them one.
    """

    id: str
    prompt: str
    seed: int
    masks: dict[str, np.ndarray] = field(repr=False)
    ground: Callable[[object], dict[str, np.ndarray]] | None = field(default=None, repr=False)
    unmasked: tuple[str, ...] = ()

    @property
    def words(self) -> list[str]:
        """The words to attribute: those with reference masks, then the unmasked ones."""
        return list(dict.fromkeys([*self.masks, *self.unmasked]))


@dataclass
class Case:
    """One generation: an item at one seed (``key``: its cache key, set by the runner)."""

    item: EvalItem
    seed: int
    key: str = ""


def resolve_data_path(raw: str, base_dir: Path | None = None) -> Path:
    """A data file named in a suite: as given (relative to the working directory), else under ``base_dir``
    (the built-in suites folder)."""
    path = Path(raw)
    if path.exists() or path.is_absolute() or base_dir is None:
        return path
    return base_dir / path if (base_dir / path).exists() else path


def read_prompts(path: Path) -> list[str]:
    """The prompts of a text file: one a line, blank lines and lines starting with ``#`` skipped."""
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {str(path)!r} not found")
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def prompt_items(path: Path, n: int, seed: int) -> list[EvalItem]:
    """The first ``n`` prompts of a prompts file as items without masks, item ``i`` at seed ``seed + i``."""
    return [EvalItem(id=f"{path.stem}-{i}", prompt=p, seed=seed + i, masks={})
            for i, p in enumerate(read_prompts(path)[:n])]


def load_items(spec: DataSpec, limit: int | None = None, base_dir: Path | None = None) -> list[EvalItem]:
    """Items of a data spec (at most ``limit``); relative paths not found as given resolve under ``base_dir``."""
    n = min(spec.n, limit) if limit else spec.n
    if spec.source == "shapesworld":
        from .shapesworld import dataset

        role = "noun" if spec.words == "nouns" else None
        return [
            EvalItem(id=f"sw-{spec.seed}-{it.index}", prompt=it.prompt, seed=it.seed, masks=it.masks(role),
                     ground=_shapesworld_grounder(it.prompt, list(it.masks(role))))
            for it in dataset(n, spec.seed, size=spec.size, n_objects=spec.n_objects, phrasing=spec.phrasing)
        ]
    from .groundtruth import GroundTruth, import_daam_folder

    if spec.path is None:
        raise ValueError(f"data source {spec.source!r} needs `path:` (a COCO json file, a DAAM folder or a prompts "
                         "file)")
    path = resolve_data_path(spec.path, base_dir)
    if spec.source == "prompts":
        return prompt_items(path, n, spec.seed)
    gt = GroundTruth.load(path) if spec.source == "coco" else import_daam_folder(path)
    items = []
    for img in gt.images[:n]:
        if img.seed is None:
            raise ValueError(
                f"{path}: image {img.id} ({img.file_name}) has no seed: add 'seed' to the image record"
            )
        items.append(EvalItem(id=f"{spec.source}-{img.id}", prompt=img.prompt, seed=int(img.seed),
                              masks=gt.masks_for(img.id)))
    return items


def _shapesworld_grounder(prompt: str, words: list[str]) -> Callable[[object], dict[str, np.ndarray]]:
    """Masks of ``words`` in a generated ShapesWorld image from the analytic checker's colour
    segmentation. An object phrase's mask is the union of the connected components of its colour
    that the checker classifies as its shape; if the model drew the colour but no component of the
    right shape, all components of that colour (what the model made of the phrase). A word maps
    to every object phrase containing it (a noun to each object of that shape), united. An object
    with no pixels of its colour gives an empty mask, scored as undefined and counted as excluded."""
    from .shapesworld.checker import color_components, parse_prompt, segment_colors

    specs = parse_prompt(prompt)

    def ground(image) -> dict[str, np.ndarray]:
        arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
        labels = segment_colors(arr)
        found = []
        for spec in specs:
            comps = color_components(arr, spec.color, labels=labels) if spec.color else []
            chosen = [c for c in comps if c.shape == spec.shape] or comps
            mask = np.zeros(arr.shape[:2], dtype=bool)
            for c in chosen:
                mask |= c.mask
            found.append(mask)
        out: dict[str, np.ndarray] = {}
        for w in words:
            mask = np.zeros(arr.shape[:2], dtype=bool)
            for spec, m in zip(specs, found):
                if w in (spec.shape, spec.color, spec.size):
                    mask |= m
            out[w] = mask
        return out

    return ground


def item_key(item_id: str, seed: int | None = None, word: str | None = None) -> str:
    """The key one per-item value is stored and paired under: ``<item>/s<seed>/<word>`` (parts left out
    when the value is not per seed or per word). Two rows are compared over the keys they share."""
    parts = [item_id]
    if seed is not None:
        parts.append(f"s{seed}")
    if word is not None:
        parts.append(word)
    return "/".join(parts)

