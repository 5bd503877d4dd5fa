"""``pos-ablation`` (paper 000 Table 5, Fig. 2): which parts of speech the heads react to. Variant id = a
POS group (NOUN, ADJ, VERB, ADP, DET, FUNC, ...) or params ``pos``. Every alphanumeric prompt word (option
``words: nouns`` for the item's nouns only) is removed once (fixed seed) and tagged by spaCy in context.
Per word of the group: ``avg-kl`` and ``specificity`` = concentration (1 - normalized entropy) of the
word's baseline map. Figures: POS head-spike heat maps, top heads per POS, the first case's removal grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..items import item_key
from ..metrics import create_metric
from .base import Protocol, Scores, register_protocol
from .common import (
    clean,
    flat_scores,
    layers_from_json,
    layers_to_json,
    map_size,
    read_json,
    scores_from_flat,
    spacy_nlp,
    word_heat,
)

POS_METRICS = {"avg-kl", "specificity"}


def _pos_words(pipe, spec, item) -> list[str]:
    from ..interventions import prompt_words
    from ..trace import pipeline_tokenizer

    if spec.options.get("words", "all") == "nouns":
        return item.words
    return prompt_words(pipeline_tokenizer(pipe), item.prompt)  # the text keys' words (T5's on Flux)


def _pos_compute(pipe, spec, case, variants, method, stats):
    from ..analysis import alignment_problem, head_sensitivity, try_pos_tags
    from ..interventions import token_removal_sweep

    item, seed, s = case.item, case.seed, spec.sampler
    words = _pos_words(pipe, spec, item)
    stats = sorted(set(stats) | {"norm"})
    sweep = token_removal_sweep(pipe, item.prompt, seed=seed, words=words, steps=s.steps, guidance=s.guidance,
                                height=s.height, width=s.width, stats=stats, batch_size=len(words) + 1)
    base = sweep.traces[""]
    size = map_size(item, spec)
    tags, untagged = try_pos_tags(item.prompt, words, spacy_nlp())  # untaggable words join no POS row
    arrays, excluded = {}, {}
    files = {"image.png": sweep.images[""]}
    for i, w in enumerate(words):
        problem = alignment_problem(base, sweep.traces[w], w)
        if problem is None:
            arrays[f"kl/{w}"] = flat_scores(head_sensitivity(base, sweep.traces[w], w)).astype(np.float32)
        else:
            excluded[w] = problem
            arrays[f"kl/{w}"] = np.full(1, np.nan, np.float32)
        arrays[f"map/{w}"] = word_heat(method, base, w, size)
        files[f"removed-{i}.png"] = sweep.images[w]
    files["arrays.npz"] = arrays
    files["case.json"] = {"prompt": item.prompt, "seed": seed, "item": item.id, "words": words, "tags": tags,
                          "untagged": untagged, "excluded": excluded, "layers": layers_to_json(base.layers)}
    return files


def _pos_score(spec, cases, dirs, variants, figures_dir):
    from ..analysis import pos_groups

    metrics = {(v.id, k.label): create_metric(k.name, **k.params) for v in variants for k in spec.metrics}
    group_of = {v.id: v.params.get("pos", v.id) for v in variants}
    samples, all_scores, layers, unassigned = [], {}, None, {}
    for case, d in zip(cases, dirs):
        meta = read_json(d / "case.json")
        layers = layers or layers_from_json(meta["layers"])
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
                    row[k.label] = clean(val)
                samples.append(row)
    figures = _pos_figures(spec, cases, dirs, all_scores, layers, figures_dir)
    return {key: m.compute() for key, m in metrics.items()}, samples, figures, unassigned


def _pos_figures(spec, cases, dirs, all_scores, layers, figures_dir) -> list[Path]:
    if not all_scores or layers is None:
        return []
    from ..analysis.figures import head_spike_heatmaps, removal_grid, top_heads_per_pos

    order = [v.params.get("pos", v.id) for v in spec.variants] + sorted(all_scores)
    groups = [g for g in dict.fromkeys(order) if g in all_scores]
    pos_scores = {g: scores_from_flat(layers, np.mean(all_scores[g], axis=0), g) for g in groups}
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
            spikes[w] = scores_from_flat(layers, arrays[f"kl/{w}"], w)
    out.append(removal_grid(images, figures_dir / "removal-grid.png", spikes=spikes))
    return out


@register_protocol("pos-ablation")
class PosAblation(Protocol):
    """Head sensitivity by part of speech (paper 000 Table 5, Fig. 2)."""

    summary = "POS ablation: head sensitivity of removed words grouped by part of speech (paper 000 Table 5)"
    options = ("words",)
    metrics = frozenset(POS_METRICS)
    ground_truths = frozenset()  # sensitivity and map concentration need no masks
    extra_stats = frozenset({"norm"})

    def compute(self, pipe, spec, case, methods, stats):
        return _pos_compute(pipe, spec, case, list(spec.variants), next(iter(methods.values())), stats)

    def score(self, spec, cases, dirs, figures_dir):
        results, samples, figures, unassigned = _pos_score(spec, cases, dirs, list(spec.variants), figures_dir)
        return Scores(results, samples, figures, unassigned)
