"""Tests for evalkit.models: offline CLIP tokenizer, the tiny-sd fixture and the pipeline loader."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)

from evalkit.models import (
    BUILTIN_MODELS,
    SCHEDULERS,
    ModelLoadError,
    list_builtin_models,
    load,
    make_scheduler,
    resolve_dtype,
)
from evalkit.models.tokenizer import build_clip_tokenizer

PROMPTS = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "a cappuccino on a wooden table",
    "an astronaut riding a horse on mars, trending on artstation",
    "two dogs and 3 cats; 42 birds!!!",
    "   lots   of\twhite\nspace   ",
    "don't stop, it's the dog's bone (really?)",
    "hyperrealistic photograph of a red-haired woman's portrait, 8k, f/1.8",
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "café crème brûlée",
    "emoji 🐱 and #hashtags @mentions",
    "1999-12-31 at 23:59:59.999",
    "",
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_clip_tokenizer()


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionPipeline:
    return load("tiny-sd")


# --- tokenizer -------------------------------------------------------------------------------


def test_tokenizer_matches_open_clip(tokenizer) -> None:
    from open_clip.tokenizer import SimpleTokenizer

    reference = SimpleTokenizer()
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        assert ids[0] == 49406 and ids[-1] == 49407, prompt
        assert ids[1:-1] == reference.encode(prompt), prompt
    # the long word really exercises multi-piece BPE merging
    assert len(tokenizer("pneumonoultramicroscopicsilicovolcanoconiosis").input_ids) > 2 + 3


def test_tokenizer_special_tokens(tokenizer) -> None:
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77
    assert tokenizer.bos_token_id == 49406
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 49407
    padded = tokenizer("a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77 and padded[3:] == [49407] * 74
    long = tokenizer("cat " * 200, padding="max_length", truncation=True, max_length=77).input_ids
    assert len(long) == 77 and long[-1] == 49407


def test_build_clip_tokenizer_writes_files(tmp_path: Path, tokenizer) -> None:
    tok = build_clip_tokenizer(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    merges = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 49408 and vocab["<|endoftext|>"] == 49407
    assert merges[0].startswith("#version") and len(merges) == 1 + 48894
    assert tok("a cappuccino").input_ids == tokenizer("a cappuccino").input_ids


# --- tiny-sd fixture ---------------------------------------------------------------------------


def test_builtin_models_listed() -> None:
    models = list_builtin_models()
    assert "tiny-sd" in models and models["tiny-sd"]
    path = BUILTIN_MODELS["tiny-sd"]
    assert (path / "model_index.json").is_file()
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert size <= 20_000_000


def test_tiny_sd_geometry(pipe: StableDiffusionPipeline) -> None:
    cfg = pipe.unet.config
    assert pipe.vae_scale_factor == 8
    assert cfg.sample_size == 64
    assert pipe.vae.config.latent_channels == 4
    assert list(cfg.down_block_types) == ["CrossAttnDownBlock2D"] * 4
    assert list(cfg.up_block_types) == ["CrossAttnUpBlock2D"] * 4
    assert type(pipe.unet.mid_block).__name__ == "UNetMidBlock2DCrossAttn"
    assert cfg.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.safety_checker is None
    assert isinstance(pipe.scheduler, PNDMScheduler)


def _block_resolutions(n_blocks: int, latent: int) -> list[int]:
    """Spatial size seen by each down block (the last one has no downsampler)."""
    return [latent // 2**i for i in range(n_blocks)]


def test_attn2_structure(pipe: StableDiffusionPipeline) -> None:
    unet = pipe.unet
    down = _block_resolutions(len(unet.down_blocks), unet.config.sample_size)
    assert down == [64, 32, 16, 8]
    assert all(b.downsamplers is not None for b in unet.down_blocks[:-1])
    assert unet.down_blocks[-1].downsamplers is None
    res_heads: dict[str, set[tuple[int, int]]] = {"down": set(), "up": set(), "mid": set()}
    for i, block in enumerate(unet.down_blocks):
        for attn in block.attentions:
            res_heads["down"].update((down[i], tb.attn2.heads) for tb in attn.transformer_blocks)
    for i, block in enumerate(unet.up_blocks):
        for attn in block.attentions:
            res_heads["up"].update((down[::-1][i], tb.attn2.heads) for tb in attn.transformer_blocks)
    for attn in unet.mid_block.attentions:
        res_heads["mid"].update((down[-1], tb.attn2.heads) for tb in attn.transformer_blocks)
    assert {r for r, _ in res_heads["down"]} == {64, 32, 16, 8}
    assert {r for r, _ in res_heads["up"]} == {64, 32, 16, 8}
    assert res_heads["mid"] == {(8, 8)}
    assert res_heads["down"] == {(64, 2), (32, 4), (16, 4), (8, 8)}
    heads = {h for group in res_heads.values() for _, h in group}
    assert len(heads) >= 3


def test_attn2_resolutions_in_forward(pipe: StableDiffusionPipeline) -> None:
    """Run one UNet pass on a 64x64 latent and record the token grid each attn2 sees."""
    seen: dict[str, int] = {}
    hooks = []
    for name, module in pipe.unet.named_modules():
        if name.endswith("attn2"):

            def hook(mod, args, kwargs, name=name):
                hidden = args[0] if args else kwargs["hidden_states"]
                seen[name] = int(round(hidden.shape[1] ** 0.5))

            hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            pipe.unet(
                torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0)),
                torch.tensor(500),
                encoder_hidden_states=torch.zeros(1, 77, pipe.unet.config.cross_attention_dim),
            )
    finally:
        for h in hooks:
            h.remove()
    by_part = {
        p: {r for n, r in seen.items() if n.startswith(p)} for p in ("down_blocks", "up_blocks", "mid")
    }
    assert by_part["down_blocks"] == {64, 32, 16, 8}
    assert by_part["up_blocks"] == {64, 32, 16, 8}
    assert by_part["mid"] == {8}
    assert len(seen) == 4 + 8 + 1


def test_generation_is_deterministic(pipe: StableDiffusionPipeline) -> None:
    def run(seed: int) -> np.ndarray:
        out = pipe(
            "a photo of a cat",
            height=128,
            width=128,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        )
        return out.images

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (1, 128, 128, 3)
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# --- loader ------------------------------------------------------------------------------------

EXPECTED_SCHEDULERS = {
    "ddim": DDIMScheduler,
    "dpm-solver": DPMSolverMultistepScheduler,
    "pndm": PNDMScheduler,
    "euler": EulerDiscreteScheduler,
}


@pytest.mark.parametrize("name", sorted(EXPECTED_SCHEDULERS))
def test_make_scheduler(pipe: StableDiffusionPipeline, name: str) -> None:
    sched = make_scheduler(name, pipe.scheduler.config)
    assert type(sched) is EXPECTED_SCHEDULERS[name]
    assert sched.config.beta_schedule == "scaled_linear"
    assert sched.config.beta_start == pytest.approx(0.00085)
    assert sched.config.num_train_timesteps == 1000


def test_scheduler_names() -> None:
    assert set(SCHEDULERS) == set(EXPECTED_SCHEDULERS)


def test_load_local_folder_with_scheduler_override() -> None:
    p = load(str(BUILTIN_MODELS["tiny-sd"]), scheduler="dpm-solver")
    assert isinstance(p.scheduler, DPMSolverMultistepScheduler)
    assert p.safety_checker is None
    assert p.unet.dtype == torch.float32


def test_unknown_scheduler_errors() -> None:
    with pytest.raises(ModelLoadError, match="valid names: ddim, dpm-solver, pndm, euler"):
        load("tiny-sd", scheduler="heun-magic")
    with pytest.raises(ModelLoadError, match="unknown scheduler"):
        make_scheduler("nope", {})


def test_dtype_resolution() -> None:
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("float16") is torch.float16
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        resolve_dtype("float8")
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load("tiny-sd", dtype="int3")


def test_uncached_hub_id_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="local path") as info:
        load("evalkit-tests/definitely-not-cached-sd")
    assert time.monotonic() - start < 15
    assert "\n" not in str(info.value)
    assert "--model /path/to/diffusers/folder" in str(info.value)


def test_bad_local_paths(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load(str(tmp_path))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load(str(tmp_path / "missing" / "model"))
