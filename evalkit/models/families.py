"""The model families evalkit loads: SD 1.x, SD 2.x and SDXL (UNets) and SD3 and FLUX.1 (multimodal diffusion
transformers), told apart by a pipeline folder's configs, plus each family's reference geometry written as configs
(SD 1.5, SD 2.1, SDXL base 1.0, SD3 medium, FLUX.1 schnell) so that a full-size pipeline can be built with random
weights offline: tests and benchmarks exercise the real layer and head layout without downloading a checkpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .t5_tokenizer import build_t5_tokenizer
from .tokenizer import EOS_TOKEN, MAX_LENGTH, VOCAB_SIZE, build_clip_tokenizer

__all__ = [
    "FAMILIES",
    "TEXT_ENCODERS",
    "TRANSFORMERS",
    "Family",
    "UnsupportedModelError",
    "family_of",
    "random_pipeline",
    "reference_configs",
]


class UnsupportedModelError(ValueError):
    """A diffusers folder whose pipeline class evalkit does not trace."""


@dataclass(frozen=True)
class Family:
    """One supported model family: its diffusers pipeline class, a reference checkpoint and its shipped HRVs."""

    name: str
    title: str
    pipeline: str
    hub_id: str
    hrv: str | None  # shipped head relevance vectors that fit the reference geometry (see evalkit.methods.hrv)
    resolution: int  # the reference checkpoint's default image side in pixels
    backbone: str = "unet"  # the denoiser: "unet" (UNet2DConditionModel) or "transformer" (an MM-DiT)


#: Supported families by name, in release order.
FAMILIES: dict[str, Family] = {
    "sd1": Family("sd1", "Stable Diffusion 1.x", "StableDiffusionPipeline", "CompVis/stable-diffusion-v1-4",
                  "sd14", 512),
    "sd2": Family("sd2", "Stable Diffusion 2.x", "StableDiffusionPipeline", "stabilityai/stable-diffusion-2-1",
                  None, 768),
    "sdxl": Family("sdxl", "Stable Diffusion XL", "StableDiffusionXLPipeline",
                   "stabilityai/stable-diffusion-xl-base-1.0", "sdxl", 1024),
    "sd3": Family("sd3", "Stable Diffusion 3", "StableDiffusion3Pipeline",
                  "stabilityai/stable-diffusion-3-medium-diffusers", None, 1024, "transformer"),
    "flux": Family("flux", "FLUX.1", "FluxPipeline", "black-forest-labs/FLUX.1-schnell", None, 1024, "transformer"),
}

#: Family name -> the diffusers class of its transformer (the MM-DiT families only).
TRANSFORMERS: dict[str, str] = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}

#: Family name -> its text encoders' component names and transformers classes, in the pipeline's order.
TEXT_ENCODERS: dict[str, dict[str, str]] = {
    "sd1": {"text_encoder": "CLIPTextModel"},
    "sd2": {"text_encoder": "CLIPTextModel"},
    "sdxl": {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"},
    "sd3": {"text_encoder": "CLIPTextModelWithProjection", "text_encoder_2": "CLIPTextModelWithProjection",
            "text_encoder_3": "T5EncoderModel"},
    "flux": {"text_encoder": "CLIPTextModel", "text_encoder_2": "T5EncoderModel"},
}

#: The pipeline classes evalkit loads (diffusers class name -> family names using it).
PIPELINE_CLASSES: tuple[str, ...] = tuple(dict.fromkeys(f.pipeline for f in FAMILIES.values()))


def family_of(index: dict, unet_config: dict | None = None) -> Family:
    """The family of a pipeline from its ``model_index.json`` (``_class_name``) and UNet config: SD 2.x is a
    StableDiffusionPipeline whose transformer blocks use linear projections (SD 1.x uses 1x1 convolutions); SDXL,
    SD3 (3 and 3.5: one pipeline class) and Flux have a pipeline class of their own."""
    cls = index.get("_class_name")
    for name in ("sdxl", "sd3", "flux"):
        if cls == FAMILIES[name].pipeline:
            return FAMILIES[name]
    if cls == FAMILIES["sd1"].pipeline:
        linear = bool((unet_config or {}).get("use_linear_projection", False))
        return FAMILIES["sd2" if linear else "sd1"]
    raise UnsupportedModelError(
        f"pipeline class {cls!r} is not supported: evalkit traces {', '.join(PIPELINE_CLASSES)} "
        f"({', '.join(f.title for f in FAMILIES.values())})"
    )


def _scheduler(cls: str, **extra) -> dict:
    """A scheduler config with the beta schedule all three families were trained with."""
    return {"_class_name": cls, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000, "steps_offset": 1, **extra}


def _clip(hidden: int, layers: int, heads: int, act: str, projection: int) -> dict:
    """A CLIP text-encoder config over the 49,408-token CLIP vocabulary with a 77-token context."""
    return {"vocab_size": VOCAB_SIZE, "hidden_size": hidden, "intermediate_size": 4 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads, "max_position_embeddings": MAX_LENGTH,
            "hidden_act": act, "projection_dim": projection, "bos_token_id": 49406, "eos_token_id": 49407,
            "pad_token_id": 49407}


def _vae(sample: int, scaling: float, **extra) -> dict:
    """The KL autoencoder of every family (scale factor 8; 4 latent channels unless ``extra`` says otherwise)."""
    return {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512],
            "layers_per_block": 2, "norm_num_groups": 32, "sample_size": sample, "scaling_factor": scaling, **extra}


def _mmdit_vae(scaling: float, shift: float) -> dict:
    """The 16-channel KL autoencoder of SD3 and FLUX.1: a latent shift besides the scale, no quant convolutions."""
    return _vae(1024, scaling, latent_channels=16, shift_factor=shift, use_quant_conv=False, use_post_quant_conv=False,
                force_upcast=True)


def _t5(vocab: int, d_model: int, layers: int, heads: int, d_kv: int, d_ff: int) -> dict:
    """A T5 v1.1 encoder config (gated GELU, untied embeddings, 32 relative-position buckets) as SD3 and FLUX.1
    use; T5-XXL is ``_t5(32128, 4096, 24, 64, 64, 10240)``."""
    return {"vocab_size": vocab, "d_model": d_model, "num_layers": layers, "num_heads": heads, "d_kv": d_kv,
            "d_ff": d_ff, "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
            "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6, "tie_word_embeddings": False,
            "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}


def _flow_match(**extra) -> dict:
    """A rectified-flow Euler scheduler config (SD3 and FLUX.1)."""
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, **extra}


def reference_configs(family: str) -> dict[str, dict]:
    """Component configs of a family's reference checkpoint (SD 1.5, SD 2.1, SDXL base 1.0, SD3 medium, FLUX.1
    schnell), written here: the keys are the pipeline's component names; ``scheduler`` carries its
    ``_class_name``. FLUX.1 dev has schnell's geometry plus a guidance embedding (``guidance_embeds``)."""
    sd_unet = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
               "block_out_channels": [320, 640, 1280, 1280],
               "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
               "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
    if family == "sd1":
        return {"unet": {**sd_unet, "attention_head_dim": 8, "cross_attention_dim": 768},
                "vae": _vae(512, 0.18215),
                "text_encoder": _clip(768, 12, 12, "quick_gelu", 768),
                "scheduler": _scheduler("PNDMScheduler", skip_prk_steps=True, set_alpha_to_one=False)}
    if family == "sd2":  # diffusers' SD naming: attention_head_dim lists the head count per block (64-d heads)
        return {"unet": {**sd_unet, "sample_size": 96, "attention_head_dim": [5, 10, 20, 20],
                         "cross_attention_dim": 1024, "use_linear_projection": True, "upcast_attention": True},
                "vae": _vae(768, 0.18215),
                "text_encoder": _clip(1024, 23, 16, "gelu", 512),
                "scheduler": _scheduler("DDIMScheduler", prediction_type="v_prediction", clip_sample=False,
                                        set_alpha_to_one=False)}
    if family == "sdxl":
        return {"unet": {"sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
                         "block_out_channels": [320, 640, 1280],
                         "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                         "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                         "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
                         "cross_attention_dim": 2048, "use_linear_projection": True,
                         "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                         "projection_class_embeddings_input_dim": 1280 + 6 * 256},
                "vae": _vae(1024, 0.13025, force_upcast=True),
                "text_encoder": _clip(768, 12, 12, "quick_gelu", 768),
                "text_encoder_2": _clip(1280, 32, 20, "gelu", 1280),
                "scheduler": _scheduler("EulerDiscreteScheduler", timestep_spacing="leading",
                                        interpolation_type="linear", prediction_type="epsilon")}
    if family == "sd3":  # 24 joint blocks of 24 heads of 64; text states: CLIP-L + CLIP-G (2048) padded to T5's 4096
        return {"transformer": {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16,
                                "num_layers": 24, "attention_head_dim": 64, "num_attention_heads": 24,
                                "joint_attention_dim": 4096, "caption_projection_dim": 1536,
                                "pooled_projection_dim": 2048, "pos_embed_max_size": 192},
                "vae": _mmdit_vae(1.5305, 0.0609),
                "text_encoder": _clip(768, 12, 12, "quick_gelu", 768),
                "text_encoder_2": _clip(1280, 32, 20, "gelu", 1280),
                "text_encoder_3": _t5(32128, 4096, 24, 64, 64, 10240),
                "scheduler": _flow_match(shift=3.0)}
    if family == "flux":  # 19 double-stream + 38 single-stream blocks of 24 heads of 128; 2x2-packed latents
        return {"transformer": {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
                                "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                                "pooled_projection_dim": 768, "guidance_embeds": False,
                                "axes_dims_rope": [16, 56, 56]},
                "vae": _mmdit_vae(0.3611, 0.1159),
                "text_encoder": _clip(768, 12, 12, "quick_gelu", 768),
                "text_encoder_2": _t5(32128, 4096, 24, 64, 64, 10240),
                "scheduler": _flow_match(shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
                                         base_image_seq_len=256, max_image_seq_len=4096)}
    raise KeyError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create parameters directly in ``dtype`` (a full-size float32 SDXL would need 14 GB while it is built)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _text_encoder(cls: str, config: dict):
    """A transformers text encoder of class ``cls`` (CLIP with or without projection, or T5's encoder)."""
    import transformers

    config_cls = transformers.T5Config if cls == "T5EncoderModel" else transformers.CLIPTextConfig
    return getattr(transformers, cls)(config_cls(**config))


def random_pipeline(family: str, *, configs: dict[str, dict] | None = None, dtype: torch.dtype = torch.float32,
                    seed: int = 0):
    """A pipeline of ``family`` with seeded random weights built from ``configs`` (default: the reference
    geometry); the real CLIP BPE tokenizer(s), a second CLIP one padding with "!" as OpenCLIP's does, and for SD3
    and Flux the T5 tokenizer of :func:`~evalkit.models.t5_tokenizer.build_t5_tokenizer`."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    fam = FAMILIES[family]
    configs = configs or reference_configs(family)
    scheduler_cfg = dict(configs["scheduler"])
    scheduler = getattr(diffusers, scheduler_cfg.pop("_class_name")).from_config(scheduler_cfg)
    parts: dict = {"scheduler": scheduler}
    with _default_dtype(dtype):
        torch.manual_seed(seed)
        if fam.backbone == "unet":
            parts["unet"] = UNet2DConditionModel.from_config(configs["unet"])
        else:
            parts["transformer"] = getattr(diffusers, TRANSFORMERS[family]).from_config(configs["transformer"])
        torch.manual_seed(seed + 1)
        parts["vae"] = AutoencoderKL.from_config(configs["vae"])
        for i, (name, cls) in enumerate(TEXT_ENCODERS[family].items()):
            if name in configs:
                torch.manual_seed(seed + 2 + i)
                parts[name] = _text_encoder(cls, configs[name])
    pad = EOS_TOKEN if family == "sd1" else "!"
    if fam.name == "sdxl":
        pipe = diffusers.StableDiffusionXLPipeline(tokenizer=build_clip_tokenizer(), tokenizer_2=build_clip_tokenizer(
            pad_token=pad), add_watermarker=False, **parts)
    elif fam.name == "sd3":
        pipe = diffusers.StableDiffusion3Pipeline(tokenizer=build_clip_tokenizer(), tokenizer_2=build_clip_tokenizer(
            pad_token="!"), tokenizer_3=build_t5_tokenizer(), **parts)
    elif fam.name == "flux":
        pipe = diffusers.FluxPipeline(tokenizer=build_clip_tokenizer(), tokenizer_2=build_t5_tokenizer(), **parts)
    else:
        pipe = diffusers.StableDiffusionPipeline(tokenizer=build_clip_tokenizer(pad_token=pad), safety_checker=None,
                                                 feature_extractor=None, requires_safety_checker=False, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe
