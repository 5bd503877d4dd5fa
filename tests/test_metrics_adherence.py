"""CLIP adherence and aesthetic metrics on a tiny random-weight open_clip model (offline), checked against
direct open_clip forward passes and torchmetrics' CLIPScore."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from evalkit.metrics import (
    AestheticScore,
    ClipAdherence,
    ClipWeightsUnavailableError,
    MetricUnavailableError,
    create_metric,
    load_aesthetic_head,
    to_pil_images,
)

PROMPTS = ["a cat", "a dog and a cat", "a red bird", "a cat"]
# With torch seed 1 the tiny model's cosines for these pairs are mixed in sign (about -0.19, 0.08,
# 0.22, -0.22), which exercises CLIPScore's clamp; the test below asserts that before relying on it.
MODEL_SEED = 1


@pytest.fixture(scope="module")
def clip() -> ClipAdherence:
    import open_clip
    from open_clip.model import CLIP

    torch.manual_seed(MODEL_SEED)
    model = CLIP(
        embed_dim=16,
        vision_cfg=dict(image_size=32, layers=1, width=32, head_width=16, patch_size=8),
        text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
    )
    return ClipAdherence(
        model=model,
        preprocess=open_clip.image_transform(32, is_train=False),
        tokenizer=open_clip.get_tokenizer("ViT-B-32"),
        batch_size=3,  # smaller than the batch: exercises chunking
    )


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(4, 40, 48, 3), dtype=np.uint8)


def _direct_cosines(clip: ClipAdherence, images: np.ndarray, texts: list[str]) -> torch.Tensor:
    """Independent path: open_clip's own forward (which L2-normalizes), image x text cosine matrix."""
    from PIL import Image

    x = torch.stack([clip.preprocess(Image.fromarray(a)) for a in images])
    with torch.no_grad():
        image_features, text_features, _ = clip.model(x, clip.tokenizer(texts))
    return image_features @ text_features.T


def test_full_prompt_similarity_and_clip_score_match_direct_forward(clip, images):
    cos = _direct_cosines(clip, images, PROMPTS).diagonal()
    assert (cos < 0).any() and (cos > 0).any()  # the fixture's premise
    assert torch.allclose(clip.full_prompt_similarity(images, PROMPTS), cos, atol=1e-6)
    assert torch.allclose(clip.clip_score(images, PROMPTS), 2.5 * cos.clamp(min=0), atol=1e-6)
    assert torch.allclose(clip.clip_score(images, PROMPTS, w=1.0), cos.clamp(min=0), atol=1e-6)
    # input formats: PIL list, (N, 3, H, W) float in [0, 1], (N, H, W, 3) uint8 all agree
    as_float = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(clip.full_prompt_similarity(as_float, PROMPTS), cos, atol=1e-6)
    assert torch.allclose(clip.full_prompt_similarity(to_pil_images(images), PROMPTS), cos, atol=1e-6)
    with pytest.raises(ValueError, match="one prompt per image"):
        clip.full_prompt_similarity(images, PROMPTS[:2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        clip.full_prompt_similarity(as_float * 2 - 1, PROMPTS)


def test_min_object_similarity(clip, images):
    objects = [["a cat"], ["a dog", "a cat"], ["a bird", "red"], ["a cat", "a dog", "a tree"]]
    texts = sorted({s for g in objects for s in g})
    sims = _direct_cosines(clip, images, texts)
    expected = torch.stack([sims[i, [texts.index(s) for s in g]].min() for i, g in enumerate(objects)])
    assert torch.allclose(clip.min_object_similarity(images, objects), expected, atol=1e-6)
    with pytest.raises(ValueError, match="non-empty"):
        clip.min_object_similarity(images[:1], [[]])


def test_clip_score_against_torchmetrics(clip, images):
    """torchmetrics: max(100 * mean cos, 0). Per image that is 40x evalkit's 2.5 * max(cos, 0); over a batch
    with negative cosines it clamps the mean instead of each image, so the two differ in a known way."""
    from torchmetrics.multimodal import CLIPScore

    class Model(torch.nn.Module):
        config = SimpleNamespace()

        def get_image_features(self, pixel_values):
            return clip.model.encode_image(pixel_values)

        def get_text_features(self, input_ids, attention_mask=None):
            return clip.model.encode_text(input_ids)

    def processor(text=None, images=None, return_tensors="pt", padding=True):
        if images is not None:
            return {"pixel_values": torch.stack([clip.preprocess(p) for p in to_pil_images(list(images))])}
        ids = clip.tokenizer(text)
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}

    tm = CLIPScore(model_name_or_path=lambda: (Model(), processor))
    chw = torch.from_numpy(images).permute(0, 3, 1, 2)
    ours = clip.clip_score(images, PROMPTS)
    for i in range(len(PROMPTS)):
        tm.reset()
        tm.update(chw[i : i + 1], [PROMPTS[i]])
        assert tm.compute().item() == pytest.approx(40 * ours[i].item(), abs=1e-4)
    tm.reset()
    tm.update(chw, PROMPTS)
    cos = clip.full_prompt_similarity(images, PROMPTS)
    assert tm.compute().item() == pytest.approx(max(100 * cos.mean().item(), 0.0), abs=1e-4)
    assert tm.compute().item() != pytest.approx(40 * ours.mean().item(), abs=1e-3)


def test_metric_wrappers_batch_and_reduce(clip, images):
    cos = clip.full_prompt_similarity(images, PROMPTS)
    full = create_metric("clip-full-prompt", scorer=clip)
    full.update(images[:2], PROMPTS[:2])
    full.update(images[2:], PROMPTS[2:])
    r = full.compute()
    assert r.value == pytest.approx(cos.mean().item(), abs=1e-6) and r.n == 4 and r.ci95 is not None
    score = create_metric("clip-score", scorer=clip, w=2.5)
    score.update(images, PROMPTS)
    assert score.compute().value == pytest.approx(2.5 * cos.clamp(min=0).mean().item(), abs=1e-6)
    assert score.compute().params["w"] == 2.5 and score.compute().category == "adherence"
    mos = create_metric("clip-min-object", scorer=clip)
    mos.update(images, [["a cat"]] * 4)
    assert mos.compute().value == pytest.approx(clip.full_prompt_similarity(images, ["a cat"] * 4).mean().item())


def test_pretrained_weights_offline_give_clear_errors(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, never try the network
    with pytest.raises(ClipWeightsUnavailableError, match=r"does not exist.*pretrained="):
        ClipAdherence("ViT-B-32", pretrained=str(tmp_path / "missing.bin"))
    with pytest.raises(ValueError, match="did you mean .*'ViT-H-14'"):
        ClipAdherence("ViT-H-41")
    # offline and an empty cache: the download fails before any model is built
    with pytest.raises(ClipWeightsUnavailableError) as err:
        ClipAdherence("ViT-H-14", "laion2b_s32b_b79k", cache_dir=str(tmp_path))
    msg = str(err.value)
    assert "'ViT-H-14'" in msg and "laion2b_s32b_b79k" in msg and "pretrained='/path/to" in msg
    assert "laion/CLIP-ViT-H-14-laion2B-s32B-b79K" in msg
    metric = create_metric("clip-score")  # creating is cheap; loading happens at the first update
    assert metric.params()["model_name"] == "ViT-H-14"


def test_aesthetic_without_weights_is_skipped_with_a_clear_message(clip, images):
    m = AestheticScore(scorer=clip)
    assert "no aesthetic head weights configured: pass weights_path=" in m.unavailable_reason()
    with pytest.raises(MetricUnavailableError, match="pass weights_path="):
        m.update(images)
    with pytest.raises(MetricUnavailableError, match="pass weights_path="):
        m.compute()


def test_aesthetic_linear_and_mlp_heads(clip, images, tmp_path):
    from safetensors.torch import save_file

    emb = clip.image_features(images)  # (4, 16), L2-normalized
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(1, 16, generator=g), torch.randn(1, generator=g)
    save_file({"weight": w, "bias": b}, str(tmp_path / "linear.safetensors"))
    m = create_metric("aesthetic", weights_path=tmp_path / "linear.safetensors", scorer=clip)
    assert m.unavailable_reason() is None
    values = m.update(images)
    assert values == pytest.approx((emb @ w.T + b)[:, 0].tolist(), abs=1e-5)
    assert m.compute().value == pytest.approx(float((emb @ w.T + b).mean()), abs=1e-5)

    # LAION "improved aesthetic predictor" layout: layers.{0,2,4,6,7} Linear, Dropouts between, no activations
    dims = [16, 12, 8, 4, 3, 1]
    idx = [0, 2, 4, 6, 7]
    state = {}
    x = emb.clone()
    for i, (a, c) in zip(idx, zip(dims[:-1], dims[1:])):
        state[f"layers.{i}.weight"] = torch.randn(c, a, generator=g)
        state[f"layers.{i}.bias"] = torch.randn(c, generator=g)
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    torch.save({"state_dict": state}, tmp_path / "mlp.pt")
    head = load_aesthetic_head(tmp_path / "mlp.pt")
    assert head.dims == dims
    mlp = AestheticScore(weights_path=tmp_path / "mlp.pt", scorer=clip)
    assert mlp.scores(images).tolist() == pytest.approx(x[:, 0].tolist(), abs=1e-4)

    save_file({"weight": torch.randn(1, 768), "bias": torch.zeros(1)}, str(tmp_path / "l14.safetensors"))
    with pytest.raises(ValueError, match="768-d.*16-d"):
        AestheticScore(weights_path=tmp_path / "l14.safetensors", scorer=clip).update(images)
    assert math.isnan(AestheticScore(weights_path=tmp_path / "mlp.pt", scorer=clip).compute().value)
