"""Token-removal sweeps: the baseline prompt and every one-word removal, generated with the same
seed and settings, batched in as few pipeline calls as memory allows (paper 000 Eq. 5)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from ..trace import (
    Trace,
    default_image_hw,
    denoiser_of,
    find_cross_attention_layers,
    find_joint_attention_layers,
    generate,
    is_mmdit,
    pipeline_tokenizer,
    tokenize_prompt,
)
from . import TokenRemoval


@dataclass
class RemovalSweep:
    """Baseline and one-word-removed generations of one prompt and seed."""

    prompt: str
    seed: int
    words: list[str]
    images: dict[str, Image.Image]  # "" -> baseline, word -> removal
    traces: dict[str, Trace]
    prompts: dict[str, str]


def prompt_words(tokenizer, prompt: str) -> list[str]:
    """Distinct alphanumeric words of ``prompt`` in order (what a sweep removes by default)."""
    tokens = tokenize_prompt(tokenizer, prompt)
    return list(dict.fromkeys(w.text for w in tokens.words if w.text.isalnum()))


def auto_batch_size(pipe, n_items: int, stats: Iterable[str], height: int, width: int,
                    budget_bytes: int | None = None) -> int:
    """How many items fit in one call: trace statistics plus a rough activation estimate per item
    against half of the free memory (CUDA: free device memory; CPU: available RAM)."""
    scale = int(getattr(pipe, "vae_scale_factor", 8))
    latent = (height // scale, width // scale)
    per_item = 0
    n_stats = max(len(set(stats)), 1)
    denoiser = denoiser_of(pipe)
    if is_mmdit(denoiser):  # text keys: CLIP + T5 (SD3) or T5 (Flux); joint attention runs fused, chunked
        layers, n_keys = [info for info, *_ in find_joint_attention_layers(denoiser)], pipeline_tokenizer(pipe).n_keys
    else:
        layers, n_keys = [info for info, _ in find_cross_attention_layers(denoiser)], 77
    for info in layers:
        h, w = info.grid(latent)
        per_item += info.heads * h * w * n_keys * 4 * (n_stats + 2)  # sums + transient probabilities
    q = latent[0] * latent[1]
    per_item += 2 * 4 * (q * q * 8 + q * 4 * 320 * 6)  # self-attention scores and feature maps, both CFG rows
    if budget_bytes is None:
        if pipe.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(pipe.device)
        else:
            import psutil

            free = psutil.virtual_memory().available
        budget_bytes = free // 2
    return max(1, min(n_items, int(budget_bytes // max(per_item, 1))))


def token_removal_sweep(
    pipe,
    prompt: str,
    *,
    seed: int,
    words: Sequence[str] | None = None,
    steps: int = 30,
    guidance: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    stats: Iterable[str] = ("norm",),
    batch_size: int | None = None,
) -> RemovalSweep:
    """Generate the baseline and each removal (K+1 items, identical initial noise per item)."""
    words = list(words) if words is not None else prompt_words(pipeline_tokenizer(pipe), prompt)
    keys = [""] + words
    prompts = {"": prompt, **{w: TokenRemoval(w).rewrite(prompt) for w in words}}
    default_h, default_w = default_image_hw(pipe)
    height, width = height or default_h, width or default_w
    stats = set(stats)
    bs = batch_size or auto_batch_size(pipe, len(keys), stats, height, width)
    images: dict[str, Image.Image] = {}
    traces: dict[str, Trace] = {}
    for start in range(0, len(keys), bs):
        chunk = keys[start:start + bs]
        gen = generate(pipe, [prompts[k] for k in chunk], seeds=[seed] * len(chunk), steps=steps,
                       guidance=guidance, height=height, width=width, stats=stats)
        for k, img, tr in zip(chunk, gen.images, gen.traces):
            images[k], traces[k] = img, tr
    return RemovalSweep(prompt=prompt, seed=seed, words=words, images=images, traces=traces, prompts=prompts)
