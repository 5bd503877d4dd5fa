"""Attribution fidelity (Task A, the ``attribution`` protocol): every method's word maps from one traced
generation per case, scored against the words' masks by single-map metrics (mIoU, relevance mass, ...).

Its cache is split so that methods come and go without generating: the case entry (image, masks,
metadata), one maps entry per method, and the case's trace (see ``store_traces``); the suite runner
stores them with :func:`compute_case` and :func:`method_files` and scores with :func:`score_maps`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..items import Case, item_key
from ..methods import Attribution
from ..metrics import create_metric, score_map
from ..trace import Trace, generate
from .base import Protocol, register_protocol
from .common import case_masks, read_json


@register_protocol("attribution")
class AttributionFidelity(Protocol):
    """Attribution maps against ground-truth masks (paper 000 Table 1; papers 002-003's mIoU)."""

    summary = "attribution fidelity: each method's word maps against the words' masks (Task A, mIoU)"
    single_map_metrics = True
    rows = "methods"
    split_cache = True
    ground_truths = frozenset({"exact", "coco", "grounded-sam"})

    def cache_key(self, spec: Any) -> dict:
        return {}


#: Why an item with a NaN/inf attribution map is excluded.
NAN_MAP = "attribution map is not finite (NaN or inf)"


def method_files(method, trace: Trace, words: list[str]) -> dict:
    """A method's maps entry for one traced case: its word maps and how they were made."""
    att: Attribution = method.attribute(trace, words)
    return {"maps.npz": {w: m.numpy().astype(np.float32) for w, m in att.maps.items()},
            "method.json": {"name": method.name, "params": method.params(), "upsample": method.upsample}}


def compute_case(pipe, spec: Any, case: Case, methods: dict, stats: set[str] | None = None
                  ) -> tuple[dict, dict[str, dict], Trace]:
    """Generate and trace one case, recording ``stats`` (default: what ``methods`` need); returns the case
    entry's files, per method label its maps entry's files, and the trace."""
    s = spec.sampler
    if stats is None:
        stats = set().union(*(m.needs for m in methods.values())) if methods else set()
    gen = generate(pipe, case.item.prompt, seeds=case.seed, steps=s.steps, guidance=s.guidance, height=s.height,
                   width=s.width, stats=sorted(stats), reading=s.reading)
    trace = gen.traces[0]
    per_method = {label: method_files(method, trace, case.item.words) for label, method in methods.items()}
    meta = {"prompt": case.item.prompt, "seed": case.seed, "item": case.item.id, "words": case.item.words,
            "tokens": list(trace.tokens.pieces), "image_hw": list(trace.image_hw), "n_unet_calls": trace.n_steps}
    masks = {w: m.astype(np.uint8) for w, m in case_masks(spec, case.item, gen.images[0]).items()}
    return {"image.png": gen.images[0], "masks.npz": masks, "case.json": meta}, per_method, trace


def load_case_attribution(case_dir: Path, maps_dir: Path, label: str) -> Attribution:
    """Rebuild a method's :class:`Attribution` of one cached case from its maps entry."""
    meta = read_json(case_dir / "case.json")
    info = read_json(maps_dir / "method.json")
    with np.load(maps_dir / "maps.npz") as z:
        maps = {w: torch.from_numpy(z[w]) for w in z.files}
    return Attribution(method=label, prompt=meta["prompt"], tokens=meta["tokens"], maps=maps,
                       image_hw=tuple(meta["image_hw"]), upsample=info["upsample"], params=info["params"])


def score_maps(spec: Any, cases: list[Case], dirs: list[Path], map_dirs: list[dict[str, Path]]):
    """Metric values per (method, metric) from the cached maps and masks."""
    metrics = {(m.label, k.label): create_metric(k.name, **k.params) for m in spec.methods for k in spec.metrics}
    samples: list[dict] = []
    for case, d, md in zip(cases, dirs, map_dirs):
        with np.load(d / "masks.npz") as z:
            masks = {w: z[w].astype(bool) for w in z.files}
        for m in spec.methods:
            att = load_case_attribution(d, md[m.label], m.label)
            for word, mask in masks.items():
                heat = att.to_image(mask.shape)[word].numpy()
                key = item_key(case.item.id, case.seed, word)
                row = {"item": key, "case": case.item.id, "seed": case.seed, "prompt": case.item.prompt,
                       "method": m.label, "word": word}
                finite = bool(np.isfinite(heat).all())
                for k in spec.metrics:
                    metric = metrics[(m.label, k.label)]
                    v = score_map(metric, heat, mask, word, key) if finite else metric.exclude(key, NAN_MAP)
                    row[k.label] = None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
                samples.append(row)
    results = {key: metric.compute() for key, metric in metrics.items()}
    return results, samples
