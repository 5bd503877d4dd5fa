"""What the protocols share: generating a case with the suite's sampler, word maps at mask size, the
masks a case is scored against, per-head divergences between a baseline and a token-removal run, and
(de)serializing head scores into a case's arrays."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..metrics import Metric
from ..metrics.mapstats import js_divergence


def generate_case(pipe, spec: Any, prompts, seeds, stats=(), interventions=()):
    """Generate and trace ``prompts`` (one seed each) with the suite's sampler."""
    from ..trace import generate

    s = spec.sampler
    return generate(pipe, prompts, seeds=seeds, steps=s.steps, guidance=s.guidance, height=s.height, width=s.width,
                    stats=sorted(set(stats)), interventions=interventions, reading=s.reading)


def word_heat(method: Any, trace, word: str, size: tuple[int, int]) -> np.ndarray:
    """``method``'s map of ``word`` at ``size`` (float32), what single-map metrics score."""
    return method.attribute(trace, [word]).to_image(size)[word].numpy().astype(np.float32)


def map_size(item: Any, spec: Any) -> tuple[int, int]:
    """The size maps are scored at: the item's masks' (else the data's image size)."""
    for m in item.masks.values():
        return tuple(m.shape)
    return (spec.data.size, spec.data.size)


def image_array(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """``image`` as RGB floats in [0, 1] at ``size`` (H, W)."""
    if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def case_masks(spec: Any, item: Any, image: Image.Image) -> dict[str, np.ndarray]:
    """The masks a case's maps are scored against (``options.masks``):

    - ``auto`` (default): what the attribution protocol uses: the item's grounder applied to the
      generated image when the data loader gives one (``EvalItem.ground``), else the item's masks;
    - ``reference``: the item's exact masks of the reference scene;
    - ``generated``: the pixels of the word's object in the case's generated (baseline) image (the
      item's grounder, else ShapesWorld's checker): the model need not reproduce the reference layout.

    Masks from the grounder take the reference mask's size; a word without a reference mask (a caption's
    noun under Grounded-SAM) keeps the image's. An object not found in the image gives an empty mask: a NaN
    sample, excluded and counted."""
    mode = spec.options.get("masks", "auto")
    if mode not in ("auto", "generated", "reference"):
        raise ValueError(f"suite {spec.name!r}: options.masks must be auto, generated or reference, got {mode!r}")
    ground = getattr(item, "ground", None)
    if mode == "reference" or (mode == "auto" and ground is None):
        return {w: m.astype(bool) for w, m in item.masks.items()}
    if ground is not None:
        found = ground(image)
    else:
        from ..shapesworld import check, parse_prompt

        verdict = check(image, parse_prompt(item.prompt))
        found = {}
        for w in item.masks:
            m = np.zeros(image.size[::-1], dtype=bool)
            for o in verdict.objects:
                if w in (o.spec.shape, o.spec.color, o.spec.size) and o.mask is not None:
                    m |= o.mask
            found[w] = m
    out = {}
    for w in item.words:
        ref = item.masks.get(w)
        shape = ref.shape if ref is not None else image.size[::-1]
        m = np.asarray(found.get(w, np.zeros(shape, dtype=bool)), dtype=bool)
        if m.shape != shape:
            m = np.asarray(Image.fromarray(m).resize(shape[::-1], Image.NEAREST), dtype=bool)
        out[w] = m
    return out


def aligned_positions(base, removed, word: str) -> tuple[list[int], list[int], list[int]]:
    """Baseline support positions, those kept after removing ``word``, and their positions in ``removed``."""
    support = list(range(1, base.tokens.n_tokens - 1))
    gone = set(base.tokens.positions(word))
    kept = [p for p in support if p not in gone]
    other = list(range(1, removed.tokens.n_tokens - 1))
    if len(kept) != len(other):
        raise ValueError(f"cannot align {base.prompt!r} minus {word!r} with {removed.prompt!r}")
    return support, kept, other


def head_shift(base, removed, word: str) -> np.ndarray:
    """Per (layer, head), flattened: JS divergence (bits) between the baseline's and the removal run's
    token distributions P_h, P_h^{\\i} over the baseline's words (the removed tokens get 0)."""
    from ..methods import head_strengths

    support, kept, other = aligned_positions(base, removed, word)
    cols = [support.index(k) for k in kept]
    out = []
    for gb, gr in zip(head_strengths(base), head_strengths(removed)):
        p = gb[:, support].numpy()
        q = np.zeros_like(p)
        q[:, cols] = gr[:, other].numpy()
        out += [js_divergence(p[h], q[h]) for h in range(p.shape[0])]
    return np.asarray(out, dtype=np.float64)


def flat_scores(scores) -> np.ndarray:
    """Per-(layer, head) scores as one flat array (layer order), as stored in a case's arrays."""
    return np.concatenate([np.asarray(v, dtype=np.float64) for v in scores.values])


def record(metric: Metric, value: float) -> float:
    """Record a derived per-sample value (the metric's own reduction, CI and counts apply)."""
    return metric.record(float(value))


def layers_to_json(layers) -> list[dict]:
    """Layer descriptions for a case's json (to rebuild head scores when scoring)."""
    return [vars(lay) for lay in layers]


def layers_from_json(raw: list[dict]):
    """Inverse of :func:`layers_to_json`."""
    from ..trace import LayerInfo

    return [LayerInfo(**d) for d in raw]


def scores_from_flat(layers, flat: np.ndarray, label: str):
    """Inverse of :func:`flat_scores`: HeadScores over ``layers``."""
    from ..analysis import HeadScores

    values, i = [], 0
    for lay in layers:
        values.append(np.asarray(flat[i:i + lay.heads], dtype=np.float64))
        i += lay.heads
    return HeadScores(layers=list(layers), values=values, label=label)


def clean(v):
    """A per-item value for the samples table: float, or None when excluded (NaN)."""
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) else v


def safe_name(word: str) -> str:
    """``word`` usable in a file name."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in word)


_NLP = None


def spacy_nlp():
    """The spaCy pipeline, loaded once per process."""
    global _NLP
    if _NLP is None:
        from ..analysis import load_spacy

        _NLP = load_spacy()
    return _NLP


def prompt_nouns(prompt: str) -> list[str]:
    """The prompt's nouns as spaCy tags them (NOUN, PROPN), distinct, in order: a caption's object words."""
    return list(dict.fromkeys(t.text for t in spacy_nlp()(prompt) if t.pos_ in ("NOUN", "PROPN")))


def read_json(path: Path) -> Any:
    """A case entry's json file."""
    return json.loads(Path(path).read_text())
