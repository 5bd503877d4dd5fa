"""Deferred recording (evalkit.trace.batch): a UNet call's layers recorded together at its end give the
statistics of layer-by-layer recording, with fewer kernel launches; order, edits, masks and errors are kept."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from evalkit.trace import LayerRecorder, Tracer, find_cross_attention_layers, generate
from evalkit.trace.batch import StepBatch

SIZE = 64
ALL = {"attn", "norm", "norm_sq", "attn_steps", "norm_steps"}


def _close(a: dict, b: dict) -> None:
    for name in a:
        for x, y in zip(a[name], b[name], strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6 * max(1.0, float(y.abs().max())))


def test_deferred_equals_per_call_recording(tiny_pipe):
    """Every statistic, two prompts in one guided batch, several UNet calls: grouped and per-call agree."""
    kw = dict(seeds=[1, 2], steps=3, height=SIZE, width=SIZE, stats=ALL)
    prompts = ["a red bird on a branch", "a big dog near a cat"]
    fast = generate(tiny_pipe, prompts, **kw).traces
    slow = generate(tiny_pipe, prompts, defer=False, **kw).traces
    for tf, ts in zip(fast, slow):
        assert tf.n_steps == ts.n_steps == len(tiny_pipe.scheduler.timesteps)
        _close(tf.stats, ts.stats)


@pytest.mark.parametrize("budget", [1, 40_000])
def test_a_memory_budget_splits_the_work_not_the_statistics(tiny_pipe, monkeypatch, budget):
    """A tiny ``max_bytes`` flushes after every call (1 byte) or splits groups into chunks (40 kB: a few
    64 px layers' scores): the statistics stay those of per-call recording."""
    monkeypatch.setattr(StepBatch, "max_bytes", budget)
    kw = dict(seeds=4, steps=2, height=SIZE, width=SIZE, stats={"attn", "norm", "norm_sq"})
    fast = generate(tiny_pipe, "a red bird on a branch", **kw).traces[0]
    slow = generate(tiny_pipe, "a red bird on a branch", defer=False, **kw).traces[0]
    _close(fast.stats, slow.stats)
    batch = StepBatch()
    rec = LayerRecorder(frozenset({"attn"}), slice(1, 2), batch=batch)
    attn, q, k, v = _layer_call(0)
    rec.record(attn, q, k, v, None, (1, False))
    assert len(batch) == (0 if budget == 1 else 1)  # held queries over the budget: recorded at once


@pytest.mark.parametrize("intervention", ["steering", "reweight", "head-removal"])
def test_deferred_equals_per_call_under_interventions(tiny_pipe, intervention):
    """Value steering (values change after step 1: new segments), reweighting (edited probabilities, recorded
    at the call) and head removal keep the deferred statistics equal to the per-call ones."""
    from evalkit.interventions import HeadAblation, HeadReweighting, ValueSteering

    heads = ["up, layer: 0, head: 0", "down, layer: 1, head: 1"]
    iv = {"steering": ValueSteering(["bird"], heads, alpha=3.0, steps=1),
          "reweight": HeadReweighting(heads, factor=2.0),
          "head-removal": HeadAblation(heads)}[intervention]
    kw = dict(seeds=3, steps=3, height=SIZE, width=SIZE, stats={"attn", "norm", "norm_sq"}, interventions=[iv])
    fast = generate(tiny_pipe, "a red bird on a branch", **kw).traces[0]
    slow = generate(tiny_pipe, "a red bird on a branch", defer=False, **kw).traces[0]
    _close(fast.stats, slow.stats)


def test_deferred_recording_matches_an_independent_softmax(tiny_pipe):
    """One step, no guidance: each layer's attention sum is softmax(q k^T / sqrt(d)) of the layer's own
    projections of its input, computed here from hooks on to_q / to_k."""
    layers = find_cross_attention_layers(tiny_pipe.unet)
    seen: dict[str, dict[str, torch.Tensor]] = {}
    hooks = []
    for info, module in layers:
        for proj in ("to_q", "to_k"):
            def keep(_m, _args, out, name=info.name, proj=proj):
                seen.setdefault(name, {})[proj] = out.detach().clone()
            hooks.append(getattr(module, proj).register_forward_hook(keep))
    try:
        trace = generate(tiny_pipe, "a cat", seeds=0, steps=1, guidance=1.0, height=SIZE, width=SIZE,
                         stats={"attn"}).traces[0]
    finally:
        for h in hooks:
            h.remove()
    for li, (info, module) in enumerate(layers):
        q, k = seen[info.name]["to_q"], seen[info.name]["to_k"]
        h = module.heads
        q = q.view(1, -1, h, q.shape[-1] // h).transpose(1, 2)
        k = k.view(1, -1, h, k.shape[-1] // h).transpose(1, 2)
        ref = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)[0]
        torch.testing.assert_close(trace.stats["attn"][li], ref, rtol=1e-5, atol=1e-6)


def _layer_call(seed: int, heads: int = 2, q_len: int = 6, k_len: int = 5, d: int = 4):
    g = torch.Generator().manual_seed(seed)
    attn = torch.nn.Module()
    attn.scale = d ** -0.5
    attn.to_out = torch.nn.ModuleList([torch.nn.Linear(heads * d, 3)])
    q = torch.randn(2, heads, q_len, d, generator=g)
    k = torch.randn(2, heads, k_len, d, generator=g)
    v = torch.randn(2, heads, k_len, d, generator=g)
    return attn, q, k, v


def test_a_layer_called_twice_before_a_flush_keeps_its_order():
    """Without a denoiser hook (a processor used on its own) the batch flushes when a layer comes back, and
    reading the sums flushes the rest: the result equals immediate recording."""
    stats = frozenset({"attn", "norm", "attn_steps"})
    batch = StepBatch()
    deferred = [LayerRecorder(stats, slice(1, 2), batch=batch) for _ in range(2)]
    immediate = [LayerRecorder(stats, slice(1, 2)) for _ in range(2)]
    calls = [_layer_call(s) for s in range(2)]
    for step in range(3):
        for layer, (attn, q, k, v) in enumerate(calls):
            qs = q * (1 + step)  # queries change per step, keys and values do not
            deferred[layer].record(attn, qs, k, v, None, (1, False))
            immediate[layer].record(attn, qs, k, v, None, (1, False))
        if step == 0:
            assert len(batch) == 2  # waiting for the end of the "UNet call"
    for a, b in zip(deferred, immediate):
        assert a.n_calls == b.n_calls == 3
        _close(a.sums, b.sums)
        _close(a.steps, b.steps)
    assert len(batch) == 0


def test_an_attention_mask_records_at_the_call_after_flushing():
    attn, q, k, v = _layer_call(0)
    mask = torch.zeros(2, 1, 1, k.shape[2])
    mask[..., -1] = -1e4
    batch = StepBatch()
    rec = LayerRecorder(frozenset({"attn"}), slice(1, 2), batch=batch)
    rec.record(attn, q, k, v, None, (1, False))
    rec.record(attn, q, k, v, mask, (1, False))  # flushes the first call, then records this one at once
    assert len(batch) == 0 and rec.n_calls == 2
    expected = torch.softmax(q[1:] @ k[1:].transpose(-1, -2) * attn.scale, -1)
    masked = torch.softmax(q[1:] @ k[1:].transpose(-1, -2) * attn.scale + mask[1:], -1)
    torch.testing.assert_close(rec.sums["attn"], expected + masked)
    assert float(masked[..., -1].max()) < 1e-3


def test_a_failing_unet_call_leaves_nothing_pending_and_restores_processors(tiny_pipe):
    modules = [m for _, m in find_cross_attention_layers(tiny_pipe.unet)]
    before = [m.processor for m in modules]
    unet = tiny_pipe.unet
    with pytest.raises(RuntimeError, match="stop"), Tracer(unet, {"attn"}, n_cond=1, cfg=True) as tracer:
        def boom(*_):
            raise RuntimeError("stop")
        hook = modules[-1].register_forward_hook(boom)  # raises after the last layer recorded
        try:
            unet(torch.zeros(2, 4, 8, 8), torch.tensor(10),
                 encoder_hidden_states=torch.zeros(2, 77, unet.config.cross_attention_dim))
        finally:
            hook.remove()
    assert len(tracer.batch) == 0
    assert all(m.processor is b for m, b in zip(modules, before))


def _bench_gpu():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module


def test_grouping_launches_a_fixed_number_of_kernels_per_layer_geometry(tiny_pipe):
    """The launches tracing adds to a UNet call (counted, not timed) are at most five per distinct attn2
    geometry when grouped (stack, cast, matmul, softmax, multi-tensor add), against one set per layer."""
    bench = _bench_gpu()
    unet = tiny_pipe.unet
    counts = bench.launch_counts(unet, SIZE, torch.float32, ["attn", "norm"])
    layers = find_cross_attention_layers(unet)
    geometries = {(m.heads, info.downsample) for info, m in layers}
    added, per_call = counts["evalkit"] - counts["untraced"], counts["evalkit-percall"] - counts["untraced"]
    assert 0 < added <= 5 * len(geometries)
    assert per_call >= 3 * len(layers)  # matmul, softmax, add at every layer
    assert added < per_call


def test_half_precision_models_record_fp32_statistics_either_way():
    """A bfloat16 pipeline (as fp16 on a GPU): the grouped path casts the stacked queries to fp32 like the
    per-call path does, so both give the same fp32 statistics."""
    from evalkit.models import load

    pipe = load("tiny-sd").to(torch.bfloat16)
    kw = dict(seeds=[1, 2], steps=2, height=SIZE, width=SIZE, stats={"attn", "norm", "norm_sq"})
    fast = generate(pipe, ["a red bird", "a big dog"], **kw).traces
    slow = generate(pipe, ["a red bird", "a big dog"], defer=False, **kw).traces
    for tf, ts in zip(fast, slow):
        assert {t.dtype for ts_ in tf.stats.values() for t in ts_} == {torch.float32}
        _close(tf.stats, ts.stats)


def test_sd15_launch_counts_the_readme_reports():
    """The README's SD-1.5 figures (512 px, fp16, the four methods' statistics, counted on the meta device):
    1144 launches untraced, +19 grouped, +64 layer by layer. A change in diffusers or in the tracer shows here."""
    bench = _bench_gpu()
    sys.path.insert(0, str(Path(bench.__file__).parent))
    try:
        from bench_trace import build_sd15_unet
    finally:
        sys.path.pop(0)
    counts = bench.launch_counts(build_sd15_unet(device="meta").to(torch.float16), 512, torch.float16,
                                 ["attn", "norm"])
    assert counts == {"untraced": 1144, "evalkit": 1163, "evalkit-percall": 1208}
