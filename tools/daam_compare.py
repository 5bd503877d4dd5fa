#!/usr/bin/env python
"""Compare evalkit's ``daam`` attribution with castorini's reference ``daam`` 0.2.0 on one generation.

Both sides generate the same image (same pipeline, prompt, seed, steps, guidance, a CPU
``torch.Generator`` seeded with the seed); evalkit traces it with :func:`evalkit.trace.generate`,
the reference with ``daam.trace(pipe)``. The script prints, per word: the token positions each side
merges, max abs / max rel difference of the 64x64 latent-grid word maps and of the image-size maps,
and the IoU of the binarized masks per threshold; then per traced layer the largest difference of
the raw (step-summed) per-head maps, and the image difference. Exits 1 if a map differs beyond
``--rtol``/``--atol`` or a mask agreement is below ``--min-agreement``.

The reference needs ``pip install --no-deps daam==0.2.0`` (its pinned requirements would
downgrade diffusers/transformers); it imports with the packages evalkit already depends on.

Usage: python tools/daam_compare.py --prompt "a bird and a bird above a macchiato" --words bird macchiato
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np
import torch

DEFAULT_PROMPT = "a bird and a bird above a macchiato"
DEFAULT_WORDS = ("bird", "macchiato", "above")
DEFAULT_TAUS = (0.3, 0.4, 0.5)


def rel_diff(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Max elementwise |a - ref| / |ref|, the denominator floored at 1e-6 of the reference's peak
    (so exact zeros of the clamped reference do not turn float noise into infinities)."""
    floor = max(ref.abs().max().item() * 1e-6, 1e-30)
    return ((a - ref).abs() / ref.abs().clamp_min(floor)).max().item()


def abs_diff(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref.double()).abs().max().item()


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def run_reference(pipe, prompt: str, seed: int, steps: int, guidance: float, data_dir: str):
    """One generation under ``daam.trace``; returns (image, GlobalHeatMap, {(name, head): raw map})."""
    from daam import trace
    from daam.trace import UNetCrossAttentionHooker

    with trace(pipe, data_dir=data_dir) as tc:
        out = pipe(
            prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator(device="cpu").manual_seed(seed),
        )
        global_map = tc.compute_global_heat_map()
    names = {id(m): n for n, m in pipe.unet.named_modules()}
    layer_names = {h.layer_idx: names[id(h.module)] for h in tc.module if isinstance(h, UNetCrossAttentionHooker)}
    raw = {(layer_names[layer], head): m for (_f, layer, head), m in tc.all_heat_maps}
    return out.images[0], global_map, raw


def run_evalkit(pipe, prompt: str, seed: int, steps: int, guidance: float):
    from evalkit.trace import generate

    g = generate(pipe, prompt, seeds=seed, steps=steps, guidance=guidance, stats={"attn"})
    return g.images[0], g.traces[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-sd", help="built-in name, diffusers folder or cached hub id")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--words", nargs="+", default=list(DEFAULT_WORDS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--taus", type=float, nargs="+", default=list(DEFAULT_TAUS))
    p.add_argument("--rtol", type=float, default=1e-5, help="relative tolerance of the map comparison")
    p.add_argument("--atol", type=float, default=1e-7, help="absolute tolerance of the map comparison")
    p.add_argument("--min-agreement", type=float, default=0.999, help="minimum mask pixel agreement")
    args = p.parse_args(argv)

    try:
        import daam
    except ImportError:
        print("reference package missing: pip install --no-deps daam==0.2.0", file=sys.stderr)
        return 2
    from daam.utils import compute_token_merge_indices

    from evalkit.methods import create_method
    from evalkit.methods.daam import daam_layers
    from evalkit.models import load

    pipe = load(args.model)
    scale = int(pipe.vae_scale_factor)
    if pipe.unet.config.sample_size * scale not in (512, 1024):
        print("warning: daam 0.2.0 assumes a 64x64 latent for 512/1024 px models only", file=sys.stderr)

    t0 = time.perf_counter()
    ek_image, tr = run_evalkit(pipe, args.prompt, args.seed, args.steps, args.guidance)
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory() as data_dir:
        ref_image, global_map, raw = run_reference(pipe, args.prompt, args.seed, args.steps, args.guidance, data_dir)
    t2 = time.perf_counter()
    print(
        f"daam {daam.__version__}; model {args.model}; prompt {args.prompt!r}; seed {args.seed}; "
        f"steps {args.steps}; guidance {args.guidance}; image {tr.image_hw}; latent {tr.latent_hw}"
    )
    print(f"generation: evalkit {t1 - t0:.1f} s, reference {t2 - t1:.1f} s")

    ok = True
    method = create_method("daam")
    att = method.attribute(tr, args.words)
    ek_img_maps = att.to_image()

    tau_cols = "".join(f"  IoU@{t:<4g} agree@{t:<4g}" for t in args.taus)
    print(
        f"\n{'word':<14} {'evalkit pos':<14} {'daam pos':<14} {'latent abs':>11} {'latent rel':>11} "
        f"{'image abs':>11} {'image rel':>11}{tau_cols}"
    )
    for word in args.words:
        ek_pos = tr.tokens.positions(word)
        ref_pos, _ = compute_token_merge_indices(pipe.tokenizer, args.prompt, word)
        wm = global_map.compute_word_heat_map(word)
        a, b = att.maps[word], wm.heatmap.float()
        ai, bi = ek_img_maps[word], wm.expand_as(ref_image, absolute=True)
        la, lr, ia, ir = abs_diff(a, b), rel_diff(a, b), abs_diff(ai, bi), rel_diff(ai, bi)
        ok &= sorted(ek_pos) == sorted(ref_pos)
        ok &= bool(torch.allclose(a, b, rtol=args.rtol, atol=args.atol))
        ok &= bool(torch.allclose(ai, bi, rtol=args.rtol, atol=args.atol))
        cols = ""
        for tau in args.taus:
            ma, mb = att.binarize(tau)[word], wm.expand_as(ref_image, threshold=tau).bool()
            agree = (ma == mb).float().mean().item()
            ok &= agree >= args.min_agreement
            cols += f"  {iou(ma, mb):>8.6f} {agree:>10.6f}"
        print(f"{word:<14} {str(ek_pos):<14} {str(ref_pos):<14} {la:>11.3e} {lr:>11.3e} {ia:>11.3e} {ir:>11.3e}{cols}")

    # All token maps (start and end tokens included) against the reference's global heat map.
    n = global_map.heat_maps.shape[0]
    all_maps = method.token_maps(tr, list(range(n)))
    ref_all = global_map.heat_maps.float()
    print(
        f"\nall {n} token maps (SOS..EOS): max abs {abs_diff(all_maps, ref_all):.3e}, "
        f"max rel {rel_diff(all_maps, ref_all):.3e}"
    )
    ok &= bool(torch.allclose(all_maps, ref_all, rtol=args.rtol, atol=args.atol))

    # Raw per-layer, per-head maps (sum over steps, conditional half), before resizing.
    print(f"\n{'layer':<54} {'grid':>7} {'heads':>5} {'in daam':>8} {'in evalkit':>10} {'max abs':>10} {'max rel':>10}")
    ref_layers = {name for name, _ in raw}
    for li, layer in enumerate(tr.layers):
        h, w = layer.grid(tr.latent_hw)
        used = daam_layers(layer, tr.latent_hw)
        in_ref = layer.name in ref_layers
        ok &= used == in_ref
        if in_ref:
            ek = tr.layer_maps("attn", li, range(tr.stats["attn"][li].shape[-1]))
            ref = torch.stack([raw[(layer.name, hd)] for hd in range(layer.heads)])
            diffs = f"{abs_diff(ek, ref):>10.3e} {rel_diff(ek, ref):>10.3e}"
        else:
            diffs = f"{'-':>10} {'-':>10}"
        print(f"{layer.name:<54} {f'{h}x{w}':>7} {layer.heads:>5} {str(in_ref):>8} {str(used):>10} {diffs}")

    a_img = np.asarray(ek_image).astype(np.int16)
    b_img = np.asarray(ref_image).astype(np.int16)
    d = np.abs(a_img - b_img)
    print(
        f"\nimages (uint8): max abs diff {d.max()}, differing values {(d > 0).mean():.4%} "
        "(daam computes attn2 outputs with baddbmm/softmax/bmm instead of SDPA)"
    )
    print("\nRESULT:", "MATCH" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
