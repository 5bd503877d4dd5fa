"""The MM-DiT built-ins: tiny-sd3 (StableDiffusion3Pipeline) and tiny-flux (FluxPipeline) load offline with their
family, stay small, generate reproducibly without tracing and encode CLIP's 77 plus T5's tokens; evalkit's own T5
tokenizer (trained on its prompt grammar) is T5-shaped and deterministic; the full-size SD3 medium and FLUX.1
reference configs build on the meta device with their real block and head counts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import T5TokenizerFast

from evalkit.builtin_models import BUILTIN_MODELS
from evalkit.models import load, model_family, transformer_config, unet_config
from evalkit.models.families import family_of, random_pipeline, reference_configs
from evalkit.models.t5_tokenizer import build_t5_tokenizer, t5_vocab

MODELS = {"tiny-sd3": ("sd3", "StableDiffusion3Pipeline", "tokenizer_3", 256),
          "tiny-flux": ("flux", "FluxPipeline", "tokenizer_2", 512)}  # family, class, T5 tokenizer, T5 tokens
PROMPT = "a photo of a cat and a dog"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipes():
    """The two MM-DiT fixtures, loaded once."""
    return {name: load(name) for name in MODELS}


def _default_size(pipe) -> int:
    """The fixture's default side: the SD3 transformer's sample size times the VAE factor; FluxPipeline ignores
    its config (1024 px), so the VAE's ``sample_size`` as evalkit reads it."""
    sample = getattr(pipe.transformer.config, "sample_size", None)
    return sample * pipe.vae_scale_factor if sample is not None else pipe.vae.config.sample_size


@pytest.mark.parametrize("name", list(MODELS))
def test_fixture_loads_with_its_family_and_is_small(pipes, name):
    family, cls, _, _ = MODELS[name]
    folder = BUILTIN_MODELS[name]
    assert type(pipes[name]).__name__ == cls and model_family(name).name == family
    assert type(load(str(folder))).__name__ == cls  # a local folder of that class, too
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) <= 20_000_000
    assert (folder / "hrv.json").exists()  # its own HRVs (build_hrv through the concept stream; test_mmdit.py)
    assert unet_config(name) is None  # no UNet: the transformer's config instead
    assert transformer_config(name)["num_layers"] == pipes[name].transformer.config.num_layers


@pytest.mark.parametrize("name", list(MODELS))
def test_two_step_images_at_the_default_size_are_reproducible(pipes, name):
    pipe = pipes[name]
    size = _default_size(pipe)
    assert size == 256

    def run() -> np.ndarray:
        return np.asarray(pipe(PROMPT, num_inference_steps=2, height=size, width=size,
                               generator=torch.Generator(device="cpu").manual_seed(0)).images[0])

    first, second = run(), run()
    assert first.shape == (size, size, 3) and first.std() > 0
    assert first.tobytes() == second.tobytes()


@pytest.mark.parametrize("name", list(MODELS))
def test_text_states_are_clip_77_then_t5(pipes, name):
    family, _, t5_name, t5_len = MODELS[name]
    pipe = pipes[name]
    if family == "sd3":
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, PROMPT, PROMPT, do_classifier_free_guidance=False)
        assert embeds.shape[1] == 77 + t5_len and pooled.shape[-1] == pipe.transformer.config.pooled_projection_dim
    else:
        embeds, pooled, text_ids = pipe.encode_prompt(PROMPT, PROMPT)
        assert embeds.shape[1] == text_ids.shape[0] == t5_len
    assert embeds.shape[-1] == pipe.transformer.config.joint_attention_dim
    tokenizer = getattr(pipe, t5_name)
    assert isinstance(tokenizer, T5TokenizerFast) and tokenizer.model_max_length >= t5_len


@pytest.mark.parametrize("name", list(MODELS))
def test_fixture_t5_tokenizer_knows_every_word_and_appends_eos(name):
    tokenizer = T5TokenizerFast.from_pretrained(BUILTIN_MODELS[name] / MODELS[name][2])
    ids = tokenizer("a red bird on a table, next to a hippopotamus").input_ids
    assert tokenizer.unk_token_id not in ids and ids[-1] == tokenizer.eos_token_id == 1


def test_t5_tokenizer_is_t5_shaped():
    tokenizer = build_t5_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert len(tokenizer) == len(t5_vocab()) <= 2000
    for prompt in (PROMPT, "a red bird on a table", "A small red circle above a large blue square.",
                   "an astronaut riding a horse on mars, trending on artstation"):
        enc = tokenizer(prompt)
        pieces = tokenizer.convert_ids_to_tokens(enc.input_ids)
        assert tokenizer.unk_token_id not in enc.input_ids and pieces[-1] == "</s>", pieces
        assert [p for p in pieces if p.startswith("\u2581")] and tokenizer.decode(enc.input_ids,
                                                                                  skip_special_tokens=True) == prompt
    for word in ("a", "red", "bird", "photo", "cat", "dog", "circle", "hippopotamus"):  # corpus words: one piece
        assert tokenizer.tokenize(word) == ["\u2581" + word]
    unseen = tokenizer("zyxwvut q9 #42 (x)!").input_ids  # falls back to characters, never to <unk>
    assert tokenizer.unk_token_id not in unseen


def test_t5_tokenizer_builds_identical_files(tmp_path):
    """Twice in this process (trained afresh) and once in another (the trainer's hash maps are seeded per
    process): the same tokenizer.json bytes."""
    t5_vocab.cache_clear()
    build_t5_tokenizer(tmp_path / "a")
    t5_vocab.cache_clear()
    build_t5_tokenizer(tmp_path / "b")
    code = "import sys; from pathlib import Path; from evalkit.models.t5_tokenizer import build_t5_tokenizer; " \
           "build_t5_tokenizer(Path(sys.argv[1]))"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "c")], check=True, cwd=ROOT, timeout=300)
    first = (tmp_path / "a" / "tokenizer.json").read_bytes()
    assert first == (tmp_path / "b" / "tokenizer.json").read_bytes() == (tmp_path / "c" / "tokenizer.json").read_bytes()
    loaded = T5TokenizerFast.from_pretrained(tmp_path / "c")
    assert loaded(PROMPT).input_ids == build_t5_tokenizer()(PROMPT).input_ids


def test_family_of_reads_the_mmdit_pipeline_classes():
    assert family_of({"_class_name": "StableDiffusion3Pipeline"}).name == "sd3"
    assert family_of({"_class_name": "FluxPipeline"}).name == "flux"
    assert {family_of({"_class_name": c}).backbone for c in ("StableDiffusion3Pipeline", "FluxPipeline")} == {
        "transformer"}


def test_full_size_reference_configs_build_on_the_meta_device():
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    with torch.device("meta"):
        sd3 = SD3Transformer2DModel.from_config(reference_configs("sd3")["transformer"])
        flux = FluxTransformer2DModel.from_config(reference_configs("flux")["transformer"])
    assert len(sd3.transformer_blocks) == 24 and {b.attn.heads for b in sd3.transformer_blocks} == {24}
    assert sd3.config.attention_head_dim == 64 and sd3.config.caption_projection_dim == 1536
    assert len(flux.transformer_blocks) == 19 and len(flux.single_transformer_blocks) == 38
    assert {b.attn.heads for b in [*flux.transformer_blocks, *flux.single_transformer_blocks]} == {24}
    assert flux.config.attention_head_dim == 128 == sum(flux.config.axes_dims_rope)
    with torch.device("meta"):  # the whole pipelines, T5-XXL included, without allocating their weights
        pipe = random_pipeline("sd3")
    assert pipe.text_encoder_3.config.d_model == pipe.transformer.config.joint_attention_dim == 4096
    assert pipe.vae.config.latent_channels == pipe.transformer.config.in_channels == 16
