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
too. ``--device cuda`` runs the same in bfloat16 at 1024 px with the full block counts (SD3 medium: 24 joint
blocks; FLUX.1: 19 double + 38 single) and adds peak GPU memory; ``nox -s bench -- --device cuda`` runs it
after ``bench_gpu.py``. Benchmarks report, they do not assert.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402

from evalkit.trace import Tracer  # noqa: E402

SD3 = {"sample_size": 32, "patch_size": 2, "in_channels": 16, "num_layers": 2, "attention_head_dim": 64,
       "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
       "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 96}
FLUX = {"patch_size": 1, "in_channels": 64, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 128,
        "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
        "guidance_embeds": False, "axes_dims_rope": (16, 56, 56)}
STATS = ("attn", "norm", "norm_sq")
N_CONCEPTS = 6


def _configs(size: int, blocks: tuple[int, int, int]) -> tuple[dict, dict]:
    """SD3 and Flux configs at ``size`` px with ``blocks`` = (SD3 joint, Flux double, Flux single blocks)."""
    sd3 = {**SD3, "sample_size": size // 8, "num_layers": blocks[0], "pos_embed_max_size": max(96, size // 16)}
    flux = {**FLUX, "num_layers": blocks[1], "num_single_layers": blocks[2]}
    return sd3, flux


def _inputs(kind: str, gen: torch.Generator, size: int = 256, device: str = "cpu",
            dtype: torch.dtype = torch.float32) -> dict:
    """Random inputs of one denoiser call at ``size`` px (made on the CPU generator, then moved)."""
    side = size // 16  # tokens per side: SD3 patchifies the 1/8 latent 2x2, Flux packs 2x2 latent patches
    if kind == "sd3":
        out = {"hidden_states": torch.randn(2, 16, size // 8, size // 8, generator=gen),
               "encoder_hidden_states": torch.randn(2, 77 + 256, 4096, generator=gen),
               "pooled_projections": torch.randn(2, 2048, generator=gen),
               "timestep": torch.tensor([500.0, 500.0])}
    else:
        rows, cols = torch.meshgrid(torch.arange(float(side)), torch.arange(float(side)), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)  # (id 0, row, column)
        out = {"hidden_states": torch.randn(1, side * side, 64, generator=gen),
               "encoder_hidden_states": torch.randn(1, 256, 4096, generator=gen),
               "pooled_projections": torch.randn(1, 768, generator=gen), "timestep": torch.tensor([0.5]),
               "img_ids": img_ids, "txt_ids": torch.zeros(256, 3)}
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() and not k.endswith("ids") else v.dtype)
            for k, v in out.items()}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def _run(model, inputs: dict, variant: str, cfg: bool, steps: int) -> tuple[float, float, int | None]:
    """Wall and CPU seconds and peak device bytes (None on the CPU) of ``steps`` denoiser calls under ``variant``."""
    stats = {"untraced": (), "attn+norm": STATS, "+concept": (*STATS, "concept")}[variant]
    param = next(model.parameters())
    device = str(param.device)
    concepts = torch.randn(N_CONCEPTS, 4096, dtype=param.dtype, device=param.device) if "concept" in stats else None
    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    wall, cpu = time.perf_counter(), time.process_time()
    if stats:
        with Tracer(model, stats, n_cond=1, cfg=cfg, concept_embeddings=concepts):
            for _ in range(steps):
                model(**inputs, return_dict=False)
    else:
        for _ in range(steps):
            model(**inputs, return_dict=False)
    _sync(device)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    return time.perf_counter() - wall, time.process_time() - cpu, peak


def bench(kind: str, reps: int, steps: int, size: int = 256, blocks: tuple[int, int, int] = (2, 1, 1),
          device: str = "cpu",
          dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Median seconds (and peak bytes on a GPU) per variant over ``reps`` ABBA-ordered repetitions."""
    torch.manual_seed(0)
    sd3, flux = _configs(size, blocks)
    with torch.device(device):  # built where it runs: FLUX.1's 12 B random parameters would take minutes on a CPU
        model = (SD3Transformer2DModel(**sd3) if kind == "sd3" else FluxTransformer2DModel(**flux)).eval()
    model = model.to(dtype=dtype)
    inputs = _inputs(kind, torch.Generator().manual_seed(0), size, device, dtype)
    cfg = kind == "sd3"
    variants = ["untraced", "attn+norm", "+concept"]
    _run(model, inputs, "untraced", cfg, 1)  # warm-up
    times: dict[str, list[tuple[float, float, int | None]]] = {v: [] for v in variants}
    for r in range(reps):
        for v in (variants if r % 2 == 0 else variants[::-1]):
            times[v].append(_run(model, inputs, v, cfg, steps))
    out = {}
    for v in variants:
        out[v] = statistics.median(t[0] for t in times[v])
        out[v + " cpu"] = statistics.median(t[1] for t in times[v])
        if times[v][0][2] is not None:
            out[v + " peak"] = max(t[2] for t in times[v])
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 repetition of 1 step (a smoke run)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda: then bfloat16, 1024 px and the full "
                                                    "block counts unless --dtype/--size/--blocks say otherwise")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    ap.add_argument("--size", type=int, default=None, help="pixels (CPU default 256, GPU 1024)")
    ap.add_argument("--blocks", type=int, nargs=3, default=None, metavar=("SD3", "FLUX_DOUBLE", "FLUX_SINGLE"),
                    help="SD3 joint blocks, Flux double- and single-stream blocks; CPU default 2 1 1, GPU 24 19 38")
    args = ap.parse_args(argv)
    diffusers_logging.set_verbosity_error()  # model.to(dtype) on configs built here warns about nothing
    gpu = args.device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine")
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    size = args.size or (1024 if gpu else 256)
    blocks = tuple(args.blocks or ((24, 19, 38) if gpu else (2, 1, 1)))
    reps, steps = (1, 1) if args.quick else (4, 2)
    where = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"MM-DiT tracing overhead ({where}, {str(dtype).removeprefix('torch.')}, {size} px, SD3 {blocks[0]} joint "
          f"blocks, Flux {blocks[1]} double + {blocks[2]} single blocks, {steps} calls x {reps} reps, medians)")
    for kind in ("sd3", "flux"):
        r = bench(kind, reps, steps, size, blocks, args.device, dtype)
        base, cpu = r["untraced"], r["untraced cpu"]
        line = (f"  {kind:5s} untraced {base:6.2f} s | attn+norm {r['attn+norm']:6.2f} s "
                f"({r['attn+norm'] / base:.2f}x) | +concept {r['+concept']:6.2f} s ({r['+concept'] / base:.2f}x)"
                f" | cpu ratios {r['attn+norm cpu'] / cpu:.2f}x / {r['+concept cpu'] / cpu:.2f}x")
        if "untraced peak" in r:
            peak = r["untraced peak"]
            line += (f" | peak {peak / 2**30:.2f} GiB, x{r['attn+norm peak'] / peak:.3f} / "
                     f"x{r['+concept peak'] / peak:.3f}")
        print(line)


if __name__ == "__main__":
    main()
