"""A LAION-style aesthetic score: a linear (v1) or MLP ("improved") head on L2-normalized CLIP image
embeddings (paper 000 Table 3), with the head's weights loaded from a local file."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .adherence import ClipAdherence
from .base import Metric, MetricUnavailableError
from .registry import register_metric

AESTHETIC_MODEL = "ViT-L-14"
AESTHETIC_PRETRAINED = "openai"
NO_AESTHETIC_WEIGHTS = (
    "no aesthetic head weights configured: pass weights_path=... (a LAION-style linear or MLP head "
    "state dict, .safetensors or .pt, trained on the CLIP model's image embeddings)"
)


class AestheticHead(torch.nn.Module):
    """LAION-style aesthetic head on L2-normalized CLIP image embeddings: one linear layer (embed_dim -> 1,
    the v1 "linear" predictor) or a chain of linear layers (the "improved aesthetic predictor" MLP
    768 -> 1024 -> 128 -> 64 -> 16 -> 1). The chain is applied without activations, exactly as LAION's
    MLP, whose Sequential holds only Linear and Dropout layers (dropout is inactive at evaluation)."""

    def __init__(self, dims: Sequence[int]) -> None:
        super().__init__()
        if len(dims) < 2 or dims[-1] != 1:
            raise ValueError(f"an aesthetic head maps embed_dim -> ... -> 1, got dims {list(dims)}")
        self.dims = list(dims)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    @property
    def embed_dim(self) -> int:
        return self.dims[0]

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        x = embeddings
        for layer in self.layers:
            x = layer(x)
        return x[..., 0]


def _natural_key(key: str) -> list:
    return [int(t) if t.isdigit() else t for t in key.replace(".", " ").split()]


def load_aesthetic_head(path: str | Path) -> AestheticHead:
    """An :class:`AestheticHead` from a state dict file (``.safetensors``, or ``.pt``/``.pth`` read with
    ``weights_only=True``). Layers are the 2-D ``*weight`` tensors in natural key order (``weight``;
    ``layers.0.weight``, ``layers.2.weight``, ...) each with its ``*bias``; a ``{"state_dict": ...}``
    wrapper is unwrapped. Missing biases, a broken chain of shapes, or an output other than 1 is a
    clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"aesthetic head weights {str(path)!r} do not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    weight_keys = sorted((k for k, v in state.items() if k.endswith("weight") and v.ndim == 2), key=_natural_key)
    if not weight_keys:
        raise ValueError(f"{path}: no 2-D '*weight' tensors found (keys: {sorted(state)})")
    dims = [int(state[weight_keys[0]].shape[1])] + [int(state[k].shape[0]) for k in weight_keys]
    head = AestheticHead(dims)
    for layer, key in zip(head.layers, weight_keys):
        bias_key = key[: -len("weight")] + "bias"
        if bias_key not in state:
            raise ValueError(f"{path}: {key!r} has no matching {bias_key!r}")
        if tuple(state[key].shape) != tuple(layer.weight.shape):
            raise ValueError(f"{path}: layer shapes do not chain: {key} is {tuple(state[key].shape)}, dims {dims}")
        layer.weight.data.copy_(state[key].float())
        layer.bias.data.copy_(state[bias_key].float().reshape(-1))
    return head.eval()


@register_metric("aesthetic")
class AestheticScore(Metric):
    """Predicted aesthetic rating of each image: a LAION-style head (:class:`AestheticHead`) on the
    L2-normalized CLIP image embedding, mean over images (higher is better, scale of the head's
    training labels, about 1-10 for LAION's). The head must match the CLIP model's embedding size:
    LAION's heads expect OpenAI ViT-L/14 (768-d), hence that default model here.

    Without ``weights_path`` the metric is unavailable: :meth:`unavailable_reason` says why and
    ``update``/``compute`` raise :class:`MetricUnavailableError` with that message.
    """

    category = "image-quality"
    direction = "higher"
    summary = "aesthetic score: LAION-style linear/MLP head on CLIP image embeddings (needs weights_path)"
    source = "LAION aesthetic predictor; paper 000 Table 3 (Hentschel et al. 2022)"

    def __init__(
        self,
        weights_path: str | Path | None = None,
        scorer: ClipAdherence | None = None,
        model_name: str = AESTHETIC_MODEL,
        pretrained: str | None = AESTHETIC_PRETRAINED,
        device: str = "cpu",
        batch_size: int = 32,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.weights_path = None if weights_path is None else str(weights_path)
        self._scorer = scorer
        self._clip_kwargs = dict(
            model_name=model_name, pretrained=pretrained, device=device, batch_size=batch_size, cache_dir=cache_dir
        )
        self._head: AestheticHead | None = None

    def unavailable_reason(self) -> str | None:
        return NO_AESTHETIC_WEIGHTS if self.weights_path is None else None

    def params(self) -> dict[str, Any]:
        clip = self._scorer.describe() if self._scorer is not None else {
            "model_name": self._clip_kwargs["model_name"], "pretrained": self._clip_kwargs["pretrained"]
        }  # fmt: skip
        return {**clip, "weights_path": self.weights_path}

    @property
    def head(self) -> AestheticHead:
        """The aesthetic head, loaded on first use."""
        reason = self.unavailable_reason()
        if reason is not None:
            raise MetricUnavailableError(f"metric {self.name!r} is unavailable: {reason}")
        if self._head is None:
            self._head = load_aesthetic_head(self.weights_path)
        return self._head

    @property
    def scorer(self) -> ClipAdherence:
        """The CLIP scorer, loaded on first use."""
        if self._scorer is None:
            self._scorer = ClipAdherence(**self._clip_kwargs)
        return self._scorer

    @torch.inference_mode()
    def scores(self, images: Any) -> torch.Tensor:
        """Per-image aesthetic scores ``(N,)`` without recording them."""
        head = self.head
        emb = self.scorer.image_features(images)
        if emb.shape[-1] != head.embed_dim:
            raise ValueError(
                f"the aesthetic head expects {head.embed_dim}-d image embeddings but CLIP model "
                f"{self.scorer.model_name!r} gives {emb.shape[-1]}-d: use the CLIP model the head was trained on "
                f"(LAION's heads: model_name='ViT-L-14', pretrained='openai')"
            )
        return head(emb.to(next(head.parameters()).dtype)).float()

    def update(self, images: Any) -> list[float]:
        """Score a batch of images; returns the per-image scores."""
        return [self._record(v) for v in self.scores(images).tolist()]
