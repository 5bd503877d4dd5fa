"""``head-removal`` (paper 000 Table 4): ablate a word's most sensitive heads (or random ones) and see
how its map loses grounding. Variant params: ``heads`` = ``none`` | ``top`` | ``random``, ``k`` (5),
``seed`` (random draw). The word's map is the method's map of the ablated run with the ablated heads'
statistics zeroed. Per (case, word): ``specificity``, ``shift`` (JS divergence vs ``none``),
``grounding-loss`` (relative drop of the relevance mass vs ``none``)."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from ..items import item_key
from ..metrics import create_metric, score_map
from .base import Protocol, Scores, register_protocol
from .common import (
    case_masks,
    clean,
    flat_scores,
    generate_case,
    layers_to_json,
    map_size,
    read_json,
    safe_name,
    word_heat,
)

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
    size = map_size(item, spec)
    names = base.head_names()
    arrays, chosen, files, excluded = {}, {}, {"image.png": sweep.images[""]}, {}
    for w in item.words:
        problem = alignment_problem(base, sweep.traces[w], w)
        scores = head_sensitivity(base, sweep.traces[w], w) if problem is None else None
        if scores is not None:
            arrays[f"kl/{w}"] = flat_scores(scores).astype(np.float32)
        arrays[f"map/_none/{w}"] = word_heat(method, base, w, size)
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
            gen = generate_case(pipe, spec, item.prompt, seed, stats, interventions=[HeadAblation(heads)])
            arrays[f"map/{v.id}/{w}"] = word_heat(method, _zero_heads(gen.traces[0], heads), w, size)
            chosen[f"{v.id}/{w}"] = list(heads)
            files[f"{v.id}-{safe_name(w)}.png"] = gen.images[0]
    files["arrays.npz"] = arrays
    files["masks.npz"] = {w: m.astype(np.uint8) for w, m in case_masks(spec, item, sweep.images[""]).items()}
    files["case.json"] = {"prompt": item.prompt, "seed": seed, "item": item.id, "words": item.words,
                          "ablated": chosen, "layers": layers_to_json(base.layers), "excluded": excluded}
    return files


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
                        row[k.label] = clean(metrics[(v.id, k.label)].exclude(key, why))
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

                        val = score_map(m, heat, mask, w, key)
                    row[k.label] = clean(val)
                samples.append(row)
    return {key: m.compute() for key, m in metrics.items()}, samples, []


@register_protocol("head-removal")
class HeadRemoval(Protocol):
    """Top-k vs random head ablation and the word map's grounding (paper 000 Table 4)."""

    summary = "head removal: ablate a word's top-k sensitive heads vs k random heads (paper 000 Table 4)"
    metrics = frozenset(HEAD_METRICS)
    single_map_metrics = True
    extra_stats = frozenset({"norm"})

    def compute(self, pipe, spec, case, methods, stats):
        return _head_compute(pipe, spec, case, list(spec.variants), next(iter(methods.values())), stats)

    def score(self, spec, cases, dirs, figures_dir):
        results, samples, figures = _head_score(spec, cases, dirs, list(spec.variants), figures_dir)
        return Scores(results, samples, figures)
