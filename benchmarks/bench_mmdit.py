"""MM-DiT tracing overhead: traced / untraced time of SD3- and Flux-width transformers, measured in one run.

Run: ``python benchmarks/bench_mmdit.py [--quick]`` (``nox -s bench``). CPU, random weights, offline. Each
transformer has its reference model's width and head geometry (SD3 medium: 24 heads of 64, joint width 4096;
FLUX.1: 24 heads of 128, joint width 4096, RoPE axes (16, 56, 56)) but only a few blocks (SD3: 2 joint blocks;
Flux: 1 double + 1 single), since the overhead is per layer and the full models do not fit this machine in
float32. The transformer is called directly on 256 px latents (16 x 16 tokens) with random text states (SD3:
77 + 256 text tokens, classifier-free-guidance batch of 2; Flux: 256 T5 tokens, batch 1), for:

- ``untraced``: the transformer as diffusers runs it;
- ``attn+norm``: recording ``attn``, ``norm`` and ``norm_sq`` (what daam, raw-attn, norm and norm-sq need);
- ``+concept``: the same plus ConceptAttention's concept stream (6 concepts through every joint/double block).

Repetitions alternate the three variants (ABBA order) and medians are compared; process CPU time is shown
too. Benchmarks report, they do not assert.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel  # noqa: E402

from evalkit.trace import Tracer  # noqa: E402

SD3 = {"sample_size": 32, "patch_size": 2, "in_channels": 16, "num_layers": 2, "attention_head_dim": 64,
       "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
       "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 96}
FLUX = {"patch_size": 1, "in_channels": 64, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 128,
        "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
        "guidance_embeds": False, "axes_dims_rope": (16, 56, 56)}
STATS = ("attn", "norm", "norm_sq")
N_CONCEPTS = 6


def _inputs(kind: str, gen: torch.Generator) -> dict:
    """Random inputs of one denoiser call at 256 px."""
    if kind == "sd3":
        return {"hidden_states": torch.randn(2, 16, 32, 32, generator=gen),
                "encoder_hidden_states": torch.randn(2, 77 + 256, 4096, generator=gen),
                "pooled_projections": torch.randn(2, 2048, generator=gen),
                "timestep": torch.tensor([500.0, 500.0])}
    tokens = 16 * 16
    rows, cols = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)  # (id 0, row, column)
    return {"hidden_states": torch.randn(1, tokens, 64, generator=gen),
            "encoder_hidden_states": torch.randn(1, 256, 4096, generator=gen),
            "pooled_projections": torch.randn(1, 768, generator=gen), "timestep": torch.tensor([0.5]),
            "img_ids": img_ids, "txt_ids": torch.zeros(256, 3)}


@torch.no_grad()
def _run(model, inputs: dict, variant: str, cfg: bool, steps: int) -> tuple[float, float]:
    """Wall and CPU seconds of ``steps`` denoiser calls under ``variant``."""
    stats = {"untraced": (), "attn+norm": STATS, "+concept": (*STATS, "concept")}[variant]
    concepts = torch.randn(N_CONCEPTS, 4096) if "concept" in stats else None
    wall, cpu = time.perf_counter(), time.process_time()
    if stats:
        with Tracer(model, stats, n_cond=1, cfg=cfg, concept_embeddings=concepts):
            for _ in range(steps):
                model(**inputs, return_dict=False)
    else:
        for _ in range(steps):
            model(**inputs, return_dict=False)
    return time.perf_counter() - wall, time.process_time() - cpu


def bench(kind: str, reps: int, steps: int) -> dict[str, float]:
    """Median seconds per variant over ``reps`` ABBA-ordered repetitions."""
    torch.manual_seed(0)
    model = (SD3Transformer2DModel(**SD3) if kind == "sd3" else FluxTransformer2DModel(**FLUX)).eval()
    inputs = _inputs(kind, torch.Generator().manual_seed(0))
    cfg = kind == "sd3"
    variants = ["untraced", "attn+norm", "+concept"]
    _run(model, inputs, "untraced", cfg, 1)  # warm-up
    times: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    for r in range(reps):
        for v in (variants if r % 2 == 0 else variants[::-1]):
            times[v].append(_run(model, inputs, v, cfg, steps))
    out = {}
    for v in variants:
        out[v] = statistics.median(t[0] for t in times[v])
        out[v + " cpu"] = statistics.median(t[1] for t in times[v])
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 repetition of 1 step (a smoke run)")
    args = ap.parse_args(argv)
    reps, steps = (1, 1) if args.quick else (4, 2)
    print(f"MM-DiT tracing overhead (CPU, {torch.get_num_threads()} threads, 256 px, {steps} calls x {reps} reps, "
          "medians)")
    for kind in ("sd3", "flux"):
        r = bench(kind, reps, steps)
        base, cpu = r["untraced"], r["untraced cpu"]
        print(f"  {kind:5s} untraced {base:6.2f} s | attn+norm {r['attn+norm']:6.2f} s "
              f"({r['attn+norm'] / base:.2f}x) | +concept {r['+concept']:6.2f} s ({r['+concept'] / base:.2f}x)"
              f" | cpu ratios {r['attn+norm cpu'] / cpu:.2f}x / {r['+concept cpu'] / cpu:.2f}x")


if __name__ == "__main__":
    main()
