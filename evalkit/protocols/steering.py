"""``steering-adherence`` (Task B, paper 000 Tables 2-3). Variant params: ``steering`` = ``none`` |
``value`` | ``hrv``; value: ``alpha`` (2.0), ``k`` (5), ``steps`` (the first N UNet calls, default half
the sampler's steps); hrv: ``hrv`` (an HRV JSON file, ``sd14``/``sdxl``, or ``model`` for the vectors
that fit the running model's heads). An item a variant cannot steer (a noun whose removal changes how the
other words tokenize has no S(h, i); a noun no HRV concept lists; no noun; no HRV configured) gets no steered
image: it is excluded from that row with its reason and never scored as steered. Adherence per image:
``checker-full-prompt``, ``checker-mos`` (ShapesWorld's analytic checker) and the CLIP metrics
``clip-full-prompt``, ``clip-min-object``, ``clip-score`` when their weights are configured (metric
``params.pretrained``), otherwise skipped with a message. Option ``prompts``: a text file of prompts
(one per line; relative paths resolve against the suites folder) instead of ShapesWorld items."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

from PIL import Image

from ..items import EvalItem, item_key, prompt_items
from ..metrics import MetricUnavailableError, create_metric
from .base import Protocol, Scores, register_protocol
from .common import clean, generate_case, prompt_nouns, read_json

CLIP_METRICS = {"clip-full-prompt", "clip-min-object", "clip-score"}
STEER_METRICS = {"checker-full-prompt", "checker-mos"} | CLIP_METRICS


def _prompt_items(spec: Any, limit: int | None, suites_dir: Path) -> list[EvalItem]:

    raw = Path(spec.options["prompts"])
    path = raw if raw.is_absolute() or raw.is_file() else suites_dir / raw
    if not path.is_file():
        raise FileNotFoundError(f"suite {spec.name!r}: prompts file {str(raw)!r} not found (looked for {path})")
    return prompt_items(path, min(spec.data.n, limit) if limit else spec.data.n, spec.data.seed)


def _steer_words(item: EvalItem) -> list[str]:
    """The words to steer: the item's grounded nouns, or the prompt's nouns by spaCy."""
    if item.masks:
        return item.words
    return prompt_nouns(item.prompt)


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


def model_hrv(model: str, variant: str = "hrv", kind: str = "variant") -> str:
    """The head relevance vectors of ``model`` (``hrv: model`` in a suite): those whose head list matches the
    model's UNet, found from its config without weights (its own ``hrv.json``, else the shipped sd14 or sdxl
    vectors, see :func:`evalkit.methods.hrv_for_model`); no match is an error naming the ``kind`` (variant,
    method) and its id."""
    from ..methods import SHIPPED_HRVS, hrv_for_model
    from ..trace import model_head_names

    heads = model_head_names(model)
    found = hrv_for_model(model, heads)
    if found is None:
        size = "" if heads is None else f" ({len(heads)} attn2 heads)"
        raise ValueError(f"{kind} {variant!r}: no head relevance vectors are known for model {model!r}{size}: "
                         f"neither an hrv.json of its own nor shipped vectors ({', '.join(SHIPPED_HRVS)}) name "
                         "its heads; set params.hrv to an HRV JSON built with evalkit.analysis.build_hrv")
    return found


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
        base_img = generate_case(pipe, spec, item.prompt, seed).images[0]
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
        files[f"{v.id}.png"] = generate_case(pipe, spec, item.prompt, seed, interventions=ivs).images[0]
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
                samples.append({"item": key, "method": v.id, "prompt": p, k.label: clean(val)})
        if reason is not None:
            warnings.warn(f"{spec.name}: metric {k.label!r} skipped: {reason}", stacklevel=2)
    order = {v.id: i for i, v in enumerate(variants)}
    results = dict(sorted(results.items(), key=lambda kv: order[kv[0][0]]))  # row-major, like the others
    return results, samples, []


@register_protocol("steering-adherence")
class SteeringAdherence(Protocol):
    """Prompt adherence with value steering or HRV strengthening vs none (Task B)."""

    summary = "steering adherence: value steering / HRV strengthening vs none, scored by adherence (Task B)"
    options = ("prompts",)
    ground_truths = frozenset()  # adherence is scored without masks
    metrics = frozenset(STEER_METRICS)

    def items(self, spec, limit, suites_dir):
        if "prompts" in spec.options:
            return _prompt_items(spec, limit, suites_dir)
        return super().items(spec, limit, suites_dir)

    def compute(self, pipe, spec, case, methods, stats):
        return _steer_compute(pipe, spec, case, list(spec.variants), next(iter(methods.values())), stats)

    def score(self, spec, cases, dirs, figures_dir):
        results, samples, figures = _steer_score(spec, cases, dirs, list(spec.variants), figures_dir)
        return Scores(results, samples, figures)
