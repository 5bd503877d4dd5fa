"""Every method against an independent computation written here (diffusers' own attention scores,
explicit per-head loops), plus planted-signal recovery on a hand-made trace."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from evalkit.methods import HeadRelevance, create_method
from evalkit.trace import LayerInfo, Trace, find_cross_attention_layers, tokenize_prompt
from evalkit.trace.tracer import generate

SIZE, STEPS, SEED = 256, 2, 4
PROMPT = "a red bird and a bird above a hippopotamus"
WORDS = ["bird", "hippopotamus", "red"]


class _Recorder:
    """Test-only processor: output from diffusers' AttnProcessor2_0, probabilities from diffusers'
    ``get_attention_scores`` on head-major batches, values kept for the norm check."""

    def __init__(self, name, store):
        self.name, self.store, self.inner = name, store, AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(q, k, None)  # (B*H, Q, K), batch-major
        heads = attn.heads
        cond = slice(probs.shape[0] - heads, probs.shape[0])  # CFG batch is [uncond; cond]
        self.store.setdefault(self.name, []).append((probs[cond].detach().clone(), v[cond].detach().clone(), attn))
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


@pytest.fixture(scope="module")
def recorded(tiny_pipe):
    """One generation traced by evalkit and, independently, by the test recorder."""
    stats = {"attn", "norm", "norm_sq"}
    store: dict = {}
    modules = find_cross_attention_layers(tiny_pipe.unet)
    originals = [m.processor for _, m in modules]
    try:
        for info, m in modules:
            m.set_processor(_Recorder(info.name, store))
        tiny_pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE,
                  generator=torch.Generator().manual_seed(SEED), output_type="latent")
    finally:
        for (_, m), p in zip(modules, originals):
            m.set_processor(p)
    ours = generate(tiny_pipe, PROMPT, seeds=SEED, steps=STEPS, guidance=7.5, height=SIZE, width=SIZE, stats=stats)
    return ours.traces[0], store


def _reference_maps(trace, store, positions, *, select, signal, mode, clamp, time):
    latent = trace.latent_hw
    maps = []
    for name, calls in store.items():
        q_len = calls[0][0].shape[1]
        side = int(round(q_len**0.5))
        if not select(name, side, latent[0]):
            continue
        heads = calls[0][0].shape[0]
        for h in range(heads):
            acc = torch.zeros(q_len, len(positions), dtype=torch.float64)
            for probs, values, attn in calls:
                a = probs[h][:, positions].double()
                if signal != "attn":
                    d = values.shape[-1]
                    w_h = attn.to_out[0].weight[:, h * d:(h + 1) * d].double()
                    n = torch.linalg.vector_norm(values[h][positions].double() @ w_h.T, dim=-1)
                    a = a * n if signal == "norm" else (a * n) ** 2
                acc += a
            if time == "mean":
                acc /= len(calls)
            img = acc.T.reshape(len(positions), 1, side, side).float()
            img = F.interpolate(img, size=latent, mode=mode)
            maps.append(img.clamp(min=0) if clamp else img)
    return torch.stack(maps).mean(0)[:, 0]


def _word_maps(trace, store, **kw):
    out = {}
    for w in WORDS:
        pos = trace.tokens.positions(w)
        out[w] = _reference_maps(trace, store, pos, **kw).mean(0)
    return out


def _daam_select(name, side, latent_side):
    return not name.startswith("mid_block") and side != latent_side // 8


def _all_layers(name, side, latent_side):
    return True


@pytest.mark.parametrize(
    "method,kw",
    [
        ("daam", dict(select=_daam_select, signal="attn", mode="bicubic", clamp=True, time="sum")),
        ("raw-attn", dict(select=_all_layers, signal="attn", mode="bilinear", clamp=False, time="mean")),
        ("norm", dict(select=_all_layers, signal="norm", mode="bicubic", clamp=True, time="mean")),
        ("norm-sq", dict(select=_all_layers, signal="norm_sq", mode="bicubic", clamp=True, time="mean")),
    ],
)
def test_method_matches_independent_computation(recorded, method, kw):
    trace, store = recorded
    att = create_method(method).attribute(trace, WORDS)
    ref = _word_maps(trace, store, **kw)
    for w in WORDS:
        assert att.maps[w].shape == trace.latent_hw
        torch.testing.assert_close(att.maps[w], ref[w], rtol=1e-4, atol=1e-6 * float(ref[w].abs().max()))


def test_repeated_word_is_mean_over_occurrences(recorded):
    trace, _ = recorded
    att = create_method("daam").attribute(trace, ["bird"])
    first = create_method("daam").token_maps(trace, [trace.tokens.positions("bird", occurrence=0)[0]])[0]
    second = create_method("daam").token_maps(trace, [trace.tokens.positions("bird", occurrence=1)[0]])[0]
    torch.testing.assert_close(att.maps["bird"], (first + second) / 2)


def test_hrv_selective_matches_independent_computation(recorded, tmp_path):
    trace, store = recorded
    names = trace.head_names()
    gen = torch.Generator().manual_seed(0)
    vec = torch.rand(len(names), generator=gen)
    path = tmp_path / "hrv.json"
    path.write_text(json.dumps({"model": "tiny-sd", "heads": names,
                                "concepts": [{"concept": "Animals", "words": ["dog"], "hrv": vec.tolist()}]}))
    k = 7
    top = set(torch.argsort(vec, descending=True)[:k].tolist())
    # independent: walk heads in model order, keep the chosen ones, DAAM-style resize over all layers
    maps, j = [], 0
    pos = trace.tokens.positions("bird")
    for calls in store.values():
        heads, q_len = calls[0][0].shape[:2]
        side = int(round(q_len**0.5))
        for h in range(heads):
            if j in top:
                acc = sum(p[h][:, pos] for p, _, _ in calls).T.reshape(len(pos), 1, side, side)
                maps.append(F.interpolate(acc, size=trace.latent_hw, mode="bicubic").clamp(min=0))
            j += 1
    ref = torch.stack(maps).mean(0)[:, 0].mean(0)
    att = create_method("hrv-selective", hrv=str(path), concept="Animals", k=k).attribute(trace, ["bird"])
    torch.testing.assert_close(att.maps["bird"], ref, rtol=1e-4, atol=1e-7)


def test_hrv_head_mismatch_and_unknown_concept_are_clear_errors(recorded):
    trace, _ = recorded
    method = create_method("hrv-selective")  # the shipped SD v1.4 vectors: 128 heads
    with pytest.raises(ValueError, match="does not match the traced model"):
        method.attribute(trace, ["bird"])
    with pytest.raises(KeyError, match="did you mean 'Animals'"):
        create_method("hrv-selective", concept="Animal")


def test_shipped_sd14_hrv_loads():
    hrv = HeadRelevance.load("sd14")
    assert len(hrv.heads) == 128 and len(hrv.vectors) == 34
    assert abs(sum(hrv.vectors["Animals"]) - 128) < 1e-2
    top = hrv.select("Animals", 30)
    least = hrv.select("Animals", 30, order="least")
    assert len(set(top)) == 30 and not set(top) & set(least)
    assert create_method("hrv-selective", k=0.25).k == 32  # a fraction of SD's 128 heads
    assert create_method("hrv-selective", k=40).heads == hrv.select("Animals", 40)


# --- planted signal -------------------------------------------------------------------------------

def _planted_trace(tokenizer, swap_heads: set[tuple[int, int]] = frozenset()) -> Trace:
    """A hand-made trace of "a circle and a square" on a 16x16 latent: "circle" lives in the
    top-left quadrant, "square" in the bottom-right, at every layer and resolution; heads in
    ``swap_heads`` carry the two signals the wrong way round."""
    tokens = tokenize_prompt(tokenizer, "a circle and a square")
    circle, square = tokens.positions("circle")[0], tokens.positions("square")[0]
    layers = [
        LayerInfo("down_blocks.0.attentions.0.transformer_blocks.0.attn2", "down", 0, 0, 2, 1),
        LayerInfo("down_blocks.1.attentions.0.transformer_blocks.0.attn2", "down", 1, 1, 3, 2),
        LayerInfo("mid_block.attentions.0.transformer_blocks.0.attn2", "mid", 0, 0, 2, 8),
        LayerInfo("up_blocks.0.attentions.0.transformer_blocks.0.attn2", "up", 0, 0, 2, 8),
        LayerInfo("up_blocks.1.attentions.0.transformer_blocks.0.attn2", "up", 1, 1, 4, 4),
    ]
    stats: dict[str, list[torch.Tensor]] = {"attn": [], "norm": [], "norm_sq": []}
    for li, layer in enumerate(layers):
        h, w = layer.grid((16, 16))
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        tl = ((yy < h / 2) & (xx < w / 2)).flatten().float()
        br = ((yy >= h / 2) & (xx >= w / 2)).flatten().float()
        a = torch.full((layer.heads, h * w, 77), 0.01)
        for head in range(layer.heads):
            c, s = (br, tl) if (li, head) in swap_heads else (tl, br)
            a[head, :, circle] += 0.5 * c
            a[head, :, square] += 0.5 * s
        stats["attn"].append(a * 3)  # three steps
        stats["norm"].append(a * 3 * 2.0)
        stats["norm_sq"].append(a.square() * 3 * 4.0)
    return Trace("a circle and a square", tokens, layers, stats, n_steps=3, latent_hw=(16, 16), image_hw=(128, 128))


def _iou(mask, region):
    return float((mask & region).sum() / (mask | region).sum())


@pytest.mark.parametrize("method", ["daam", "raw-attn", "norm", "norm-sq"])
def test_planted_regions_are_recovered(tiny_pipe, method):
    trace = _planted_trace(tiny_pipe.tokenizer)
    masks = create_method(method).attribute(trace, ["circle", "square"]).binarize(0.5)
    yy, xx = torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij")
    assert _iou(masks["circle"], (yy < 64) & (xx < 64)) > 0.8
    assert _iou(masks["square"], (yy >= 64) & (xx >= 64)) > 0.8


def test_hrv_selective_recovers_with_relevant_heads_only(tiny_pipe, tmp_path):
    swapped = {(0, 1), (1, 0), (1, 2), (2, 0), (3, 1), (4, 0), (4, 3)}
    trace = _planted_trace(tiny_pipe.tokenizer, swapped)
    names = trace.head_names()
    pairs = [(li, h) for li, lay in enumerate(trace.layers) for h in range(lay.heads)]
    vec = [0.1 if p in swapped else 1.0 + i / 100 for i, p in enumerate(pairs)]
    path = tmp_path / "hrv.json"
    path.write_text(json.dumps({"model": "planted", "heads": names,
                                "concepts": [{"concept": "Shapes", "words": [], "hrv": vec}]}))
    n_good = len(pairs) - len(swapped)
    yy, xx = torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij")
    tl = (yy < 64) & (xx < 64)
    most = create_method("hrv-selective", hrv=str(path), concept="Shapes", k=n_good).attribute(trace, ["circle"])
    least = create_method("hrv-selective", hrv=str(path), concept="Shapes", k=len(swapped), order="least")
    assert _iou(most.binarize(0.5)["circle"], tl) > 0.8
    assert _iou(least.attribute(trace, ["circle"]).binarize(0.5)["circle"], tl) < 0.1


def test_same_seed_same_maps(tiny_pipe):
    a = generate(tiny_pipe, "a cat", seeds=9, steps=1, height=SIZE, width=SIZE, stats={"attn", "norm"}).traces[0]
    b = generate(tiny_pipe, "a cat", seeds=9, steps=1, height=SIZE, width=SIZE, stats={"attn", "norm"}).traces[0]
    for m in ("daam", "raw-attn", "norm"):
        assert torch.equal(create_method(m).attribute(a, ["cat"]).maps["cat"],
                           create_method(m).attribute(b, ["cat"]).maps["cat"])


def test_attribution_result_object(recorded, tmp_path):
    trace, _ = recorded
    att = create_method("daam").attribute(trace, ["bird", "red"])
    assert att.prompt == PROMPT and att.tokens[0] == "<|startoftext|>" and att.words == ["bird", "red"]
    img = att.to_image()
    assert img["bird"].shape == (SIZE, SIZE)
    ref = F.interpolate(att.maps["bird"][None, None], size=(SIZE, SIZE), mode="bicubic")[0, 0]
    torch.testing.assert_close(img["bird"], ref)
    m = img["bird"]
    expected = ((m - m.min()) / (m.max() - m.min() + 1e-8)) > 0.4
    assert torch.equal(att.binarize(0.4)["bird"], expected)
    att.save_npz(tmp_path / "daam.npz")
    import numpy as np

    z = np.load(tmp_path / "daam.npz")
    assert z["bird"].dtype == np.float32 and z["bird"].shape == (SIZE, SIZE)
    with pytest.raises(ValueError, match="tau"):
        att.binarize(1.5)


def test_method_without_needed_statistic_is_a_clear_error(recorded):
    trace, _ = recorded
    only_attn = Trace(trace.prompt, trace.tokens, trace.layers, {"attn": trace.stats["attn"]}, trace.n_steps,
                      trace.latent_hw, trace.image_hw)
    with pytest.raises(ValueError, match="needs trace statistics \\['norm'\\]"):
        create_method("norm").attribute(only_attn, ["bird"])
