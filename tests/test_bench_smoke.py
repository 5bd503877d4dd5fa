"""Smoke test of benchmarks/bench_trace.py: its memory-statistics part on tiny-sd and its helpers.
No timing assertions."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

SIZE = 128  # 16x16 latent: still every attn2 resolution of tiny-sd, 4x cheaper than the bench's 256 px
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_trace.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_trace", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_traced_union_is_what_the_methods_need(bench):
    assert bench.traced_stats() == {"attn", "norm", "norm_sq"}
    assert bench.traced_stats(["hrv-selective"]) == {"attn"}


def test_accumulated_statistic_bytes_do_not_depend_on_steps(bench, tiny_pipe):
    from evalkit.trace import find_cross_attention_layers

    few = bench.stat_bytes_for_steps(tiny_pipe, 2, size=SIZE)
    many = bench.stat_bytes_for_steps(tiny_pipe, 4, size=SIZE)
    assert few == many > 0
    # independent count per layer, float32: the attention sum and the attention-square sum over the
    # (1 conditional row, heads, Q, 77 tokens), and the value norms (1, heads, 77) they are scaled by
    # (norm and norm_sq follow from these; see LayerRecorder)
    latent_hw = (SIZE // 8, SIZE // 8)
    layers = [info for info, _ in find_cross_attention_layers(tiny_pipe.unet)]
    assert few == sum((2 * layer.heads * math.prod(layer.grid(latent_hw)) * 77 + layer.heads * 77) * 4
                      for layer in layers)


def test_recorder_bytes_count_summed_and_per_step_tensors(bench):
    import torch

    from evalkit.trace.processor import LayerRecorder

    rec = LayerRecorder(frozenset({"attn", "attn_steps"}))
    rec._sums = {"attn": torch.zeros(1, 2, 3, 4)}
    rec.steps = {"attn_steps": [torch.zeros(1, 5, 6, dtype=torch.float64)] * 3}
    tracer = SimpleNamespace(recorders=[rec, rec])
    assert bench.recorder_nbytes(tracer) == 2 * (24 * 4 + 3 * 30 * 8)


def test_ratio_helpers_compute_what_they_say(bench):
    assert bench.ratio(3.0, 2.0) == 1.5
    assert bench.ratio(1.0, 0.0) == math.inf
    assert math.isnan(bench.ratio(0.0, 0.0))
    # ratio of the medians, not median of the ratios (which would be 1.5 here)
    assert bench.median_ratio([1.0, 3.0, 100.0], [2.0, 2.0, 1.0]) == pytest.approx(3.0 / 2.0)
    assert bench.median_ratio([4.0, 1.0, 2.0], [1.0, 2.0, 8.0]) == pytest.approx(1.0)
    order = [kind for i in range(4) for kind in bench.pair_order(i)]
    assert order == ["untraced", "traced", "traced", "untraced"] * 2


def test_table_rows_and_status(bench):
    ok = bench.check_row("time ratio", 1.10, 1.10)
    over = bench.check_row("peak ratio", 1.06, 1.05, measured="1.06 (x / y)")
    assert (ok.status, ok.measured, ok.target) == ("OK", "1.100", "<= 1.10")
    assert (over.status, over.measured) == ("over", "1.06 (x / y)")
    lines = bench.format_table([ok, over]).splitlines()
    assert lines[0].split() == ["quantity", "measured", "target", "status"]
    assert len(lines) == 4 and lines[3].endswith("over")


def test_sd15_geometry_has_the_sd14_heads(bench):
    from evalkit.trace import find_cross_attention_layers

    unet = bench.build_sd15_unet(device="meta")  # no weights: instant
    layers = [info for info, _ in find_cross_attention_layers(unet)]
    assert len(layers) == 16 and all(layer.heads == 8 for layer in layers)
    assert [layer.grid((32, 32)) for layer in layers if layer.place == "mid"] == [(4, 4)]
    methods, source = bench.make_methods([n for layer in layers for n in layer.head_names()])
    assert set(methods) == {"daam", "raw-attn", "norm", "hrv-selective"}
    assert source.startswith("shipped sd14")


def test_rerun_benchmark_reports_both_runs_and_the_store_hit(tmp_path):
    """benchmarks/bench_rerun.py on a two-item tiny suite: both timings, their ratio, the store hit."""
    spec = importlib.util.spec_from_file_location("bench_rerun", BENCH.parent / "bench_rerun.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    suite = tmp_path / "tiny-bench.yaml"
    suite.write_text("model: tiny-sd\nsampler: {steps: 2, guidance: 7.5, height: 64, width: 64}\n"
                     "data: {source: shapesworld, n: 2, seed: 0, size: 64}\noptions: {masks: reference}\n"
                     "methods: [{name: daam}]\nmetrics: [{name: miou-inf, params: {tau: 0.4}}]\n")
    res = module.run_twice(str(suite))
    assert res["rerun_from_store"] is True
    assert res["first_s"] > 0 and res["rerun_s"] > 0
    assert res["ratio"] == pytest.approx(res["rerun_s"] / res["first_s"], rel=0.01, abs=1e-3)


def test_gpu_benchmark_smoke_runs_every_variant_on_cpu():
    """benchmarks/bench_gpu.py --quick: the launch counts, then every variant (untraced, evalkit attn-only, evalkit
    all four methods, layer-by-layer recording, per-step norm accumulation, daam 0.2.0 when installed) runs and
    the traced image is bit-identical to the untraced one."""
    import subprocess

    script = BENCH.parent / "bench_gpu.py"
    out = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    for variant in ("untraced", "evalkit-attn", "evalkit ", "evalkit-percall", "evalkit-perstep"):
        assert f"\n{variant}" in out.stdout
    assert "kernel launches per UNet call" in out.stdout
    assert "evalkit image bit-identical to untraced: True" in out.stdout
    cuda = subprocess.run([sys.executable, str(script), "--device", "cuda:7"], capture_output=True, text=True,
                          timeout=120, env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})
    assert cuda.returncode == 2 and "CUDA is not available" in cuda.stderr


def test_mmdit_benchmark_runs_at_any_size_and_block_count(monkeypatch):
    """benchmarks/bench_mmdit.py's measured function (the GPU run's, on the CPU at 64 px with one block of each
    kind): every variant runs, times are positive, no GPU memory is claimed on the CPU."""
    spec = importlib.util.spec_from_file_location("bench_mmdit", BENCH.parent / "bench_mmdit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sd3, flux = module._configs(64, (1, 1, 1))
    assert (sd3["num_layers"], flux["num_layers"], flux["num_single_layers"]) == (1, 1, 1)
    for kind in ("sd3", "flux"):
        r = module.bench(kind, reps=1, steps=1, size=64, blocks=(1, 1, 1))
        assert all(r[v] > 0 for v in ("untraced", "attn+norm", "+concept"))
        assert not any(key.endswith("peak") for key in r)
