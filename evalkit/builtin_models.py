"""Names of the models evalkit ships under ``fixtures/`` (kept free of heavy imports so that cache
keys and listings do not pay for importing diffusers)."""

from __future__ import annotations

from pathlib import Path

from .resources import builtin_dir

#: The checkout's top-level ``fixtures/``, or the installed wheel's copy of it (see :mod:`evalkit.resources`).
_FIXTURES = builtin_dir("fixtures")

#: Built-in model name -> local diffusers pipeline folder.
BUILTIN_MODELS: dict[str, Path] = {
    "tiny-sd": _FIXTURES / "tiny-sd",
    "tiny-sd2": _FIXTURES / "tiny-sd2",
    "tiny-sdxl": _FIXTURES / "tiny-sdxl",
    "tiny-sd3": _FIXTURES / "tiny-sd3",
    "tiny-flux": _FIXTURES / "tiny-flux",
    "shapesworld": _FIXTURES / "shapesworld",
}

#: Built-in model name -> the script under ``fixtures/`` that rebuilds (or retrains) it.
BUILTIN_SCRIPTS: dict[str, str] = {
    "tiny-sd": "build_tiny_sd.py",
    "tiny-sd2": "build_tiny_sd2.py",
    "tiny-sdxl": "build_tiny_sdxl.py",
    "tiny-sd3": "build_tiny_sd3.py",
    "tiny-flux": "build_tiny_flux.py",
    "shapesworld": "train_shapesworld.py",
}

#: One-line descriptions of the built-in models (optional per entry).
BUILTIN_DESCRIPTIONS: dict[str, str] = {
    "tiny-sd": "random-weight SD 1.x-shaped pipeline (64x64 latent, cross-attn at 64/32/16/8 + mid)",
    "tiny-sd2": "random-weight SD 2.x-shaped pipeline (v-prediction, linear projections, 2/3 heads; 32x32 latent)",
    "tiny-sdxl": "random-weight SDXL-shaped pipeline (two text encoders, time ids, 2-3 transformer layers; 32x32)",
    "tiny-sd3": "random-weight SD3-shaped MM-DiT pipeline (3 joint blocks of 4 heads; 2 CLIP + T5; 32x32 latent)",
    "tiny-flux": "random-weight FLUX.1-shaped MM-DiT pipeline (2 double + 2 single blocks; CLIP + T5; 32x32 latent)",
    "shapesworld": "SD pipeline trained on ShapesWorld (64x64 px, 16x16 latent, cross-attn at 16/8 + mid; exact GT)",
}
