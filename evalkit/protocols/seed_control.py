"""``seed-control`` (paper 000 Table 6): does removing a word change the heads' token distributions
because of the word, or because the noise changed? Variant params: ``seed_offset``, the removal run's
seed minus the baseline's (0 = fixed seed). Per (case, word): ``avg-kl`` (mean S(h, i), Eq. 10),
``shift`` (mean per-head JS divergence, bits), ``specificity`` (relevance mass, inside the word's mask,
of the per-pixel image change); ``variance``: per (item, word), the sample variance over the suite's
seeds of the word's avg-kl."""

from __future__ import annotations

import math

import numpy as np

from ..items import item_key
from ..metrics import create_metric
from .base import Protocol, Scores, register_protocol
from .common import (
    case_masks,
    clean,
    flat_scores,
    generate_case,
    head_shift,
    image_array,
    layers_to_json,
    map_size,
    read_json,
    record,
)

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
    gen = generate_case(pipe, spec, prompts, seeds, set(stats) | {"norm"})  # S(h, i) reads the norm statistic
    from ..analysis import alignment_problem, head_sensitivity

    base = gen.traces[0]
    size = map_size(item, spec)
    base_img = image_array(gen.images[0], size)
    arrays, files = {}, {"image.png": gen.images[0]}
    excluded = {}
    for (vid, w), i in index.items():
        tr = gen.traces[i]
        problem = alignment_problem(base, tr, w)
        if problem is None:
            arrays[f"kl/{vid}/{w}"] = flat_scores(head_sensitivity(base, tr, w)).astype(np.float32)
            arrays[f"js/{vid}/{w}"] = head_shift(base, tr, w).astype(np.float32)
        else:  # S(h, i) and the shift are undefined for this removal: excluded with the reason
            excluded[f"{vid}/{w}"] = problem
            arrays[f"kl/{vid}/{w}"] = np.full(1, np.nan, np.float32)
            arrays[f"js/{vid}/{w}"] = np.full(1, np.nan, np.float32)
        arrays[f"diff/{vid}/{w}"] = np.abs(base_img - image_array(gen.images[i], size)).mean(-1).astype(np.float32)
        files[f"removed-{i}.png"] = gen.images[i]
    files["arrays.npz"] = arrays
    files["masks.npz"] = {w: m.astype(np.uint8) for w, m in case_masks(spec, item, gen.images[0]).items()}
    files["case.json"] = {"prompt": item.prompt, "seed": seed, "item": item.id, "words": words,
                          "prompts": prompts, "seeds": seeds, "index": {f"{k[0]}/{k[1]}": i for k, i in index.items()},
                          "layers": layers_to_json(base.layers), "excluded": excluded}
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
                        val = record(m, float(np.mean(js)))
                    elif k.name == "specificity":
                        val = m.update(diff, masks[w])
                    else:
                        continue
                    row[k.label] = clean(val)
                samples.append(row)
    for (vid, item_id, w), values in per_item.items():
        for k in spec.metrics:
            if k.name == "variance":
                m = metrics[(vid, k.label)]
                m.set_items(item_key(item_id, word=w))
                m.update(values)
    return {key: m.compute() for key, m in metrics.items()}, samples, []


@register_protocol("seed-control")
class SeedControl(Protocol):
    """Token removal at a fixed vs a varying seed (paper 000 Table 6)."""

    summary = "seed control: token-removal effects at a fixed vs a varying seed (paper 000 Table 6)"
    metrics = frozenset(SEED_METRICS)
    extra_stats = frozenset({"norm"})

    def compute(self, pipe, spec, case, methods, stats):
        return _seed_compute(pipe, spec, case, list(spec.variants), next(iter(methods.values())), stats)

    def score(self, spec, cases, dirs, figures_dir):
        results, samples, figures = _seed_score(spec, cases, dirs, list(spec.variants), figures_dir)
        return Scores(results, samples, figures)
