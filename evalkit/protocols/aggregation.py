"""``aggregation-ablation`` (paper 000 Table 7): rows are the suite's ``methods:`` (``norm-heads-only``,
``norm-timesteps-only``, ``norm``). Per (case, word): ``specificity`` (relevance mass in the word's mask),
``noise`` (total variation) and any other single-map metric; ``stability``: per (item, word, method),
agreement of the word's maps over the suite's seeds (needs >= 2 seeds)."""

from __future__ import annotations

import numpy as np

from ..items import item_key
from ..metrics import create_metric, score_map
from .base import Protocol, Scores, register_protocol
from .common import case_masks, clean, generate_case, map_size, read_json, word_heat


def _agg_compute(pipe, spec, case, methods, method, stats):
    item = case.item
    gen = generate_case(pipe, spec, item.prompt, case.seed, stats)
    trace = gen.traces[0]
    size = map_size(item, spec)
    maps = {f"{label}/{w}": word_heat(m, trace, w, size) for label, m in methods.items() for w in item.words}
    return {"image.png": gen.images[0], "maps.npz": maps,
            "masks.npz": {w: m.astype(np.uint8) for w, m in case_masks(spec, item, gen.images[0]).items()},
            "case.json": {"prompt": item.prompt, "seed": case.seed, "item": item.id, "words": item.words,
                          "n_unet_calls": trace.n_steps}}


def _agg_score(spec, cases, dirs, variants, figures_dir):

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
                    row[k.label] = clean(score_map(metrics[(r, k.label)], heat, masks[w], w, key))
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


@register_protocol("aggregation-ablation")
class AggregationAblation(Protocol):
    """Which averaging (over heads, over timesteps) makes the norm map stable (paper 000 Table 7)."""

    summary = "aggregation ablation: norm maps averaged over heads only / timesteps only / both (Table 7)"
    metrics = frozenset({"stability"})
    single_map_metrics = True
    rows = "methods"

    def cache_key(self, spec):
        return {}

    def compute(self, pipe, spec, case, methods, stats):
        return _agg_compute(pipe, spec, case, methods, next(iter(methods.values())), stats)

    def score(self, spec, cases, dirs, figures_dir):
        results, samples, figures = _agg_score(spec, cases, dirs, [], figures_dir)
        return Scores(results, samples, figures)
