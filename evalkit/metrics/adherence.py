"""Prompt adherence with open_clip (full-prompt similarity, minimum object similarity, CLIPScore) and
a LAION-style aesthetic score on CLIP image embeddings.

Definitions (E = L2-normalized CLIP embedding, cos = cosine similarity in [-1, 1]):

- full-prompt similarity (Attend-and-Excite protocol, as paper 000 reports it): ``cos(E(image),
  E(prompt))``, raw cosine, mean over images.
- minimum object similarity (Attend-and-Excite): ``min_j cos(E(image), E(sub_prompt_j))`` over the
  image's object sub-prompts (e.g. "a cat", "a dog" for "a cat and a dog"), mean over images.
- CLIPScore (Hessel et al. 2021): ``w * max(cos, 0)`` per image with ``w = 2.5``, so it lies in
  [0, 2.5]; mean over images. torchmetrics' ``CLIPScore`` reports ``max(100 * mean cos, 0)``
  instead: per image it equals 40x evalkit's value (w = 2.5), but it clamps the mean, not each
  image, so the two differ when some cosines are negative.

open_clip is imported only when a scorer is built (it is slow to import). The default model is
ViT-H-14 / laion2b_s32b_b79k, the OpenCLIP ViT-H/14 paper 001 uses; offline, pass a local checkpoint
as ``pretrained=/path/to/open_clip_pytorch_model.bin``.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._inputs import to_numpy
from .base import Metric, MetricUnavailableError
from .registry import register_metric

DEFAULT_MODEL = "ViT-H-14"
DEFAULT_PRETRAINED = "laion2b_s32b_b79k"
CLIPSCORE_W = 2.5
#: LAION's aesthetic heads were trained on OpenAI ViT-L/14 image embeddings (768-d).
AESTHETIC_MODEL = "ViT-L-14"
AESTHETIC_PRETRAINED = "openai"
NO_AESTHETIC_WEIGHTS = (
    "no aesthetic head weights configured: pass weights_path=... (a LAION-style linear or MLP head "
    "state dict, .safetensors or .pt, trained on the CLIP model's image embeddings)"
)


class ClipWeightsUnavailableError(MetricUnavailableError):
    """open_clip weights could not be loaded (no network, not cached, bad path); the message says how to fix it."""


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def _looks_like_path(pretrained: str) -> bool:
    return os.sep in pretrained or pretrained.endswith((".bin", ".pt", ".pth", ".safetensors"))


def load_open_clip(
    model_name: str = DEFAULT_MODEL,
    pretrained: str | None = DEFAULT_PRETRAINED,
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
) -> tuple[torch.nn.Module, Any, Any]:
    """``(model, preprocess, tokenizer)`` from open_clip, with errors that say what to do.

    ``pretrained`` is an open_clip tag (downloaded to the cache on first use) or a local checkpoint
    path; None gives random weights. An unknown model name raises ValueError with a suggestion; weights
    that cannot be fetched or read raise :class:`ClipWeightsUnavailableError` naming the model, the
    tag, the hub repository and how to pass a local file.
    """
    import open_clip

    if not model_name.startswith(("hf-hub:", "local-dir:")) and model_name not in open_clip.list_models():
        close = difflib.get_close_matches(model_name, open_clip.list_models(), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown open_clip model {model_name!r}{hint} (see open_clip.list_models())")
    if pretrained and _looks_like_path(pretrained) and not Path(pretrained).is_file():
        raise ClipWeightsUnavailableError(
            f"open_clip checkpoint file {pretrained!r} for model {model_name!r} does not exist: pass the path of "
            f"a downloaded checkpoint (e.g. open_clip_pytorch_model.bin) as pretrained=..."
        )
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=device, cache_dir=cache_dir
        )
    except Exception as e:  # open_clip raises RuntimeError for failed downloads and bad tags
        cfg = open_clip.get_pretrained_cfg(model_name, pretrained) if pretrained else {}
        where = cfg.get("hf_hub") or cfg.get("url") or "its hub repository"
        tags = open_clip.list_pretrained_tags_by_model(model_name) if ":" not in model_name else []
        raise ClipWeightsUnavailableError(
            f"could not load open_clip model {model_name!r} with pretrained={pretrained!r} ({type(e).__name__}: {e}). "
            f"Without network access, download the checkpoint elsewhere (from {where}) and pass its local path: "
            f"ClipAdherence(model_name={model_name!r}, pretrained='/path/to/open_clip_pytorch_model.bin'), or point "
            f"cache_dir= at a directory that already holds it. Known tags for this model: {tags}"
        ) from e
    tokenizer = open_clip.get_tokenizer(model_name)
    return model.eval(), preprocess, tokenizer


def _default_preprocess(model: torch.nn.Module) -> Any:
    import open_clip

    visual = getattr(model, "visual", None)
    size = getattr(visual, "image_size", 224)
    cfg = getattr(visual, "preprocess_cfg", {}) or {}
    return open_clip.image_transform(size, is_train=False, mean=cfg.get("mean"), std=cfg.get("std"))


def _default_tokenizer(model: torch.nn.Module) -> Any:
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=int(getattr(model, "context_length", 77)))


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------
def _array_to_pil(a: np.ndarray):
    from PIL import Image

    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3, 4):
        a = a.transpose(1, 2, 0)  # CHW -> HWC
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3):
        raise ValueError(f"an image must be (H, W), (H, W, C) or (C, H, W), got shape {tuple(a.shape)}")
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        if a.min() < 0 or a.max() > 1:
            raise ValueError(
                f"float images must lie in [0, 1] (got [{a.min():.3g}, {a.max():.3g}]); rescale, e.g. (x + 1) / 2"
            )
        a = np.round(a * 255.0).astype(np.uint8)
    return Image.fromarray(a).convert("RGB")


def to_pil_images(images: Any) -> list:
    """A list of RGB PIL images from a PIL image, a sequence of them, or tensors/arrays: ``(N, 3, H, W)``
    or ``(N, H, W, 3)`` (or one image without N), uint8 or float in [0, 1] (diffusers' "pt"/"np" output)."""
    from PIL import Image

    if isinstance(images, Image.Image):
        return [images.convert("RGB")]
    if isinstance(images, torch.Tensor | np.ndarray):
        a = to_numpy(images)
        if a.ndim == 3:
            a = a[None]
        if a.ndim != 4:
            raise ValueError(f"an image batch must be (N, C, H, W) or (N, H, W, C), got shape {tuple(a.shape)}")
        return [_array_to_pil(x) for x in a]
    return [x.convert("RGB") if isinstance(x, Image.Image) else _array_to_pil(to_numpy(x)) for x in images]


# ---------------------------------------------------------------------------------------------
# Scorer
# ---------------------------------------------------------------------------------------------
class ClipAdherence:
    """CLIP image-text similarities for prompt adherence, batched.

    Either loads ``model_name`` / ``pretrained`` with open_clip (a tag, or a local checkpoint path
    when there is no network), or uses an already-built ``model`` (any module with ``encode_image`` and
    ``encode_text``, e.g. ``open_clip.model.CLIP``) with ``preprocess`` (PIL -> tensor; default: open_clip's
    eval transform at the model's image size) and ``tokenizer`` (list[str] -> LongTensor; default:
    open_clip's SimpleTokenizer). All methods return float32 CPU tensors of shape ``(N,)``.
    """

    def __init__(
        self,
        model_name: str = DEFAULT_MODEL,
        pretrained: str | None = DEFAULT_PRETRAINED,
        device: str | torch.device = "cpu",
        model: torch.nn.Module | None = None,
        preprocess: Any = None,
        tokenizer: Any = None,
        batch_size: int = 32,
        cache_dir: str | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        if model is None:
            self.model_name, self.pretrained = model_name, pretrained
            model, loaded_preprocess, loaded_tokenizer = load_open_clip(model_name, pretrained, self.device, cache_dir)
            preprocess = preprocess or loaded_preprocess
            tokenizer = tokenizer or loaded_tokenizer
        else:
            self.model_name = model_name if model_name != DEFAULT_MODEL else type(model).__name__
            self.pretrained = pretrained if pretrained != DEFAULT_PRETRAINED else "given"
        self.model = model.to(self.device).eval()
        self.preprocess = preprocess or _default_preprocess(model)
        self.tokenizer = tokenizer or _default_tokenizer(model)

    def describe(self) -> dict[str, Any]:
        """Model identity for logs."""
        return {"model_name": self.model_name, "pretrained": self.pretrained}

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.inference_mode()
    def image_features(self, images: Any) -> torch.Tensor:
        """L2-normalized image embeddings ``(N, D)``."""
        pils = to_pil_images(images)
        if not pils:
            raise ValueError("no images given")
        out = []
        for i in range(0, len(pils), self.batch_size):
            x = torch.stack([self.preprocess(p) for p in pils[i : i + self.batch_size]])
            out.append(self.model.encode_image(x.to(self.device, self._dtype)).float())
        f = torch.cat(out)
        return (f / f.norm(dim=-1, keepdim=True)).cpu()

    @torch.inference_mode()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalized text embeddings ``(M, D)`` (the tokenizer truncates to the context length)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("no texts given")
        out = []
        for i in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(texts[i : i + self.batch_size])
            out.append(self.model.encode_text(tokens.to(self.device)).float())
        f = torch.cat(out)
        return (f / f.norm(dim=-1, keepdim=True)).cpu()

    def _paired_cosines(self, images: Any, prompts: Sequence[str]) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        img = self.image_features(images)
        if img.shape[0] != len(prompts):
            raise ValueError(f"{img.shape[0]} image(s) but {len(prompts)} prompt(s): pass one prompt per image")
        position = {p: i for i, p in enumerate(dict.fromkeys(prompts))}  # encode each distinct prompt once
        txt = self.text_features(list(position))
        return (img * txt[torch.tensor([position[p] for p in prompts])]).sum(-1)

    def full_prompt_similarity(self, images: Any, prompts: Sequence[str]) -> torch.Tensor:
        """``cos(E(image_i), E(prompt_i))`` per image (raw cosine in [-1, 1])."""
        return self._paired_cosines(images, prompts)

    def min_object_similarity(self, images: Any, object_prompts_per_image: Sequence[Sequence[str]]) -> torch.Tensor:
        """``min_j cos(E(image_i), E(object_prompts_per_image[i][j]))`` per image (Attend-and-Excite)."""
        groups = [list(g) for g in object_prompts_per_image]
        img = self.image_features(images)
        if img.shape[0] != len(groups):
            raise ValueError(f"{img.shape[0]} image(s) but {len(groups)} object-prompt list(s): pass one per image")
        for i, g in enumerate(groups):
            if not g or any(not isinstance(s, str) for s in g):
                raise ValueError(f"image {i}: object prompts must be a non-empty list of strings, got {g!r}")
        position = {s: i for i, s in enumerate(dict.fromkeys(s for g in groups for s in g))}
        sims = img @ self.text_features(list(position)).T  # (N, distinct sub-prompts)
        return torch.stack([sims[i, [position[s] for s in g]].min() for i, g in enumerate(groups)])

    def clip_score(self, images: Any, prompts: Sequence[str], w: float = CLIPSCORE_W) -> torch.Tensor:
        """CLIPScore ``w * max(cos, 0)`` per image (Hessel et al. 2021, w = 2.5: range [0, 2.5])."""
        return w * self._paired_cosines(images, prompts).clamp(min=0)


# ---------------------------------------------------------------------------------------------
# Metric classes
# ---------------------------------------------------------------------------------------------
class _ClipMetric(Metric):
    """Shared: a lazily built :class:`ClipAdherence` (so creating the metric is cheap), batched updates."""

    category = "adherence"
    direction = "higher"

    def __init__(
        self,
        scorer: ClipAdherence | None = None,
        model_name: str = DEFAULT_MODEL,
        pretrained: str | None = DEFAULT_PRETRAINED,
        device: str = "cpu",
        batch_size: int = 32,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self._scorer = scorer
        self._clip_kwargs = dict(
            model_name=model_name, pretrained=pretrained, device=device, batch_size=batch_size, cache_dir=cache_dir
        )

    @property
    def scorer(self) -> ClipAdherence:
        """The CLIP scorer, loaded on first use."""
        if self._scorer is None:
            self._scorer = ClipAdherence(**self._clip_kwargs)
        return self._scorer

    def params(self) -> dict[str, Any]:
        if self._scorer is not None:
            return self._scorer.describe()
        return {"model_name": self._clip_kwargs["model_name"], "pretrained": self._clip_kwargs["pretrained"]}

    def _record_all(self, values: torch.Tensor) -> list[float]:
        return [self._record(v) for v in values.tolist()]


@register_metric("clip-full-prompt")
class ClipFullPromptSimilarity(_ClipMetric):
    """Mean CLIP cosine between each image and its full prompt (Attend-and-Excite's full-prompt similarity)."""

    summary = "full-prompt similarity: CLIP cosine(image, prompt), raw cosine in [-1, 1]"
    source = "Attend-and-Excite protocol, paper 000 sec. 5 / paper 001 (OpenCLIP ViT-H/14)"

    def update(self, images: Any, prompts: Sequence[str]) -> list[float]:
        """Score a batch: one prompt per image. Returns the per-image cosines."""
        return self._record_all(self.scorer.full_prompt_similarity(images, prompts))


@register_metric("clip-min-object")
class ClipMinObjectSimilarity(_ClipMetric):
    """Mean over images of the minimum CLIP cosine over the image's object sub-prompts (Attend-and-Excite)."""

    summary = "minimum object similarity: min over object sub-prompts of CLIP cosine(image, sub-prompt)"
    source = "Attend-and-Excite protocol, paper 000 sec. 5"

    def update(self, images: Any, object_prompts_per_image: Sequence[Sequence[str]]) -> list[float]:
        """Score a batch: one list of object sub-prompts per image. Returns the per-image minima."""
        return self._record_all(self.scorer.min_object_similarity(images, object_prompts_per_image))


@register_metric("clip-score")
class ClipScore(_ClipMetric):
    """Mean CLIPScore ``w * max(cos, 0)`` (Hessel et al. 2021; w = 2.5, range [0, 2.5]; torchmetrics' scale is 40x)."""

    summary = "CLIPScore: w * max(cos(image, prompt), 0), w = 2.5 (range [0, 2.5])"
    source = "Hessel et al. 2021; paper 000 Table 3"

    def __init__(
        self,
        scorer: ClipAdherence | None = None,
        w: float = CLIPSCORE_W,
        model_name: str = DEFAULT_MODEL,
        pretrained: str | None = DEFAULT_PRETRAINED,
        device: str = "cpu",
        batch_size: int = 32,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(scorer, model_name, pretrained, device, batch_size, cache_dir)
        self.w = float(w)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "w": self.w}

    def update(self, images: Any, prompts: Sequence[str]) -> list[float]:
        """Score a batch: one prompt per image. Returns the per-image CLIPScores."""
        return self._record_all(self.scorer.clip_score(images, prompts, self.w))


# ---------------------------------------------------------------------------------------------
# Aesthetic score
# ---------------------------------------------------------------------------------------------
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
