"""evalkit's ``daam`` method against castorini's reference package ``daam`` 0.2.0 (MIT).

One generation per side on the tiny-sd fixture (same prompt, seed, steps, guidance, 512x512, a CPU
``torch.Generator`` seeded with SEED): evalkit traces with :func:`evalkit.trace.generate`, the
reference with ``daam.trace(pipe)``. A third, untraced generation checks that neither changes the
image beyond float noise.

The reference is installed with ``pip install --no-deps daam==0.2.0`` (its pinned requirements would
downgrade diffusers/transformers; it imports and traces with diffusers 0.42.1 as is). Skipped when
it is absent.

The reference computes attn2 outputs with baddbmm/softmax/bmm instead of SDPA, so its latents after
step 1 differ from evalkit's by float noise; the second step's attention maps therefore differ by
~1e-7 relative, which sets the tolerances below.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

daam = pytest.importorskip("daam")

from daam.trace import UNetCrossAttentionHooker  # noqa: E402
from daam.utils import compute_token_merge_indices  # noqa: E402

from evalkit.methods import create_method  # noqa: E402
from evalkit.methods.daam import daam_layers  # noqa: E402
from evalkit.trace import generate, tokenize_prompt  # noqa: E402

PROMPT = "a bird and a bird above a macchiato"  # "bird" twice, "macchiato" = mac|chi|ato</w>
WORDS = ("bird", "macchiato", "above")
SEED = 0
STEPS = 2
GUIDANCE = 7.5
SIZE = 512
TAUS = (0.3, 0.4, 0.5)

# Word / token maps (values ~5e-2): measured max abs diff ~3e-8, max rel ~8e-7.
MAP_RTOL, MAP_ATOL = 1e-5, 1e-7
# Raw per-layer, per-head maps summed over steps (values up to ~2, not averaged): measured max rel ~7e-6.
RAW_RTOL, RAW_ATOL = 1e-4, 1e-6
# Binarized masks: fraction of the 512x512 pixels on which both masks agree (measured >= 0.999996).
MIN_MASK_AGREEMENT = 0.999
# Images: the reference's bmm output path may move a few uint8 values by 1 (measured: 0.006% of values).
MAX_IMAGE_DIFF, MAX_IMAGE_DIFF_FRACTION = 2, 1e-3


def _diffs(a: torch.Tensor, ref: torch.Tensor) -> str:
    """Max abs and max rel difference (rel denominator floored at 1e-6 of the reference peak)."""
    a, ref = a.double(), ref.double()
    d = (a - ref).abs()
    floor = max(ref.abs().max().item() * 1e-6, 1e-30)
    rel = (d / ref.abs().clamp_min(floor)).max().item()
    return f"max abs diff {d.max().item():.3e}, max rel diff {rel:.3e}, reference peak {ref.abs().max().item():.3e}"


def _assert_close(a: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float, what: str) -> None:
    assert a.shape == ref.shape, f"{what}: shape {tuple(a.shape)} != reference {tuple(ref.shape)}"
    assert torch.allclose(a.float(), ref.float(), rtol=rtol, atol=atol), (
        f"{what} differs from daam 0.2.0: {_diffs(a, ref)} (rtol={rtol}, atol={atol})"
    )


def _call_kwargs() -> dict:
    return dict(
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        height=SIZE,
        width=SIZE,
        generator=torch.Generator(device="cpu").manual_seed(SEED),
    )


@pytest.fixture(scope="module")
def pipe():
    from evalkit.models import load

    return load("tiny-sd")


@pytest.fixture(scope="module")
def evalkit_run(pipe):
    g = generate(pipe, PROMPT, seeds=SEED, steps=STEPS, guidance=GUIDANCE, height=SIZE, width=SIZE, stats={"attn"})
    trace = g.traces[0]
    return g.images[0], trace, create_method("daam").attribute(trace, list(WORDS))


@pytest.fixture(scope="module")
def reference_run(pipe, tmp_path_factory):
    """(image, GlobalHeatMap, {(attn2 module name, head): raw step-summed map (77, h, w)})."""
    data_dir = tmp_path_factory.mktemp("daam-heads")  # daam mkdirs this; keep it out of ~/.cache
    with daam.trace(pipe, data_dir=str(data_dir)) as tc:
        out = pipe(PROMPT, **_call_kwargs())
        global_map = tc.compute_global_heat_map()
    names = {id(m): n for n, m in pipe.unet.named_modules()}
    layer_names = {h.layer_idx: names[id(h.module)] for h in tc.module if isinstance(h, UNetCrossAttentionHooker)}
    raw = {(layer_names[layer], head): m for (_factor, layer, head), m in tc.all_heat_maps}
    return out.images[0], global_map, raw


@pytest.fixture(scope="module")
def untraced_image(pipe):
    return pipe(PROMPT, **_call_kwargs()).images[0]


# -- token alignment (no generation) -------------------------------------------------------------
@pytest.mark.parametrize(
    ("prompt", "word"),
    [
        (PROMPT, "bird"),
        (PROMPT, "macchiato"),
        (PROMPT, "above"),
        ("A Bird, a bird!", "bird"),
        ("a red car and a red bus", "red car"),
        ("two cats and a cat", "cat"),
        pytest.param(
            "a bird near a birdhouse",
            "bird",
            marks=pytest.mark.xfail(
                strict=True,
                reason="daam matches BPE pieces, so 'bird' also takes the first piece of 'birdhouse' "
                "(bird|house</w>); evalkit matches whole words only",
            ),
        ),
    ],
)
def test_token_positions_match_reference(pipe, prompt, word):
    ours = tokenize_prompt(pipe.tokenizer, prompt).positions(word)
    ref, _ = compute_token_merge_indices(pipe.tokenizer, prompt, word)
    assert sorted(ours) == sorted(ref), f"{word!r} in {prompt!r}: evalkit positions {ours}, daam {ref}"


# -- traced maps ---------------------------------------------------------------------------------
def test_same_layers_as_reference(evalkit_run, reference_run):
    _, trace, _ = evalkit_run
    _, _, raw = reference_run
    ours = {layer.name for layer in trace.layers if daam_layers(layer, trace.latent_hw)}
    ref = {name for name, _ in raw}
    assert ours == ref, f"only evalkit: {sorted(ours - ref)}; only daam: {sorted(ref - ours)}"


def test_raw_per_layer_head_maps_match_reference(evalkit_run, reference_run):
    _, trace, _ = evalkit_run
    _, _, raw = reference_run
    failures, checked = [], 0
    for li, layer in enumerate(trace.layers):
        if not daam_layers(layer, trace.latent_hw):
            continue
        ours = trace.layer_maps("attn", li, range(trace.stats["attn"][li].shape[-1]))  # (heads, 77, h, w)
        ref = torch.stack([raw[(layer.name, h)] for h in range(layer.heads)])
        checked += 1
        if ours.shape != ref.shape or not torch.allclose(ours, ref.float(), rtol=RAW_RTOL, atol=RAW_ATOL):
            detail = _diffs(ours, ref) if ours.shape == ref.shape else f"{tuple(ours.shape)} vs {tuple(ref.shape)}"
            failures.append(f"{layer.name}: {detail}")
    assert checked > 0
    assert not failures, f"raw maps differ (rtol={RAW_RTOL}, atol={RAW_ATOL}):\n" + "\n".join(failures)


def test_all_token_maps_match_reference(evalkit_run, reference_run):
    """Every token of the prompt, start and end token included (daam keeps len(tokens) + 2 rows)."""
    _, trace, _ = evalkit_run
    _, global_map, _ = reference_run
    ref = global_map.heat_maps
    ours = create_method("daam").token_maps(trace, list(range(ref.shape[0])))
    _assert_close(ours, ref, MAP_RTOL, MAP_ATOL, f"token maps 0..{ref.shape[0] - 1}")


@pytest.mark.parametrize("word", WORDS)
def test_word_latent_map_matches_reference(evalkit_run, reference_run, word):
    _, _, att = evalkit_run
    _, global_map, _ = reference_run
    ref = global_map.compute_word_heat_map(word).heatmap
    assert tuple(att.maps[word].shape) == (64, 64)
    _assert_close(att.maps[word], ref, MAP_RTOL, MAP_ATOL, f"latent map of {word!r}")


@pytest.mark.parametrize("word", WORDS)
def test_word_image_map_matches_reference(evalkit_run, reference_run, word):
    _, _, att = evalkit_run
    ref_image, global_map, _ = reference_run
    wm = global_map.compute_word_heat_map(word)
    ours = att.to_image()[word]
    assert tuple(ours.shape) == (SIZE, SIZE)
    _assert_close(ours, wm.expand_as(ref_image, absolute=True), MAP_RTOL, MAP_ATOL, f"image-size map of {word!r}")
    # normalized maps live in [0, 1]: an absolute tolerance is the meaningful one
    _assert_close(att.normalized()[word], wm.expand_as(ref_image), 0.0, 1e-5, f"normalized map of {word!r}")


@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("word", WORDS)
def test_binarized_mask_matches_reference(evalkit_run, reference_run, word, tau):
    _, _, att = evalkit_run
    ref_image, global_map, _ = reference_run
    ours = att.binarize(tau)[word]
    ref = global_map.compute_word_heat_map(word).expand_as(ref_image, threshold=tau).bool()
    agree = (ours == ref).float().mean().item()
    union = (ours | ref).sum().item()
    iou = (ours & ref).sum().item() / union if union else 1.0
    assert agree >= MIN_MASK_AGREEMENT, (
        f"mask of {word!r} at tau={tau}: agreement {agree:.6f} < {MIN_MASK_AGREEMENT}, IoU {iou:.6f}, "
        f"{int((ours != ref).sum())} of {ours.numel()} pixels differ"
    )


# -- images --------------------------------------------------------------------------------------
def test_evalkit_image_is_bit_identical_to_untraced(evalkit_run, untraced_image):
    ours, ref = np.asarray(evalkit_run[0]), np.asarray(untraced_image)
    d = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    assert np.array_equal(ours, ref), f"evalkit image differs from untraced: max {d.max()}, {(d > 0).sum()} values"


def test_reference_image_matches_untraced(reference_run, untraced_image):
    ours, ref = np.asarray(reference_run[0]), np.asarray(untraced_image)
    assert ours.shape == ref.shape == (SIZE, SIZE, 3)
    d = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    frac = (d > 0).mean()
    assert d.max() <= MAX_IMAGE_DIFF and frac <= MAX_IMAGE_DIFF_FRACTION, (
        f"daam-traced image differs from untraced: max {d.max()} (allowed {MAX_IMAGE_DIFF}), "
        f"{frac:.4%} of values differ (allowed {MAX_IMAGE_DIFF_FRACTION:.2%})"
    )
