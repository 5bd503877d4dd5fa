"""Prompt adherence with open_clip (full-prompt similarity, minimum object similarity, CLIPScore); the
aesthetic score on the same embeddings is in :mod:`evalkit.metrics.aesthetic`.

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
