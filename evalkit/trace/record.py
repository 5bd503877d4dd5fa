"""The record of one traced generation: :class:`Trace` (reduced cross-attention statistics, token alignment and
settings), with safe persistence (safetensors + json) so stored traces can be re-scored without the model."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .layers import LayerInfo
from .tokens import JointTokens, PromptTokens, tokenize_prompt


@dataclass
class Trace:
    """Reduced cross-attention statistics of one generation (one prompt, one seed).

    ``stats[name][i]`` belongs to ``layers[i]``: shape ``(heads, Q, K)`` for summed statistics and
    ``(steps, Q, K)`` for per-step ones, with ``Q = h * w`` row-major on the layer grid and ``K``
    the text-encoder context (start token at 0).
    """

    prompt: str
    tokens: PromptTokens | JointTokens
    layers: list[LayerInfo]
    stats: dict[str, list[torch.Tensor]]
    n_steps: int
    latent_hw: tuple[int, int]
    image_hw: tuple[int, int]
    seed: int | None = None
    settings: dict = field(default_factory=dict)

    def require(self, names: Iterable[str], who: str = "this method") -> None:
        """Raise a clear error if the trace lacks a statistic."""
        missing = [n for n in names if n not in self.stats]
        if missing:
            raise ValueError(
                f"{who} needs trace statistics {missing}, but the trace recorded {sorted(self.stats)}: "
                "trace again with the method listed, e.g. generate(..., methods=[...])"
            )

    def layer_maps(self, stat: str, layer: int, positions: Sequence[int]) -> torch.Tensor:
        """Maps of token ``positions`` in layer ``layer``: ``(heads_or_steps, len(positions), h, w)``."""
        x = self.stats[stat][layer]
        h, w = self.layers[layer].grid(self.latent_hw)
        sel = x[..., list(positions)]  # (N, Q, P)
        return sel.permute(0, 2, 1).reshape(x.shape[0], len(positions), h, w)

    def head_names(self) -> list[str]:
        """All (layer, head) names in HRV convention, in the trace's layer order."""
        return [n for layer in self.layers for n in layer.head_names()]

    # -- persistence (safe formats only: safetensors + json) --------------------------------
    def to_files(self) -> dict[str, object]:
        """The trace as files: ``trace.safetensors`` (bytes of every statistic) and ``trace.json``."""
        from safetensors.torch import save

        tensors = {
            f"{name}/{i}": t.contiguous() for name, per_layer in self.stats.items() for i, t in enumerate(per_layer)
        }
        meta = {
            "prompt": self.prompt,
            "ids": list(self.tokens.ids),
            "layers": [vars(lay) for lay in self.layers],
            "stats": sorted(self.stats),
            "n_steps": self.n_steps,
            "latent_hw": list(self.latent_hw),
            "image_hw": list(self.image_hw),
            "seed": self.seed,
            "settings": self.settings,
        }
        return {"trace.safetensors": save(tensors), "trace.json": meta}

    def save(self, directory: str | Path) -> None:
        """Write ``trace.safetensors`` and ``trace.json`` to ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        files = self.to_files()
        (d / "trace.safetensors").write_bytes(files["trace.safetensors"])
        (d / "trace.json").write_text(json.dumps(files["trace.json"], indent=1))

    @staticmethod
    def stored_stats(directory: str | Path) -> frozenset[str]:
        """The statistics a saved trace holds (read from ``trace.json`` alone)."""
        return frozenset(json.loads((Path(directory) / "trace.json").read_text())["stats"])

    @classmethod
    def load(cls, directory: str | Path, tokenizer) -> Trace:
        """Read a trace written by :meth:`save`; ``tokenizer`` re-derives the word alignment."""
        from safetensors.torch import load_file

        d = Path(directory)
        meta = json.loads((d / "trace.json").read_text())
        tensors = load_file(str(d / "trace.safetensors"))
        layers = [LayerInfo(**lay) for lay in meta["layers"]]
        stats = {name: [tensors[f"{name}/{i}"] for i in range(len(layers))] for name in meta["stats"]}
        with warnings.catch_warnings():  # a long prompt was truncated (and warned about) when it was traced
            warnings.simplefilter("ignore")
            tokens = tokenize_prompt(tokenizer, meta["prompt"], truncate=True)
        if list(tokens.ids) != list(meta["ids"]):
            raise ValueError(f"the trace in {d} was made with another tokenizer (token ids differ for "
                             f"{meta['prompt']!r}): load it with the tokenizer of the model that traced it")
        return cls(
            prompt=meta["prompt"],
            tokens=tokens,
            layers=layers,
            stats=stats,
            n_steps=meta["n_steps"],
            latent_hw=tuple(meta["latent_hw"]),
            image_hw=tuple(meta["image_hw"]),
            seed=meta["seed"],
            settings=meta["settings"],
        )
