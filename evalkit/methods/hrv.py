"""HRV-selective aggregation (paper 002 Eq. 4) and head relevance vector files (paper 001)."""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from ..trace import Trace
from .base import AttributionMethod, aggregate
from .registry import register_method

#: The published SD v1.4 HRVs shipped with evalkit (SNU-DRL/HRV, Apache-2.0; see NOTICE-hrv_sd14.md).
SD14_HRV = "sd14"

#: Published HRVs shipped with evalkit (SNU-DRL/HRV, Apache-2.0; see the NOTICE files in evalkit/data): name ->
#: file in evalkit/data. Each names the heads of one UNet geometry: sd14 SD 1.x's 128, sdxl SDXL base's 1300.
SHIPPED_HRVS: dict[str, str] = {SD14_HRV: "hrv_sd14.json", "sdxl": "hrv_sdxl.json"}


@dataclass(frozen=True)
class HeadRelevance:
    """Head relevance vectors: one non-negative score per (layer, head) for each concept.

    File format (JSON): ``{"model": str, "heads": [name, ...], "concepts": [{"concept": str,
    "words": [str, ...], "hrv": [float, ...]}, ...]}`` with head names like "down, layer: 0, head: 3".
    """

    model: str
    heads: tuple[str, ...]
    vectors: dict[str, tuple[float, ...]]
    words: dict[str, tuple[str, ...]]

    @classmethod
    def load(cls, source: str | Path) -> HeadRelevance:
        """Read an HRV JSON file; a shipped name (``"sd14"``, ``"sdxl"``, see :data:`SHIPPED_HRVS`) loads the
        published vectors, and a built-in model name (e.g. ``"shapesworld"``) the ``hrv.json`` shipped in that
        model's folder."""
        from ..builtin_models import BUILTIN_MODELS

        if str(source) in BUILTIN_MODELS and (Path(BUILTIN_MODELS[str(source)]) / "hrv.json").is_file():
            source = Path(BUILTIN_MODELS[str(source)]) / "hrv.json"
        if str(source) in SHIPPED_HRVS:
            text = resources.files("evalkit.data").joinpath(SHIPPED_HRVS[str(source)]).read_text()
            origin = f"the shipped {source} HRV file"
        else:
            path = Path(source)
            if not path.is_file():
                raise FileNotFoundError(f"HRV file {str(path)!r} does not exist: pass a JSON file written by "
                                        f"evalkit (or one of the shipped vectors: {', '.join(SHIPPED_HRVS)})")
            text = path.read_text()
            origin = str(path)
        try:
            raw = json.loads(text)
            heads = tuple(raw["heads"])
            vectors = {c["concept"]: tuple(float(v) for v in c["hrv"]) for c in raw["concepts"]}
            words = {c["concept"]: tuple(c.get("words", ())) for c in raw["concepts"]}
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{origin} is not an HRV file (needs 'heads' and 'concepts' with 'hrv'): {err}") from err
        for concept, vec in vectors.items():
            if len(vec) != len(heads):
                raise ValueError(f"{origin}: concept {concept!r} has {len(vec)} scores for {len(heads)} heads")
        return cls(model=str(raw.get("model", "")), heads=heads, vectors=vectors, words=words)

    def save(self, path: str | Path) -> None:
        """Write the JSON format that :meth:`load` reads."""
        concepts = [
            {"concept": c, "words": list(self.words.get(c, ())), "hrv": list(v)} for c, v in self.vectors.items()
        ]
        payload = {"model": self.model, "heads": list(self.heads), "concepts": concepts}
        Path(path).write_text(json.dumps(payload, indent=1))

    def vector(self, concept: str) -> torch.Tensor:
        """The concept's HRV as a float tensor; an unknown concept suggests the closest name."""
        if concept not in self.vectors:
            close = difflib.get_close_matches(concept, list(self.vectors), n=1, cutoff=0.4)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise KeyError(f"concept {concept!r} is not in the HRV file{hint} (concepts: {', '.join(self.vectors)})")
        return torch.tensor(self.vectors[concept], dtype=torch.float64)

    def select(self, concept: str, k: int, order: str = "most") -> list[str]:
        """Names of the ``k`` most (or least) relevant heads; ties broken by head order."""
        if order not in ("most", "least"):
            raise ValueError(f"order must be 'most' or 'least', got {order!r}")
        if not 1 <= k <= len(self.heads):
            raise ValueError(f"k={k} heads requested, but the HRV covers {len(self.heads)} heads")
        vec = self.vector(concept)
        key = -vec if order == "most" else vec
        idx = sorted(range(len(self.heads)), key=lambda j: (float(key[j]), j))[:k]
        return [self.heads[j] for j in idx]


def _shipped_heads(name: str) -> frozenset[str]:
    """The head names of a shipped HRV file (read once per process: SDXL's file is 0.9 MB)."""
    if name not in _SHIPPED_HEADS:
        _SHIPPED_HEADS[name] = frozenset(HeadRelevance.load(name).heads)
    return _SHIPPED_HEADS[name]


_SHIPPED_HEADS: dict[str, frozenset[str]] = {}


def hrv_for_model(model: str, heads: Sequence[str] | None) -> str | None:
    """The head relevance vectors that fit ``model`` (``hrv: model``) as a source :meth:`HeadRelevance.load`
    reads: the model's own ``hrv.json`` (a built-in's, named by the model's name, or a local folder's path),
    else the shipped vectors whose head list is exactly the model's UNet heads (sd14 for SD 1.x geometry, sdxl
    for SDXL's); None when none fits. ``heads`` None (the model's config is not available offline): its own
    file, else the shipped vectors of the family its hub id names (checked when it runs)."""
    from ..builtin_models import BUILTIN_MODELS

    folder = Path(BUILTIN_MODELS.get(model, model)).expanduser()
    own = []
    if (folder / "hrv.json").is_file():
        own = [model if model in BUILTIN_MODELS else str(folder / "hrv.json")]
    if heads is None:
        guess = [SD14_HRV] if "stable-diffusion-v1" in model else ["sdxl"] if "-xl-" in model else []
        return (own + guess or [None])[0]
    model_heads = frozenset(heads)
    for candidate in own:
        if frozenset(HeadRelevance.load(candidate).heads) == model_heads:
            return candidate
    return next((name for name in SHIPPED_HRVS if _shipped_heads(name) == model_heads), None)


def heads_by_layer(trace: Trace, names: Sequence[str], hrv: HeadRelevance) -> dict[int, list[int]]:
    """Map HRV head names to ``{layer index: [head indices]}`` of the traced model.

    The HRV must name exactly the model's heads; otherwise the file belongs to another model.
    """
    model_heads = trace.head_names()
    if set(model_heads) != set(hrv.heads):
        only_hrv = sorted(set(hrv.heads) - set(model_heads))[:3]
        only_model = sorted(set(model_heads) - set(hrv.heads))[:3]
        raise ValueError(
            f"the HRV file ({hrv.model or 'unknown model'}, {len(hrv.heads)} heads) does not match the traced "
            f"model ({len(model_heads)} attn2 heads): e.g. only in the file {only_hrv}, only in the model "
            f"{only_model}; build HRVs for this model (evalkit HRV construction) or pass the matching file"
        )
    lookup: dict[str, tuple[int, int]] = {}
    for li, layer in enumerate(trace.layers):
        for h, name in enumerate(layer.head_names()):
            lookup[name] = (li, h)
    out: dict[int, list[int]] = {}
    for name in names:
        li, h = lookup[name]
        out.setdefault(li, []).append(h)
    return {li: sorted(hs) for li, hs in out.items()}


@register_method("hrv-selective")
class HRVSelective(AttributionMethod):
    """HRV-selective (paper 002 Eq. 4): DAAM's aggregation (attention summed over steps, each map
    resized bicubically to the latent grid and clamped at 0, mean over the selected maps)
    restricted to the ``k`` heads (default 30; a float below 1 is a fraction of all heads) with the
    highest (``order="most"``) or lowest
    (``order="least"``) relevance for ``concept`` in a head relevance vector, over all attn2
    layers including the mid block and every resolution. To image size: bicubic. Binarization:
    min-max normalize, then > tau."""

    needs = frozenset({"attn"})
    summary = "HRV-selective: DAAM aggregation over the top-k heads of a concept's head relevance vector (paper 002)"
    upsample = "bicubic"

    def __init__(self, hrv: str | Path | HeadRelevance = SD14_HRV, concept: str = "Animals", k: int | float = 30,
                 order: str = "most") -> None:
        self.hrv = hrv if isinstance(hrv, HeadRelevance) else HeadRelevance.load(hrv)
        self.hrv_source = "object" if isinstance(hrv, HeadRelevance) else str(hrv)
        self.concept = concept
        n = len(self.hrv.heads)
        # k < 1 is a fraction of all heads (paper 002 selects 20-40 of SD's 128, i.e. 16-31 %)
        self.k = max(1, round(k * n)) if isinstance(k, float) and 0 < k < 1 else int(k)
        self.order = order
        self.heads = self.hrv.select(concept, self.k, order)

    def params(self) -> dict:
        return {"hrv": self.hrv_source, "concept": self.concept, "k": self.k, "order": self.order}

    def token_maps(self, trace: Trace, positions: Sequence[int]) -> torch.Tensor:
        selection = heads_by_layer(trace, self.heads, self.hrv)
        return aggregate(trace, "attn", positions, heads=selection, mode="bicubic", clamp=True, time="sum")
