"""Protocol suites: the intervention ablations and the steering task of paper 000, run like the
attribution protocol (cases cached atomically by content, resumable; results keyed by (row id, metric
id) so the table, claims, MLflow and reports work unchanged).

A protocol suite sets ``protocol:`` and lists its rows as ``variants:`` (``id`` + ``params``), except
``aggregation-ablation`` whose rows are its ``methods:``. ``methods[0]`` is the attribution method that
draws the word maps (``norm`` in the shipped suites). Masks (option ``masks``, see :func:`case_masks`):
``auto`` (default) as the attribution protocol, ``reference`` the reference scene's exact masks,
``generated`` the pixels of the word's object in the case's generated image. One case is one item at one seed; its key
includes the protocol, every variant, the sampler, the model and the code, so a second run computes
nothing and any change to what shapes a case (a variant, the sampler, the model, the code) recomputes
it. Definitions:

``seed-control`` (paper 000 Table 6; variant params: ``seed_offset``, the removal run's seed minus
the baseline's: 0 = fixed seed, e.g. 1000 = varying seed). Per case the baseline and, per word and
variant, the word-removed prompt are generated in one batch (``methods:`` do not enter these numbers).
Per (case, word):

- ``avg-kl``: mean over all (layer, head) of S(h, i) = KL(P~_h || P~_h^{\\i}) (Eq. 10,
  :func:`evalkit.analysis.head_sensitivity`);
- ``shift``: mean over heads of the Jensen-Shannon divergence (bits) between the baseline and the
  removal run's per-head token distributions P_h, P_h^{\\i} (Eq. 9, unsmoothed);
- ``specificity``: relevance mass, inside the removed word's mask, of the removal's effect map
  ``mean_c |x_0 - x_0^{\\i}|`` (the per-pixel image change): a causal edit changes the removed object,
  not the whole image;
- ``variance``: per (item, word), the sample variance over the suite's seeds of that word's avg-kl.

``aggregation-ablation`` (Table 7; rows = methods, usually ``norm-heads-only``, ``norm-timesteps-only``
and ``norm``, defined on the classes below). Per (case, word): ``specificity`` (relevance mass in the
word's mask), ``noise`` (total variation) and any other single-map metric; ``stability``: per (item,
word, method), agreement of the word's maps over the suite's seeds (needs >= 2 seeds).

``head-removal`` (Table 4; variant params: ``heads`` = ``none`` | ``top`` | ``random``, ``k`` (5),
``seed`` (random draw)). S(h, i) comes from a token-removal sweep of the case; ``top`` ablates the word's
``k`` heads with the largest S(h, i), ``random`` ``k`` heads drawn with a seed derived from ``seed``, the
case seed and the word (:class:`~evalkit.interventions.HeadAblation`), one generation per (word, variant).
The word's map is the method's map of the ablated run with the ablated heads' statistics zeroed (they
inject nothing). Per (case, word): ``specificity`` (relevance mass in the mask), ``shift`` (JS divergence
between the ``none`` map and the variant's map), ``grounding-loss`` (relative drop of the relevance mass
vs ``none``, min-max normalized maps as in ``specificity``).

``pos-ablation`` (Table 5, Fig. 2; variant id = a POS group (NOUN, ADJ, VERB, ADP, DET, FUNC, ...) or
params ``pos``). Every alphanumeric prompt word (option ``words: nouns`` for the item's nouns only) is
removed once (fixed seed) and tagged by spaCy in context. Per word of the group: ``avg-kl`` as above and
``specificity`` = concentration (1 - normalized entropy) of the word's baseline map (function words
have no mask). Figures: POS head-spike heat maps, top heads per POS, the first case's removal grid.

``steering-adherence`` (Task B, Tables 2-3; variant params: ``steering`` = ``none`` | ``value`` |
``hrv``; value: ``alpha`` (2.0), ``k`` (5), ``steps`` (the first N UNet calls, default half of the
sampler's steps); hrv: ``hrv`` (an HRV JSON file, ``sd14``, or ``model`` for the running model's own vectors)).
An item a variant cannot steer (a noun whose removal changes how the other words tokenize has no
S(h, i); a noun no HRV concept lists; no noun; no HRV configured) gets no steered image: it is excluded
from that row with its reason and never scored as steered.
Value steering scales each object noun's value vectors in its top-k heads by S(h, i)
(:meth:`ValueSteering.from_sensitivity`); HRV strengthening rescales the noun's attention by its
concept's HRV (:class:`ConceptRescaling`). Adherence per image: ``checker-full-prompt`` (1 when every
object phrase is present, ShapesWorld's analytic checker), ``checker-mos`` (the minimum over objects of
the checker's score), and the CLIP metrics ``clip-full-prompt``, ``clip-min-object``, ``clip-score``
when their weights are configured (metric ``params.pretrained``: a local open_clip checkpoint); otherwise
they are skipped with a message. Option ``prompts``: a text file of prompts (one per line; relative
paths resolve against ``suites/``) instead of ShapesWorld items, e.g. for a hub model.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..methods import Attribution, AttributionMethod, aggregate, create_method, register_method
from ..metrics import Metric, MetricUnavailableError, create_metric, register_metric
from ..metrics.mapstats import js_divergence
from .cache import read_json
from .claims import judge_spec
from .data import EvalItem, item_key, load_items
from .schema import MethodSpec, SuiteSpec, VariantSpec

HERE = Path(__file__).resolve()


# =============================================================================================
# Methods of the aggregation ablation (paper 000 Table 7)
# =============================================================================================
@register_method("norm-heads-only")
class NormHeadsOnly(AttributionMethod):
    """Heads only: the norm contribution at ONE UNet call (``step``; default the middle call,
    ``n_steps // 2``), averaged over heads (the trace's per-step statistic ``norm_steps`` is the mean over a
    layer's heads), then over layers, each layer's map resized bicubically to the latent grid and clamped
    at 0. Keeps the timestep-specific variability that ``norm`` averages out."""

    needs = frozenset({"norm_steps"})
    summary = "Norm, heads only: one timestep (the middle UNet call) of the norm map, mean over heads and layers"
    upsample = "bicubic"

    def __init__(self, step: int | None = None) -> None:
        self.step = step

    def params(self) -> dict:
        return {"step": self.step}

    def token_maps(self, trace, positions: Sequence[int]) -> torch.Tensor:
        n = trace.stats["norm_steps"][0].shape[0]
        step = n // 2 if self.step is None else self.step
        if not -n <= step < n:
            raise ValueError(f"step {step} out of range: the trace has {n} UNet calls")
        total = None
        for li, layer in enumerate(trace.layers):
            x = trace.stats["norm_steps"][li][step]  # (Q, K)
            h, w = layer.grid(trace.latent_hw)
            maps = x[:, list(positions)].T.reshape(1, len(positions), h, w).float()
            maps = F.interpolate(maps, size=trace.latent_hw, mode="bicubic").clamp_(min=0)[0]
            total = maps if total is None else total + maps
        return total / len(trace.layers)


@register_method("norm-timesteps-only")
class NormTimestepsOnly(AttributionMethod):
    """Timesteps only: the norm map averaged over all UNet calls, of the single (layer, head) with the
    largest G_h(word) (mean over the word's tokens of G_h(k), see :func:`evalkit.analysis.head_strengths`),
    chosen per word; resized bicubically to the latent grid and clamped at 0. Keeps head-specific
    variability that ``norm`` averages out."""

    needs = frozenset({"norm"})
    summary = "Norm, timesteps only: mean over steps of the one (layer, head) with the largest G_h(word)"
    upsample = "bicubic"

    def best_head(self, trace, positions: Sequence[int]) -> tuple[int, int]:
        """(layer index, head index) with the largest mean G_h over ``positions``."""
        from ..analysis import head_strengths

        best, where = -math.inf, (0, 0)
        for li, g in enumerate(head_strengths(trace)):
            vals = g[:, list(positions)].mean(1)
            h = int(vals.argmax())
            if float(vals[h]) > best:
                best, where = float(vals[h]), (li, h)
        return where

    def token_maps(self, trace, positions: Sequence[int]) -> torch.Tensor:
        li, h = self.best_head(trace, positions)
        return aggregate(trace, "norm", positions, heads={li: [h]}, mode="bicubic", clamp=True, time="mean")

    def attribute(self, trace, words: Sequence[str]) -> Attribution:
        """One head per word (the token maps of a word come from its own best head)."""
        if isinstance(words, str):
            words = [words]
        trace.require(self.needs, who=f"method {self.name!r}")
        maps = {w: self.token_maps(trace, trace.tokens.positions(w)).mean(0) for w in words}
        return Attribution(method=self.name, prompt=trace.prompt, tokens=list(trace.tokens.pieces), maps=maps,
                           image_hw=trace.image_hw, upsample=self.upsample, params=self.params())


# =============================================================================================
# Metrics the protocols add
# =============================================================================================
@register_metric("avg-kl")
class AvgKL(Metric):
    """Avg. KL (paper 000 Tables 5-6): one sample is one removed word's S(h, i) over all heads; its value
    is their mean (nats). Reduced as the mean over samples with a Student-t 95% CI."""

    category = "map-statistics"
    direction = "higher"
    summary = "avg-kl: mean over heads of the head sensitivity S(h, i) of a token removal (nats)"
    source = "paper 000 Eq. 10, Tables 5-6"

    def update(self, scores: Any) -> float:
        """Score one removal: ``scores`` is a HeadScores or an array of per-head S(h, i)."""
        values = scores.values if isinstance(getattr(scores, "values", None), list) else [scores]
        arr = np.concatenate([np.ravel(np.asarray(v, dtype=np.float64)) for v in values])
        arr = arr[np.isfinite(arr)]
        return self._record(float(arr.mean()) if arr.size else math.nan, reason="no finite head sensitivity")


NO_PHRASE = "prompt has no ShapesWorld object phrase (the checker cannot score it)"


@register_metric("checker-full-prompt")
class CheckerFullPrompt(Metric):
    """Full-prompt adherence by ShapesWorld's analytic checker: 1 when every object phrase of the prompt is
    present in the image, else 0 (the mean is the all-present rate). A prompt without ShapesWorld object
    phrases is undefined (NaN)."""

    category = "adherence"
    direction = "higher"
    summary = "full-prompt adherence: share of images in which the checker finds every object of the prompt"
    source = "paper 000 Table 2 (Full Prompt Sim.), ShapesWorld analytic stand-in"

    def __init__(self, min_iou: float = 0.7) -> None:
        super().__init__()
        self.min_iou = float(min_iou)

    def params(self) -> dict:
        return {"min_iou": self.min_iou}

    def _check(self, image, prompt: str):
        from ..shapesworld import check, parse_prompt

        specs = parse_prompt(prompt)
        return check(image, specs, min_iou=self.min_iou) if specs else None

    def update(self, image: Any, prompt: str) -> float:
        c = self._check(image, prompt)
        return self._record(math.nan if c is None else float(c.all_present), reason=NO_PHRASE)


@register_metric("checker-mos")
class CheckerMinObjectScore(CheckerFullPrompt):
    """Minimum object score by ShapesWorld's analytic checker: the minimum over the prompt's objects of the
    best template IoU of the object's shape among components of its colour (0 when one is missing)."""

    summary = "min-object score: minimum over objects of the checker's per-object score"
    source = "paper 000 Table 2 (MOS), ShapesWorld analytic stand-in"

    def update(self, image: Any, prompt: str) -> float:
        c = self._check(image, prompt)
        return self._record(math.nan if c is None else float(c.min_score), reason=NO_PHRASE)


# =============================================================================================
# Shared machinery
# =============================================================================================
def protocol_code_version() -> str:
    """Hash of this module and of the analysis code the protocols use (part of every case key)."""
    from .store import source_digest

    return source_digest([HERE, *(HERE.parents[1] / "analysis").glob("*.py")])[:12]


def _gen(pipe, spec: SuiteSpec, prompts, seeds, stats=(), interventions=()):
    from ..trace import generate

    s = spec.sampler
    return generate(pipe, prompts, seeds=seeds, steps=s.steps, guidance=s.guidance, height=s.height, width=s.width,
                    stats=sorted(set(stats)), interventions=interventions)


def _heat(method: AttributionMethod, trace, word: str, size: tuple[int, int]) -> np.ndarray:
    return method.attribute(trace, [word]).to_image(size)[word].numpy().astype(np.float32)


def _size(item: EvalItem, spec: SuiteSpec) -> tuple[int, int]:
    for m in item.masks.values():
        return tuple(m.shape)
    return (spec.data.size, spec.data.size)


def _image_array(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def case_masks(spec: SuiteSpec, item: EvalItem, image: Image.Image) -> dict[str, np.ndarray]:
    """The masks a case's maps are scored against (``options.masks``):

    - ``auto`` (default): what the attribution protocol uses: the item's grounder applied to the
      generated image when the data loader gives one (``EvalItem.ground``), else the item's masks;
    - ``reference``: the item's exact masks of the reference scene;
    - ``generated``: the pixels of the word's object in the case's generated (baseline) image (the
      item's grounder, else ShapesWorld's checker): the model need not reproduce the reference layout.

    An object not found in the image gives an empty mask: a NaN sample, excluded and counted."""
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
    for w, ref in item.masks.items():
        m = np.asarray(found.get(w, np.zeros(ref.shape, dtype=bool)), dtype=bool)
        if m.shape != ref.shape:
            m = np.asarray(Image.fromarray(m).resize(ref.shape[::-1], Image.NEAREST), dtype=bool)
        out[w] = m
    return out


def _aligned(base, removed, word: str) -> tuple[list[int], list[int], list[int]]:
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
    from ..analysis import head_strengths

    support, kept, other = _aligned(base, removed, word)
    cols = [support.index(k) for k in kept]
    out = []
    for gb, gr in zip(head_strengths(base), head_strengths(removed)):
        p = gb[:, support].numpy()
        q = np.zeros_like(p)
        q[:, cols] = gr[:, other].numpy()
        out += [js_divergence(p[h], q[h]) for h in range(p.shape[0])]
    return np.asarray(out, dtype=np.float64)


def _flat(scores) -> np.ndarray:
    return np.concatenate([np.asarray(v, dtype=np.float64) for v in scores.values])


def _record(metric: Metric, value: float) -> float:
    """Record a derived per-sample value (the metric's own reduction, CI and counts apply)."""
    return metric._record(float(value))


def _layers_json(layers) -> list[dict]:
    return [vars(lay) for lay in layers]


def _layers(raw: list[dict]):
    from ..trace import LayerInfo

    return [LayerInfo(**d) for d in raw]


def _scores_from_flat(layers, flat: np.ndarray, label: str):
    from ..analysis import HeadScores

    values, i = [], 0
    for lay in layers:
        values.append(np.asarray(flat[i:i + lay.heads], dtype=np.float64))
        i += lay.heads
    return HeadScores(layers=list(layers), values=values, label=label)


def _check_metrics(spec: SuiteSpec, allowed: set[str] | None, heat_ok: bool = False) -> None:
    """Reject metrics a protocol does not define (heat_ok: any single-map metric is fine too)."""
    import inspect

    for m in spec.metrics:
        if allowed is not None and m.name in allowed:
            continue
        if heat_ok:
            cls = create_metric(m.name, **m.params)
            if "heat" in inspect.signature(cls.update).parameters:
                continue
        raise ValueError(f"suite {spec.name!r}: protocol {spec.protocol!r} does not define metric {m.name!r}; "
                         f"it defines {sorted(allowed or [])}{' and single-map metrics' if heat_ok else ''}")


# =============================================================================================
# seed-control
# =============================================================================================
SEED_METRICS = {"avg-kl", "shift", "specificity", "variance"}


def _seed_compute(pipe, spec, case, variants, method, stats):
    item, seed = case.item, case.seed
    words = item.words
    from ..interventions import TokenRemoval

    prompts, seeds, index = [item.prompt], [seed], {}
    for v in variants:
        off = int(v.params.get("seed_offset", 0))
        for w in words:
            index[(v.id, w)] = len(prompts)
            prompts.append(TokenRemoval(w).rewrite(item.prompt))
            seeds.append(seed + off)
    gen = _gen(pipe, spec, prompts, seeds, set(stats) | {"norm"})  # S(h, i) reads the norm statistic
    from ..analysis import alignment_problem, head_sensitivity

    base = gen.traces[0]
    size = _size(item, spec)
    base_img = _image_array(gen.images[0], size)
    arrays, files = {}, {"image.png": gen.images[0]}
    excluded = {}
    for (vid, w), i in index.items():
        tr = gen.traces[i]
        problem = alignment_problem(base, tr, w)
        if problem is None:
            arrays[f"kl/{vid}/{w}"] = _flat(head_sensitivity(base, tr, w)).astype(np.float32)
            arrays[f"js/{vid}/{w}"] = head_shift(base, tr, w).astype(np.float32)
        else:  # S(h, i) and the shift are undefined for this removal: excluded with the reason
            excluded[f"{vid}/{w}"] = problem
            arrays[f"kl/{vid}/{w}"] = np.full(1, np.nan, np.float32)
            arrays[f"js/{vid}/{w}"] = np.full(1, np.nan, np.float32)
        arrays[f"diff/{vid}/{w}"] = np.abs(base_img - _image_array(gen.images[i], size)).mean(-1).astype(np.float32)
        files[f"removed-{i}.png"] = gen.images[i]
    files["arrays.npz"] = arrays
    files["masks.npz"] = {w: m.astype(np.uint8) for w, m in case_masks(spec, item, gen.images[0]).items()}
    files["case.json"] = {"prompt": item.prompt, "seed": seed, "item": item.id, "words": words,
                          "prompts": prompts, "seeds": seeds, "index": {f"{k[0]}/{k[1]}": i for k, i in index.items()},
                          "layers": _layers_json(base.layers), "excluded": excluded}
    return files


def _seed_score(spec, cases, dirs, variants, figures_dir):
    metrics = {(v.id, k.label): create_metric(k.name, **k.params) for v in variants for k in spec.metrics}
    samples, per_item = [], {}
    for case, d in zip(cases, dirs):
        meta = read_json(d / "case.json")
        with np.load(d / "arrays.npz") as z:
            arrays = {k: z[k] for k in z.files}
        with np.load(d / "masks.npz") as z:
            masks = {w: z[w].astype(bool) for w in z.files}
        excluded = meta.get("excluded", {})
        for v in variants:
            for w in meta["words"]:
                kl, js, diff = arrays[f"kl/{v.id}/{w}"], arrays[f"js/{v.id}/{w}"], arrays[f"diff/{v.id}/{w}"]
                why = excluded.get(f"{v.id}/{w}")
                avg = float(np.mean(kl)) if why is None else math.nan
                per_item.setdefault((v.id, case.item.id, w), []).append(avg)
                key = item_key(case.item.id, case.seed, w)
                row = {"item": key, "case": case.item.id, "seed": case.seed, "prompt": case.item.prompt,
                       "method": v.id, "word": w}
                for k in spec.metrics:
                    m = metrics[(v.id, k.label)]
                    m.set_items(key)
                    if k.name in ("avg-kl", "shift") and why is not None:
                        val = m.exclude(key, why)
                    elif k.name == "avg-kl":
                        val = m.update(kl)
                    elif k.name == "shift":
                        val = _record(m, float(np.mean(js)))
                    elif k.name == "specificity":
                        val = m.update(diff, masks[w])
                    else:
                        continue
                    row[k.label] = _clean(val)
                samples.append(row)
    for (vid, item_id, w), values in per_item.items():
        for k in spec.metrics:
            if k.name == "variance":
                m = metrics[(vid, k.label)]
                m.set_items(item_key(item_id, word=w))
                m.update(values)
    return {key: m.compute() for key, m in metrics.items()}, samples, []


def _clean(v):
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) else v


# =============================================================================================
# aggregation-ablation
# =============================================================================================
def _agg_compute(pipe, spec, case, methods, method, stats):
    item = case.item
    gen = _gen(pipe, spec, item.prompt, case.seed, stats)
    trace = gen.traces[0]
    size = _size(item, spec)
    maps = {f"{label}/{w}": _heat(m, trace, w, size) for label, m in methods.items() for w in item.words}
    return {"image.png": gen.images[0], "maps.npz": maps,
            "masks.npz": {w: m.astype(np.uint8) for w, m in case_masks(spec, item, gen.images[0]).items()},
            "case.json": {"prompt": item.prompt, "seed": case.seed, "item": item.id, "words": item.words,
                          "n_unet_calls": trace.n_steps}}


def _agg_score(spec, cases, dirs, variants, figures_dir):
    from .runner import _update

    rows = [m.label for m in spec.methods]
    metrics = {(r, k.label): create_metric(k.name, **k.params) for r in rows for k in spec.metrics}
    samples, groups = [], {}
    for case, d in zip(cases, dirs):
        meta = read_json(d / "case.json")
        with np.load(d / "maps.npz") as z:
            maps = {k: z[k] for k in z.files}
        with np.load(d / "masks.npz") as z:
            masks = {w: z[w].astype(bool) for w in z.files}
        for r in rows:
            for w in meta["words"]:
                heat = maps[f"{r}/{w}"]
                groups.setdefault((r, case.item.id, w), []).append(heat)
                key = item_key(case.item.id, case.seed, w)
                row = {"item": key, "case": case.item.id, "seed": case.seed, "prompt": case.item.prompt,
                       "method": r, "word": w}
                for k in spec.metrics:
                    if k.name == "stability":
                        continue
                    row[k.label] = _clean(_update(metrics[(r, k.label)], heat, masks[w], w, key))
                samples.append(row)
    for (r, item_id, w), heats in groups.items():
        for k in spec.metrics:
            if k.name == "stability":
                m = metrics[(r, k.label)]
                key = item_key(item_id, word=w)
                if len(heats) >= 2:
                    m.set_items(key)
                    m.update(heats)
                else:
                    m.exclude(key, "stability needs the word's maps at >= 2 seeds (set `seeds:`)")
    return {key: m.compute() for key, m in metrics.items()}, samples, []


# =============================================================================================
# head-removal
# =============================================================================================
HEAD_METRICS = {"specificity", "shift", "grounding-loss"}


def _zero_heads(trace, heads: Sequence[str]):
    """A copy of ``trace`` whose summed statistics of ``heads`` are 0 (ablated heads inject nothing)."""
    from dataclasses import replace

    from ..interventions import head_index

    index = head_index(trace.layers)
    li_of = {lay.name: i for i, lay in enumerate(trace.layers)}
    stats = {k: [t.clone() for t in v] for k, v in trace.stats.items()}
    for name in heads:
        layer, h = index[name]
        for k, per_layer in stats.items():
            if not k.endswith("_steps"):
                per_layer[li_of[layer.name]][h] = 0
    return replace(trace, stats=stats)


def _random_seed(base: int, case_seed: int, word: str) -> int:
    return int(zlib.crc32(f"{base}/{case_seed}/{word}".encode()))


def _head_compute(pipe, spec, case, variants, method, stats):
    from ..analysis import alignment_problem, head_sensitivity
    from ..interventions import HeadAblation, token_removal_sweep

    item, seed, s = case.item, case.seed, spec.sampler
    stats = sorted(set(stats) | {"norm"})
    sweep = token_removal_sweep(pipe, item.prompt, seed=seed, words=item.words, steps=s.steps, guidance=s.guidance,
                                height=s.height, width=s.width, stats=stats, batch_size=len(item.words) + 1)
    base = sweep.traces[""]
    size = _size(item, spec)
    names = base.head_names()
    arrays, chosen, files, excluded = {}, {}, {"image.png": sweep.images[""]}, {}
    for w in item.words:
        problem = alignment_problem(base, sweep.traces[w], w)
        scores = head_sensitivity(base, sweep.traces[w], w) if problem is None else None
        if scores is not None:
            arrays[f"kl/{w}"] = _flat(scores).astype(np.float32)
        arrays[f"map/_none/{w}"] = _heat(method, base, w, size)
        for v in variants:
            mode = v.params.get("heads", "none")
            k = int(v.params.get("k", 5))
            if mode == "none":
                arrays[f"map/{v.id}/{w}"] = arrays[f"map/_none/{w}"]
                chosen[f"{v.id}/{w}"] = []
                continue
            if mode == "top" and scores is None:  # no S(h, i): the word's top heads are unknown
                excluded[f"{v.id}/{w}"] = f"no head sensitivity for {w!r}: {problem}"
                continue
            if mode == "top":
                heads = HeadAblation.top_k(scores.as_dict(), k)
            elif mode == "random":
                heads = HeadAblation.random(names, k, _random_seed(int(v.params.get("seed", 0)), seed, w))
            else:
                raise ValueError(f"variant {v.id!r}: heads must be 'none', 'top' or 'random', got {mode!r}")
            gen = _gen(pipe, spec, item.prompt, seed, stats, interventions=[HeadAblation(heads)])
            arrays[f"map/{v.id}/{w}"] = _heat(method, _zero_heads(gen.traces[0], heads), w, size)
            chosen[f"{v.id}/{w}"] = list(heads)
            files[f"{v.id}-{_safe(w)}.png"] = gen.images[0]
    files["arrays.npz"] = arrays
    files["masks.npz"] = {w: m.astype(np.uint8) for w, m in case_masks(spec, item, sweep.images[""]).items()}
    files["case.json"] = {"prompt": item.prompt, "seed": seed, "item": item.id, "words": item.words,
                          "ablated": chosen, "layers": _layers_json(base.layers), "excluded": excluded}
    return files


def _safe(word: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in word)


def _head_score(spec, cases, dirs, variants, figures_dir):
    from ..metrics import specificity

    metrics = {(v.id, k.label): create_metric(k.name, **k.params) for v in variants for k in spec.metrics}
    samples = []
    for case, d in zip(cases, dirs):
        meta = read_json(d / "case.json")
        with np.load(d / "arrays.npz") as z:
            arrays = {k: z[k] for k in z.files}
        with np.load(d / "masks.npz") as z:
            masks = {w: z[w].astype(bool) for w in z.files}
        excluded = meta.get("excluded", {})
        for v in variants:
            for w in meta["words"]:
                key = item_key(case.item.id, case.seed, w)
                why = excluded.get(f"{v.id}/{w}")
                row = {"item": key, "case": case.item.id, "seed": case.seed, "prompt": case.item.prompt,
                       "method": v.id, "word": w, "ablated": ", ".join(meta["ablated"].get(f"{v.id}/{w}", []))}
                if why is not None:
                    for k in spec.metrics:
                        row[k.label] = _clean(metrics[(v.id, k.label)].exclude(key, why))
                    samples.append(row)
                    continue
                ref, heat, mask = arrays[f"map/_none/{w}"], arrays[f"map/{v.id}/{w}"], masks[w]
                for k in spec.metrics:
                    m = metrics[(v.id, k.label)]
                    m.set_items(key)
                    if k.name == "specificity":
                        val = m.update(heat, mask)
                    elif k.name == "shift":
                        val = m.update(ref, heat)
                    elif k.name == "grounding-loss":
                        val = m.update(specificity(heat, mask), specificity(ref, mask))
                    else:
                        from .runner import _update

                        val = _update(m, heat, mask, w, key)
                    row[k.label] = _clean(val)
                samples.append(row)
    return {key: m.compute() for key, m in metrics.items()}, samples, []


# =============================================================================================
# pos-ablation
# =============================================================================================
POS_METRICS = {"avg-kl", "specificity"}


def _pos_words(pipe, spec, item) -> list[str]:
    from ..interventions import prompt_words

    if spec.options.get("words", "all") == "nouns":
        return item.words
    return prompt_words(pipe.tokenizer, item.prompt)


def _pos_compute(pipe, spec, case, variants, method, stats):
    from ..analysis import alignment_problem, head_sensitivity, try_pos_tags
    from ..interventions import token_removal_sweep

    item, seed, s = case.item, case.seed, spec.sampler
    words = _pos_words(pipe, spec, item)
    stats = sorted(set(stats) | {"norm"})
    sweep = token_removal_sweep(pipe, item.prompt, seed=seed, words=words, steps=s.steps, guidance=s.guidance,
                                height=s.height, width=s.width, stats=stats, batch_size=len(words) + 1)
    base = sweep.traces[""]
    size = _size(item, spec)
    tags, untagged = try_pos_tags(item.prompt, words, _nlp())  # untaggable words join no POS row
    arrays, excluded = {}, {}
    files = {"image.png": sweep.images[""]}
    for i, w in enumerate(words):
        problem = alignment_problem(base, sweep.traces[w], w)
        if problem is None:
            arrays[f"kl/{w}"] = _flat(head_sensitivity(base, sweep.traces[w], w)).astype(np.float32)
        else:
            excluded[w] = problem
            arrays[f"kl/{w}"] = np.full(1, np.nan, np.float32)
        arrays[f"map/{w}"] = _heat(method, base, w, size)
        files[f"removed-{i}.png"] = sweep.images[w]
    files["arrays.npz"] = arrays
    files["case.json"] = {"prompt": item.prompt, "seed": seed, "item": item.id, "words": words, "tags": tags,
                          "untagged": untagged, "excluded": excluded, "layers": _layers_json(base.layers)}
    return files


_NLP = None


def _nlp():
    global _NLP
    if _NLP is None:
        from ..analysis import load_spacy

        _NLP = load_spacy()
    return _NLP


def _pos_score(spec, cases, dirs, variants, figures_dir):
    from ..analysis import pos_groups

    metrics = {(v.id, k.label): create_metric(k.name, **k.params) for v in variants for k in spec.metrics}
    group_of = {v.id: v.params.get("pos", v.id) for v in variants}
    samples, all_scores, layers, unassigned = [], {}, None, {}
    for case, d in zip(cases, dirs):
        meta = read_json(d / "case.json")
        layers = layers or _layers(meta["layers"])
        with np.load(d / "arrays.npz") as z:
            arrays = {k: z[k] for k in z.files}
        excluded = meta.get("excluded", {})
        for w in meta["words"]:
            key = item_key(case.item.id, case.seed, w)
            if w not in meta["tags"]:  # spaCy has no token for it: in no POS row, counted and shown
                unassigned[key] = meta.get("untagged", {}).get(w, "no POS tag")
                continue
            kl, heat, tag = arrays[f"kl/{w}"], arrays[f"map/{w}"], meta["tags"][w]
            groups = pos_groups(tag)
            why = excluded.get(w)
            if why is None:
                for g in groups:
                    all_scores.setdefault(g, []).append(kl)
            for v in variants:
                if group_of[v.id] not in groups:
                    continue
                row = {"item": key, "case": case.item.id, "seed": case.seed, "prompt": case.item.prompt,
                       "method": v.id, "word": w, "pos": tag}
                for k in spec.metrics:
                    m = metrics[(v.id, k.label)]
                    m.set_items(key)
                    if k.name == "avg-kl":
                        val = m.update(kl) if why is None else m.exclude(key, why)
                    else:
                        val = m.update(heat)
                    row[k.label] = _clean(val)
                samples.append(row)
    figures = _pos_figures(spec, cases, dirs, all_scores, layers, figures_dir)
    return {key: m.compute() for key, m in metrics.items()}, samples, figures, unassigned


def _pos_figures(spec, cases, dirs, all_scores, layers, figures_dir) -> list[Path]:
    if not all_scores or layers is None:
        return []
    from ..analysis.figures import head_spike_heatmaps, removal_grid, top_heads_per_pos

    order = [v.params.get("pos", v.id) for v in spec.variants] + sorted(all_scores)
    groups = [g for g in dict.fromkeys(order) if g in all_scores]
    pos_scores = {g: _scores_from_flat(layers, np.mean(all_scores[g], axis=0), g) for g in groups}
    out = [head_spike_heatmaps(list(pos_scores.values()), figures_dir / "pos-head-spikes.png",
                               title="POS-averaged KL head-spike"),
           top_heads_per_pos(pos_scores, figures_dir / "pos-top-heads.png")]
    d = dirs[0]
    meta = read_json(d / "case.json")
    with np.load(d / "arrays.npz") as z:
        arrays = {k: z[k] for k in z.files}
    images = {"": Image.open(d / "image.png").convert("RGB")}
    spikes = {}
    for i, w in enumerate(meta["words"]):
        images[w] = Image.open(d / f"removed-{i}.png").convert("RGB")
        if np.all(np.isfinite(arrays[f"kl/{w}"])):
            spikes[w] = _scores_from_flat(layers, arrays[f"kl/{w}"], w)
    out.append(removal_grid(images, figures_dir / "removal-grid.png", spikes=spikes))
    return out


# =============================================================================================
# steering-adherence
# =============================================================================================
CLIP_METRICS = {"clip-full-prompt", "clip-min-object", "clip-score"}
STEER_METRICS = {"checker-full-prompt", "checker-mos"} | CLIP_METRICS


def _prompt_items(spec: SuiteSpec, limit: int | None) -> list[EvalItem]:
    from .loader import SUITES_DIR

    raw = Path(spec.options["prompts"])
    path = raw if raw.is_absolute() or raw.is_file() else SUITES_DIR / raw
    if not path.is_file():
        raise FileNotFoundError(f"suite {spec.name!r}: prompts file {str(raw)!r} not found (looked for {path})")
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    n = min(spec.data.n, limit) if limit else spec.data.n
    return [EvalItem(id=f"{path.stem}-{i}", prompt=p, seed=spec.data.seed + i, masks={})
            for i, p in enumerate(lines[:n])]


def _steer_words(item: EvalItem) -> list[str]:
    """The words to steer: the item's grounded nouns, or the prompt's nouns by spaCy."""
    if item.masks:
        return item.words
    return list(dict.fromkeys(t.text for t in _nlp()(item.prompt) if t.pos_ in ("NOUN", "PROPN")))


def object_prompts(prompt: str) -> list[str]:
    """Object sub-prompts for min-object similarity: the checker's phrases ("a red circle") on ShapesWorld
    prompts, else the prompt split at " and " / commas."""
    from ..shapesworld import parse_prompt

    specs = parse_prompt(prompt)
    if specs:
        return [f"a {s.phrase}" for s in specs]
    import re

    parts = [p.strip() for p in re.split(r",| and ", prompt) if p.strip()]
    return parts or [prompt]


def model_hrv(model: str, variant: str = "hrv") -> str:
    """The head relevance vectors of ``model`` (``hrv: model`` in a suite): a built-in model's or a local
    folder's ``hrv.json``, the shipped vectors for SD v1.4; other models need an explicit file."""
    from ..builtin_models import BUILTIN_MODELS

    folder = Path(BUILTIN_MODELS.get(model, model))
    if (folder / "hrv.json").is_file():
        return str(folder / "hrv.json")
    if "stable-diffusion-v1-4" in model:
        return "sd14"
    raise ValueError(f"variant {variant!r}: no head relevance vectors are known for model {model!r}; set "
                     "params.hrv to an HRV JSON built with evalkit.analysis.build_hrv (or 'sd14')")


def _hrv_concept(hrv, word: str) -> str | None:
    if word in hrv.vectors:
        return word
    for concept, words in hrv.words.items():
        if word in words:
            return concept
    return None


def _steer_compute(pipe, spec, case, variants, method, stats):
    """Generate the case's baseline and one image per steering variant. A variant that cannot steer
    the case (a word without S(h, i) or without an HRV concept, no noun, no HRV configured) gets no
    image and the reason in ``case.json`` (the item is excluded from that row, never scored as steered)."""
    from ..analysis import alignment_problem, head_sensitivity
    from ..interventions import ConceptRescaling, ValueSteering, token_removal_sweep

    item, seed, s = case.item, case.seed, spec.sampler
    words = _steer_words(item)
    need_s = any(v.params.get("steering", "none") == "value" for v in variants)
    files: dict[str, Any] = {}
    scores, unsteerable = {}, {}
    if need_s and words:
        sweep = token_removal_sweep(pipe, item.prompt, seed=seed, words=words, steps=s.steps, guidance=s.guidance,
                                    height=s.height, width=s.width, stats=["norm"], batch_size=len(words) + 1)
        base_img = sweep.images[""]
        for w in words:
            problem = alignment_problem(sweep.traces[""], sweep.traces[w], w)
            if problem is None:
                scores[w] = head_sensitivity(sweep.traces[""], sweep.traces[w], w)
            else:  # the removal changes how the other words tokenize: S(h, i) undefined
                unsteerable[w] = problem
    else:
        base_img = _gen(pipe, spec, item.prompt, seed).images[0]
    files["none.png"] = base_img
    info: dict[str, Any] = {}
    for v in variants:
        kind = v.params.get("steering", "none")
        if kind not in ("none", "value", "hrv"):
            raise ValueError(f"variant {v.id!r}: steering must be 'none', 'value' or 'hrv', got {kind!r}")
        if kind == "none":
            files[f"{v.id}.png"] = base_img
            info[v.id] = {"steering": "none"}
            continue
        if not words:
            info[v.id] = {"steering": kind, "excluded": "no noun in the prompt to steer"}
            continue
        if kind == "value":
            if unsteerable:
                w, why = next(iter(unsteerable.items()))
                info[v.id] = {"steering": "value", "excluded": f"word {w!r} not steerable: {why}"}
                continue
            steps = v.params.get("steps") or max(1, math.ceil(s.steps / 2))
            ivs = ValueSteering.from_sensitivity(scores, alpha=float(v.params.get("alpha", 2.0)),
                                                 k=int(v.params.get("k", 5)), steps=int(steps))
        else:
            path = v.params.get("hrv")
            if not path:
                info[v.id] = {"steering": "hrv", "excluded": "no HRV configured (set params.hrv to a file, "
                                                              "'sd14' or 'model')"}
                continue
            if path == "model":
                path = model_hrv(spec.model, v.id)
            from ..methods import HeadRelevance

            hrv = HeadRelevance.load(path)
            concepts = {w: _hrv_concept(hrv, w) for w in words}
            missing = [w for w, c in concepts.items() if c is None]
            if missing:
                info[v.id] = {"steering": "hrv", "excluded": f"word {missing[0]!r} not steerable: no concept of "
                                                             f"the HRV file {str(path)!r} lists it"}
                continue
            ivs = [ConceptRescaling(w, hrv, desired=c) for w, c in concepts.items()]
        if not ivs:
            info[v.id] = {"steering": kind, "excluded": "the steering rule chose no intervention"}
            continue
        files[f"{v.id}.png"] = _gen(pipe, spec, item.prompt, seed, interventions=ivs).images[0]
        info[v.id] = {"steering": kind, "interventions": [iv.describe() for iv in ivs]}
    files["case.json"] = {"prompt": item.prompt, "seed": seed, "item": item.id, "words": words, "variants": info}
    return files


def _steer_score(spec, cases, dirs, variants, figures_dir):
    results, samples = {}, []
    metas = [read_json(d / "case.json") for d in dirs]
    for k in spec.metrics:
        reason = None
        if k.name in CLIP_METRICS and "pretrained" not in k.params and "scorer" not in k.params:
            reason = ("CLIP weights are not configured: set the metric's params.pretrained to a local open_clip "
                      "checkpoint (and params.model_name)")
        for v in variants:
            if reason is not None:
                break
            m = create_metric(k.name, **k.params)
            images, prompts, keys = [], [], []
            for case, d, meta in zip(cases, dirs, metas):
                key = item_key(case.item.id, case.seed)
                why = meta["variants"].get(v.id, {}).get("excluded")
                if why is not None:  # never scored as steered: excluded with its reason
                    m.exclude(key, why)
                    samples.append({"item": key, "method": v.id, "prompt": meta["prompt"], k.label: None})
                    continue
                images.append(Image.open(d / f"{v.id}.png").convert("RGB"))
                prompts.append(meta["prompt"])
                keys.append(key)
            try:
                m.set_items(keys)
                if not images:
                    vals = []
                elif k.name in CLIP_METRICS:
                    vals = (m.update(images, [object_prompts(p) for p in prompts]) if k.name == "clip-min-object"
                            else m.update(images, prompts))
                else:
                    vals = []
                    for key, img, p in zip(keys, images, prompts):
                        m.set_items(key)
                        vals.append(m.update(img, p))
                results[(v.id, k.label)] = m.compute()
            except MetricUnavailableError as err:
                reason = str(err)
                break
            for key, p, val in zip(keys, prompts, vals):
                samples.append({"item": key, "method": v.id, "prompt": p, k.label: _clean(val)})
        if reason is not None:
            warnings.warn(f"{spec.name}: metric {k.label!r} skipped: {reason}", stacklevel=2)
    order = {v.id: i for i, v in enumerate(variants)}
    results = dict(sorted(results.items(), key=lambda kv: order[kv[0][0]]))  # row-major, like the others
    return results, samples, []


# =============================================================================================
# Dispatch
# =============================================================================================
PROTOCOLS = {
    "seed-control": (_seed_compute, _seed_score, SEED_METRICS, False),
    "aggregation-ablation": (_agg_compute, _agg_score, {"stability"}, True),
    "head-removal": (_head_compute, _head_score, HEAD_METRICS, True),
    "pos-ablation": (_pos_compute, _pos_score, POS_METRICS, False),
    "steering-adherence": (_steer_compute, _steer_score, STEER_METRICS, False),
}


def run_protocol(spec: SuiteSpec, *, cache_dir: str | Path = ".cache/evalkit", limit: int | None = None,
                 progress: bool = True, pipe=None):
    """Run a protocol suite; cases already in the cache are read back, not recomputed. Returns a
    :class:`~evalkit.suites.runner.SuiteResult` whose ``spec`` lists the rows as methods (one MLflow child
    run per row) and whose ``figures`` are the protocol's figures."""

    from .runner import Case, SuiteResult, code_version, model_fingerprint, run_cases

    if spec.protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {spec.protocol!r}; known: attribution, {', '.join(PROTOCOLS)}")
    compute, score, allowed, heat_ok = PROTOCOLS[spec.protocol]
    _check_metrics(spec, allowed, heat_ok)
    if spec.protocol == "aggregation-ablation":
        if spec.variants:
            raise ValueError("aggregation-ablation compares its `methods:`; it takes no `variants:`")
        variants: list[VariantSpec] = []
    elif not spec.variants:
        raise ValueError(f"suite {spec.name!r}: protocol {spec.protocol!r} needs `variants:` (its rows)")
    else:
        variants = list(spec.variants)
    methods = {m.label: create_method(m.name, **m.params) for m in spec.methods}
    method = next(iter(methods.values()))
    stats = sorted(set().union(*(m.needs for m in methods.values())))
    if spec.protocol == "steering-adherence" and "prompts" in spec.options:
        items = _prompt_items(spec, limit)
    else:
        items = load_items(spec.data, limit)
    cases = [Case(it, s) for it in items for s in (spec.seeds if spec.seeds is not None else [it.seed])]
    base = {
        "protocol": spec.protocol,
        "model": model_fingerprint(spec.model),
        "dtype": spec.dtype,
        "sampler": spec.sampler.model_dump(),
        "stats": stats,
        "methods": {m.label: {"name": m.name, "params": methods[m.label].params()} for m in spec.methods},
        "variants": [v.model_dump() for v in variants],
        "options": spec.options,
        "code": code_version(),
        "protocol_code": protocol_code_version(),
    }
    target = methods if spec.protocol == "aggregation-ablation" else variants
    n_computed, dirs, n_corrupt = run_cases(spec, cases, base, cache_dir, pipe, progress,
                                            lambda p, case: compute(p, spec, case, target, method, stats))
    figures_dir = Path(cache_dir) / "figures" / spec.name
    results, samples, figures, *rest = score(spec, cases, dirs, variants, figures_dir)
    unassigned = rest[0] if rest else {}
    claims = judge_spec(spec, results)
    result_spec = spec
    if variants:
        name = spec.methods[0].name
        result_spec = spec.model_copy(update={"methods": [MethodSpec(name=name, id=v.id, params=v.params)
                                                          for v in variants]})
    return SuiteResult(result_spec, results, claims, cases, dirs, n_computed, samples, figures=list(figures),
                       unassigned=unassigned, n_corrupt=n_corrupt)
