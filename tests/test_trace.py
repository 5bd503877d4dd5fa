"""Tracing: processors are restored, images are unchanged, statistics stream, seeds are deterministic."""

from __future__ import annotations

import pytest
import torch

from evalkit.trace import LayerRecorder, Tracer, find_cross_attention_layers, generate

SIZE = 128  # 16x16 latent: fast on CPU, still every resolution of tiny-sd (8x-down layers are 2x2)


def _latents(pipe, prompt, seed, steps=2):
    return pipe(prompt, num_inference_steps=steps, guidance_scale=7.5, height=SIZE, width=SIZE,
                generator=torch.Generator().manual_seed(seed), output_type="latent").images


def test_layers_cover_every_attn2_with_place_and_geometry(tiny_pipe):
    layers = [info for info, _ in find_cross_attention_layers(tiny_pipe.unet)]
    names = [n for n, _ in tiny_pipe.unet.named_modules() if n.endswith("attn2")]
    assert [info.name for info in layers] == sorted(names, key=[info.name for info in layers].index)
    assert len(layers) == len(names)
    assert {info.place for info in layers} == {"down", "mid", "up"}
    assert {info.downsample for info in layers} == {1, 2, 4, 8}
    assert len({info.heads for info in layers}) > 1  # different head counts per layer
    mid = [info for info in layers if info.place == "mid"]
    assert len(mid) == 1 and mid[0].grid((64, 64)) == (8, 8)
    assert [info.index for info in layers if info.place == "up"] == list(range(sum(i.place == "up" for i in layers)))


def test_tracing_does_not_change_the_image_bit_identical(tiny_pipe):
    plain = _latents(tiny_pipe, "a red bird", 3)
    with Tracer(tiny_pipe.unet, {"attn", "norm", "norm_sq", "attn_steps"}, n_cond=1, cfg=True):
        traced = _latents(tiny_pipe, "a red bird", 3)
    assert torch.equal(plain, traced)


def test_processors_restored_on_exit_and_on_exception(tiny_pipe):
    modules = [m for _, m in find_cross_attention_layers(tiny_pipe.unet)]
    before = [m.processor for m in modules]
    with Tracer(tiny_pipe.unet, {"attn"}, n_cond=1, cfg=True):
        assert all(m.processor is not b for m, b in zip(modules, before))
    assert all(m.processor is b for m, b in zip(modules, before))
    with pytest.raises(RuntimeError, match="boom"), Tracer(tiny_pipe.unet, {"attn"}, n_cond=1, cfg=True):
        raise RuntimeError("boom")
    assert all(m.processor is b for m, b in zip(modules, before))
    with pytest.raises(ValueError, match="multiples of 8"):
        generate(tiny_pipe, "a dog", height=100, width=100, steps=1)
    assert all(m.processor is b for m, b in zip(modules, before))


def test_statistics_do_not_grow_with_steps(tiny_pipe):
    shapes = {}
    for steps in (1, 3):
        with Tracer(tiny_pipe.unet, {"attn", "norm"}, n_cond=1, cfg=True) as tracer:
            _latents(tiny_pipe, "a dog", 0, steps=steps)
        rec: LayerRecorder = tracer.recorders[0]
        assert rec.steps == {}
        shapes[steps] = [tuple(t.shape) for r in tracer.recorders for t in r.sums.values()]
        assert tracer.n_steps() == len(tiny_pipe.scheduler.timesteps)  # one record per UNet call
    assert shapes[1] == shapes[3]


def test_per_step_view_only_when_asked_and_reduced_over_heads(tiny_pipe):
    g = generate(tiny_pipe, "a dog", seeds=0, steps=2, height=SIZE, width=SIZE, stats={"attn", "attn_steps"})
    tr = g.traces[0]
    for li, layer in enumerate(tr.layers):
        h, w = layer.grid(tr.latent_hw)
        assert tr.stats["attn_steps"][li].shape == (tr.n_steps, h * w, 77)
        assert tr.stats["attn"][li].shape == (layer.heads, h * w, 77)
        # the per-step head means add up to the head mean of the summed statistic
        torch.testing.assert_close(tr.stats["attn_steps"][li].sum(0), tr.stats["attn"][li].mean(0))


def test_probabilities_sum_to_steps_and_cond_half_is_recorded(tiny_pipe):
    g1 = generate(tiny_pipe, "a dog", seeds=5, steps=1, height=SIZE, width=SIZE, stats={"attn"})
    tr = g1.traces[0]
    for a in tr.stats["attn"]:
        torch.testing.assert_close(a.sum(-1), torch.full(a.shape[:2], float(tr.n_steps)))
    # without guidance the batch holds only the conditional rows: the first step agrees
    g2 = generate(tiny_pipe, "a dog", seeds=5, steps=1, height=SIZE, width=SIZE, stats={"attn_steps"},
                  guidance=1.0)
    torch.testing.assert_close(g2.traces[0].stats["attn_steps"][0][0],
                               generate(tiny_pipe, "a dog", seeds=5, steps=1, height=SIZE, width=SIZE,
                                        stats={"attn_steps"}).traces[0].stats["attn_steps"][0][0])


def test_same_seed_same_statistics(tiny_pipe):
    a = generate(tiny_pipe, "a cat", seeds=11, steps=2, height=SIZE, width=SIZE, stats={"attn", "norm"})
    b = generate(tiny_pipe, "a cat", seeds=11, steps=2, height=SIZE, width=SIZE, stats={"attn", "norm"})
    for name in ("attn", "norm"):
        assert all(torch.equal(x, y) for x, y in zip(a.traces[0].stats[name], b.traces[0].stats[name]))


def test_batched_items_equal_single_runs(tiny_pipe):
    both = generate(tiny_pipe, ["a cat", "a dog"], seeds=[1, 2], steps=1, height=SIZE, width=SIZE, stats={"attn"})
    single = generate(tiny_pipe, "a dog", seeds=2, steps=1, height=SIZE, width=SIZE, stats={"attn"})
    for x, y in zip(both.traces[1].stats["attn"], single.traces[0].stats["attn"]):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_trace_save_load_roundtrip(tiny_pipe, tmp_path):
    g = generate(tiny_pipe, "a cat", seeds=1, steps=1, height=SIZE, width=SIZE, stats={"attn"})
    g.traces[0].save(tmp_path / "t")
    back = type(g.traces[0]).load(tmp_path / "t", tiny_pipe.tokenizer)
    assert back.layers == g.traces[0].layers and back.tokens.ids == g.traces[0].tokens.ids
    assert all(torch.equal(x, y) for x, y in zip(back.stats["attn"], g.traces[0].stats["attn"]))


def test_norm_sums_from_attention_sums_equal_per_step_accumulation(tiny_pipe, monkeypatch):
    """norm = sum_t A_t * n and norm_sq = sum_t (A_t * n)^2 are recorded as (sum_t A_t) * n and
    (sum_t A_t^2) * n^2 while the values do not change (one segment per layer); forcing a new segment
    at every call is the per-step accumulation. Both agree, with and without value steering (whose
    window changes the values after the first step), and with two prompts in one batch."""
    from evalkit.interventions import ValueSteering
    from evalkit.trace import generate
    from evalkit.trace.processor import TracingAttnProcessor

    kw = dict(seeds=[3, 4], steps=3, guidance=7.5, height=64, width=64, stats={"attn", "norm", "norm_sq"})
    prompts = ["a red bird on a branch", "a big bird near a cat"]  # "bird" at the same position
    steer = [ValueSteering(["bird"], ["up, layer: 0, head: 0", "down, layer: 1, head: 1"], alpha=3.0, steps=1)]
    segments = []
    real_key = TracingAttnProcessor.value_key

    def counting(self, context, edited):
        key = real_key(self, context, edited)
        segments.append(key)
        return key

    monkeypatch.setattr(TracingAttnProcessor, "value_key", counting)
    factored = [generate(tiny_pipe, prompts, **kw).traces,
                generate(tiny_pipe, prompts, interventions=steer, **kw).traces]
    assert {k[0] for k in segments} == {1}  # the text embedding is one tensor for the whole generation
    monkeypatch.setattr(TracingAttnProcessor, "value_key", lambda self, context, edited: None)  # per step
    per_step = [generate(tiny_pipe, prompts, **kw).traces,
                generate(tiny_pipe, prompts, interventions=steer, **kw).traces]
    for fast, slow in zip(factored, per_step):
        for tf, ts in zip(fast, slow):
            for name in ("attn", "norm", "norm_sq"):
                for a, b in zip(tf.stats[name], ts.stats[name]):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7 * float(b.abs().max()))
    # steering changed the bird token's norm statistic (the exact path was taken inside the window)
    up0 = next(i for i, lay in enumerate(factored[0][0].layers) if lay.place == "up" and lay.index == 0)
    bird = factored[0][0].tokens.positions("bird")[0]
    plain, steered = (f[0].stats["norm"][up0][0, :, bird] for f in factored)
    assert not torch.allclose(plain, steered)


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sd3"])
def test_generation_under_inference_mode_records_the_same_statistics(model):
    """Inference tensors have no version counter (the value-segment key reads it): under torch.inference_mode
    every call is its own segment, and the statistics equal those of a no_grad generation."""
    from evalkit.models import load

    pipe = load(model)
    kw = dict(seeds=0, steps=2, height=64, width=64, stats={"attn", "norm", "norm_sq"})
    with torch.inference_mode():
        fast = generate(pipe, "a red bird", **kw).traces[0]
    plain = generate(pipe, "a red bird", **kw).traces[0]
    for name in kw["stats"]:
        for a, b in zip(fast.stats[name], plain.stats[name]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
