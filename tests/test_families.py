"""Model families: SD 1.x (tiny-sd), SD 2.x (tiny-sd2) and SDXL (tiny-sdxl) load with their own pipeline class,
trace exactly (attn2 probabilities recomputed here from each layer's own q/k; images unchanged by tracing),
attribute with every method and run every intervention; ``hrv: model`` picks the HRVs whose heads match the
UNet (SDXL base geometry: the shipped sdxl vectors) and a file for another family is an exit-2 error before
anything is generated. The full-geometry builds (SD 1.5, SD 2.1, SDXL base) are the slow test at the end."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from evalkit.cli import main
from evalkit.methods import HeadRelevance, available_methods, create_method, hrv_for_model
from evalkit.models import ModelLoadError, load, model_family
from evalkit.models.families import reference_configs
from evalkit.trace import Tracer, find_cross_attention_layers, generate, model_head_names, unet_head_names
from evalkit.trace.tokens import check_same_positions

FAMILIES = {"tiny-sd": ("sd1", "StableDiffusionPipeline"), "tiny-sd2": ("sd2", "StableDiffusionPipeline"),
            "tiny-sdxl": ("sdxl", "StableDiffusionXLPipeline")}
SIZE, STEPS, SEED = 128, 2, 5  # 16x16 latent: every attn2 resolution of the three fixtures
PROMPT = "a red bird on a table next to a bird"
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_families.py"


@pytest.fixture(scope="module")
def pipes():
    """The three built-in family fixtures, loaded once."""
    return {name: load(name) for name in FAMILIES}


@pytest.fixture(scope="module")
def bench():
    """benchmarks/bench_families.py as a module (its config folders and full-geometry runs)."""
    spec = importlib.util.spec_from_file_location("bench_families", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _run(pipe, **kw):
    """One seeded pipeline call at the test size (the settings ``generate`` uses)."""
    return pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE,
                generator=torch.Generator(device="cpu").manual_seed(SEED), **kw).images


class _ProbabilityRecorder:
    """Test-only attn2 processor: the output from diffusers' AttnProcessor2_0, and on the side each head's
    softmax(q k^T / sqrt(d)) of the conditional rows, from the layer's own to_q / to_k, summed over calls."""

    def __init__(self) -> None:
        self.inner, self.total = AttnProcessor2_0(), None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        q, k = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states)
        heads = attn.heads
        d = q.shape[-1] // heads
        cond = q.shape[0] // 2  # classifier-free guidance: [uncond; cond]
        per_head = []
        for h in range(heads):
            qh, kh = q[cond:, :, h * d:(h + 1) * d].double(), k[cond:, :, h * d:(h + 1) * d].double()
            per_head.append(torch.softmax(qh @ kh.transpose(-1, -2) / d**0.5, dim=-1)[0])
        probs = torch.stack(per_head)
        self.total = probs if self.total is None else self.total + probs
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_is_read_from_the_model_index(pipes, name):
    family, cls = FAMILIES[name]
    assert model_family(name).name == family
    assert type(pipes[name]).__name__ == cls
    if family == "sd2":  # SD 2.x geometry: v-prediction, linear projections, head counts per block
        assert pipes[name].scheduler.config.prediction_type == "v_prediction"
        assert pipes[name].unet.config.use_linear_projection
        assert len(set(pipes[name].unet.config.attention_head_dim)) > 1


@pytest.mark.parametrize("name", list(FAMILIES))
def test_trace_equals_probabilities_recomputed_from_each_layers_q_and_k(pipes, name):
    pipe = pipes[name]
    layers = find_cross_attention_layers(pipe.unet)
    recorders = [_ProbabilityRecorder() for _ in layers]
    originals = [m.processor for _, m in layers]
    try:
        for (_, m), rec in zip(layers, recorders):
            m.set_processor(rec)
        _run(pipe, output_type="latent")
    finally:
        for (_, m), p in zip(layers, originals):
            m.set_processor(p)
    trace = generate(pipe, PROMPT, seeds=SEED, steps=STEPS, height=SIZE, width=SIZE, stats={"attn"}).traces[0]
    assert len(trace.stats["attn"]) == len(layers)
    for (info, _), rec, ours in zip(layers, recorders, trace.stats["attn"]):
        h, w = info.grid(trace.latent_hw)
        assert ours.shape == rec.total.shape == (info.heads, h * w, 77)
        torch.testing.assert_close(ours.double(), rec.total, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_images_are_bit_identical_with_and_without_tracing(pipes, name):
    pipe = pipes[name]
    plain = _run(pipe, output_type="latent")
    with Tracer(pipe.unet, {"attn", "norm", "norm_sq", "attn_steps", "norm_steps"}, n_cond=1, cfg=True):
        traced = _run(pipe, output_type="latent")
    assert torch.equal(plain, traced)
    image = generate(pipe, PROMPT, seeds=SEED, steps=STEPS, height=SIZE, width=SIZE, stats={"attn", "norm"}).images[0]
    assert np.array_equal(np.asarray(image), np.asarray(_run(pipe)[0]))


def test_sdxl_layers_count_every_transformer_block(pipes):
    layers = [info for info, _ in find_cross_attention_layers(pipes["tiny-sdxl"].unet)]
    # tiny-sdxl: down 1x2 (2 heads) + 1x3 (3 heads), mid 3, up 2x3 + 2x2 (transformer_layers_per_block [1, 2, 3])
    assert [sum(i.place == p for i in layers) for p in ("down", "mid", "up")] == [5, 3, 10]
    assert sorted({(i.place, i.downsample, i.heads) for i in layers}) == [
        ("down", 2, 2), ("down", 4, 3), ("mid", 4, 3), ("up", 2, 2), ("up", 4, 3)]
    full = unet_head_names(reference_configs("sdxl")["unet"])
    assert len(full) == 1300 and len({n.rsplit(", head", 1)[0] for n in full}) == 70


def test_sdxl_positions_come_from_the_first_tokenizer_and_hold_for_the_second(pipes):
    pipe = pipes["tiny-sdxl"]
    assert pipe.tokenizer_2.pad_token_id == 0 != pipe.tokenizer.pad_token_id  # OpenCLIP pads with "!"
    trace = generate(pipe, PROMPT, seeds=SEED, steps=1, height=64, width=64).traces[0]
    ids2 = pipe.tokenizer_2(PROMPT, padding="max_length", max_length=77).input_ids
    assert list(trace.tokens.ids) == ids2[: trace.tokens.n_tokens]
    assert trace.tokens.positions("bird") == [3, 10] and trace.tokens.positions("table") == [6]

    class Other:  # a second tokenizer with another vocabulary
        def __call__(self, text, **kw):
            return {"input_ids": [49406, 1, 2, 49407]}

    with pytest.raises(ValueError, match="second tokenizer splits"):
        check_same_positions(Other(), trace.tokens)


def _hrv_for(name: str, trace) -> HeadRelevance:
    """The fixture's own HRVs (hrv: model), or a ramp over tiny-sd's heads (it ships none)."""
    source = hrv_for_model(name, trace.head_names())
    if source is not None:
        return HeadRelevance.load(source)
    ramp = tuple(float(i % 5) for i in range(len(trace.head_names())))
    return HeadRelevance(model="ramp", heads=tuple(trace.head_names()), vectors={"Animals": ramp},
                         words={"Animals": ("bird",)})


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_method_attributes_a_word_on_every_family(pipes, name):
    from evalkit.methods import get_method_class

    # the built-ins only: other tests register deliberately broken methods in the same process
    builtins = [m for m in available_methods() if get_method_class(m).__module__.startswith("evalkit.")
                and "unet" in get_method_class(m).backbones]  # concept-attention: MM-DiT only (test_mmdit.py)
    stats = set().union(*(create_method(m, **({"hrv": "sd14"} if m == "hrv-selective" else {})).needs
                          for m in builtins))
    trace = generate(pipes[name], PROMPT, seeds=SEED, steps=STEPS, height=SIZE, width=SIZE, stats=stats).traces[0]
    hrv = _hrv_for(name, trace)
    for method in builtins:
        kw = {"hrv": hrv, "concept": next(iter(hrv.vectors)), "k": 5} if method == "hrv-selective" else {}
        maps = create_method(method, **kw).attribute(trace, ["bird", "table"]).maps
        for word in ("bird", "table"):
            assert maps[word].shape == trace.latent_hw, (method, word)
            assert torch.isfinite(maps[word]).all() and maps[word].abs().sum() > 0, (method, word)


def test_every_intervention_runs_on_sdxl(pipes):
    from evalkit.analysis import head_sensitivity
    from evalkit.interventions import (
        ConceptRescaling,
        HeadAblation,
        HeadReweighting,
        TokenRemoval,
        ValueSteering,
        token_removal_sweep,
    )

    pipe = pipes["tiny-sdxl"]
    kw = dict(seeds=SEED, steps=STEPS, height=SIZE, width=SIZE, stats={"attn", "norm"})
    base = generate(pipe, PROMPT, **kw)
    names = base.traces[0].head_names()
    heads = HeadAblation.random(names, 6, seed=0)
    hrv = HeadRelevance.load("tiny-sdxl")
    interventions = [TokenRemoval("table"), HeadAblation(heads), HeadReweighting(heads, factor=-2.0),
                     ValueSteering(["bird"], heads, alpha=3.0, steps=1),
                     ConceptRescaling("bird", hrv, desired="Shapes", undesired="Colors")]
    for iv in interventions:
        out = generate(pipe, PROMPT, interventions=[iv], **kw)
        assert all(torch.isfinite(t).all() for t in out.traces[0].stats["attn"]), iv.kind
        assert not np.array_equal(np.asarray(out.images[0]), np.asarray(base.images[0])), iv.kind
    sweep = token_removal_sweep(pipe, PROMPT, seed=SEED, words=["table"], steps=STEPS, height=SIZE, width=SIZE,
                                stats=["norm"])
    scores = head_sensitivity(sweep.traces[""], sweep.traces["table"], "table")
    assert len(scores.top(3)) == 3 and set(n for n, _ in scores.top(3)) <= set(names)


def test_hrv_model_picks_the_vectors_whose_heads_match_the_unet(bench, tmp_path):
    from evalkit.protocols import model_hrv

    sdxl = bench.write_config_folder("sdxl", tmp_path / "sdxl")  # configs only: heads from the meta device
    heads = model_head_names(str(sdxl))
    assert heads == list(HeadRelevance.load("sdxl").heads)  # the published names, in the published order
    assert model_family(str(sdxl)).name == "sdxl"
    assert hrv_for_model(str(sdxl), heads) == model_hrv(str(sdxl)) == "sdxl"
    sd1 = bench.write_config_folder("sd1", tmp_path / "sd1")
    assert model_hrv(str(sd1)) == "sd14"
    with pytest.raises(ValueError, match=r"no head relevance vectors .*\(195 attn2 heads\)"):
        model_hrv(str(bench.write_config_folder("sd2", tmp_path / "sd2")))
    assert model_hrv("tiny-sdxl") == "tiny-sdxl" and model_hrv("tiny-sd2") == "tiny-sd2"  # their own hrv.json
    assert hrv_for_model("stabilityai/stable-diffusion-xl-base-1.0", None) == "sdxl"  # not cached: by its name


def test_a_pipeline_class_evalkit_does_not_trace_is_one_clear_error(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    with pytest.raises(ModelLoadError, match="'PixArtAlphaPipeline' is not supported: evalkit traces StableDiffusion"):
        load(str(tmp_path))


def test_hrv_file_of_another_family_is_exit_2_before_generating(tmp_path, capsys):
    out = tmp_path / "attr"
    args = ["attribute", "--model", "tiny-sdxl", "--prompt", "a red bird", "--steps", "1", "--methods",
            "hrv-selective", "--param", "hrv-selective.hrv=sd14", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "does not match model 'tiny-sdxl'" in err and "\n" not in err and not out.exists()
    suite = tmp_path / "wrong-hrv.yaml"
    suite.write_text("include: task-a.yaml\nname: wrong-hrv\nmodel: tiny-sdxl\nmethods:\n"
                     "  - {name: hrv-selective, params: {hrv: sdxl, concept: Animals}}\nexpect: []\n")
    run = ["run", str(suite), "--limit", "1", "--no-mlflow", "--cache-dir", str(tmp_path / "c"),
           "--reports-dir", str(tmp_path / "r")]
    assert main(run) == 2
    err = capsys.readouterr().err.strip()
    assert "(stabilityai/stable-diffusion-xl-base-1.0, 1300 heads) does not match model 'tiny-sdxl'" in err
    assert "\n" not in err and not (tmp_path / "c").exists()
    suite.write_text(suite.read_text().replace("model: tiny-sdxl", "model: tiny-sd").replace("hrv: sdxl", "hrv: model"))
    assert main(run) == 2
    assert "no head relevance vectors are known for model 'tiny-sd'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_full_geometry_random_weights_load_trace_and_attribute(bench, family):
    """SD 1.5, SD 2.1 and SDXL base at full size (bfloat16, 128 px, 2 steps), saved and loaded back through
    evalkit's loader, as ``nox -s bench`` runs them (SDXL: ~8 GB of memory, 2-3 minutes on 2 cores)."""
    result = bench.run_family(family, size=128, steps=2, dtype="bfloat16", save=True)
    assert bench.problems(result) == []


def test_hrv_model_without_the_methods_concept_is_skipped_with_a_notice(tmp_path, capsys):
    """`hrv: model` resolves to vectors that fit the model's heads; when they were not built for the method's
    concept (tiny-sdxl's own vectors know Shapes, not Animals) the method is skipped with its claims and a
    notice, as when no vectors fit; asked for by --methods it is bad input (exit 2) before generating."""
    from evalkit.suites import load_suite, resolve_model_hrv

    suite = tmp_path / "concept.yaml"
    suite.write_text("include: task-a.yaml\nname: concept\nmodel: tiny-sdxl\nmethods:\n  - {name: daam}\n"
                     "  - {name: hrv-selective, id: hrv-animals, params: {hrv: model, concept: Animals, k: 0.23}}\n"
                     "  - {name: hrv-selective, id: hrv-shapes, params: {hrv: model, concept: Shapes, k: 0.23}}\n"
                     "expect:\n  - hrv-animals.miou-inf_tau0.4 >= daam.miou-inf_tau0.4\n"
                     "  - hrv-shapes.miou-inf_tau0.4 >= daam.miou-inf_tau0.4\n")
    spec = resolve_model_hrv(load_suite(str(suite)))
    assert [m.label for m in spec.methods] == ["daam", "hrv-shapes"]
    assert spec.methods[1].params["hrv"] == "tiny-sdxl"
    assert spec.expect == ["hrv-shapes.miou-inf_tau0.4 >= daam.miou-inf_tau0.4"]
    out = capsys.readouterr().out
    assert "hrv-animals skipped: the model's head relevance vectors (tiny-sdxl) have no concept 'Animals'" in out
    run = ["run", str(suite), "--methods", "hrv-animals", "--limit", "1", "--no-mlflow", "--cache-dir",
           str(tmp_path / "c"), "--reports-dir", str(tmp_path / "r")]
    assert main(run) == 2
    assert "have no concept 'Animals' (concepts: Shapes" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
