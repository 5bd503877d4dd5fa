"""A user-defined suite protocol in one small file: how attribution quality depends on the guidance scale.
Each variant sets ``params.guidance``; every case is generated once per variant and the first method's word
maps are scored against the words' masks by the suite's single-map metrics (e.g. ``miou-inf``), so rows are
paired over the same (item, seed, word) keys. Load it with ``evalkit --plugins guidance_sweep run ...`` or an
entry point in the ``evalkit.protocols`` group; a suite names it with ``protocol: guidance-sweep``."""

from __future__ import annotations

import numpy as np

from evalkit.items import item_key
from evalkit.metrics import create_metric, score_map
from evalkit.protocols import Protocol, Scores, case_masks, register_protocol
from evalkit.protocols.common import clean, map_size, read_json, word_heat
from evalkit.trace import generate


@register_protocol("guidance-sweep")
class GuidanceSweep(Protocol):
    """Word maps of the same prompts and seeds at several classifier-free guidance scales."""

    summary = "guidance sweep (example plugin): attribution quality per classifier-free guidance scale"
    single_map_metrics = True

    def compute(self, pipe, spec, case, methods, stats):
        method = next(iter(methods.values()))
        s, item = spec.sampler, case.item
        files: dict = {}
        maps = {}
        for v in spec.variants:
            guidance = float(v.params.get("guidance", s.guidance))
            gen = generate(pipe, item.prompt, seeds=case.seed, steps=s.steps, guidance=guidance, height=s.height,
                           width=s.width, stats=stats)
            for w in item.words:
                maps[f"{v.id}/{w}"] = word_heat(method, gen.traces[0], w, map_size(item, spec))
            files[f"{v.id}.png"] = gen.images[0]
            if v is spec.variants[0]:
                masks = case_masks(spec, item, gen.images[0])
        files["maps.npz"] = maps
        files["masks.npz"] = {w: m.astype(np.uint8) for w, m in masks.items()}
        files["case.json"] = {"prompt": item.prompt, "seed": case.seed, "words": item.words}
        return files

    def score(self, spec, cases, dirs, figures_dir):
        metrics = {(v.id, k.label): create_metric(k.name, **k.params) for v in spec.variants for k in spec.metrics}
        samples = []
        for case, d in zip(cases, dirs):
            meta = read_json(d / "case.json")
            with np.load(d / "maps.npz") as z, np.load(d / "masks.npz") as zm:
                maps, masks = {k: z[k] for k in z.files}, {w: zm[w].astype(bool) for w in zm.files}
            for v in spec.variants:
                for w in meta["words"]:
                    key = item_key(case.item.id, case.seed, w)
                    row = {"item": key, "method": v.id, "word": w, "prompt": meta["prompt"]}
                    for k in spec.metrics:
                        row[k.label] = clean(score_map(metrics[(v.id, k.label)], maps[f"{v.id}/{w}"], masks[w], w,
                                                       key))
                    samples.append(row)
        return Scores({key: m.compute() for key, m in metrics.items()}, samples)
