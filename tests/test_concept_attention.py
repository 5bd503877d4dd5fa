"""ConceptAttention: the concept stream leaves the image bit-identical, its maps equal an independent
masked-attention implementation of the paper's formula on a hand-built SD3 block, and the method runs on both
MM-DiT built-ins through the same API (and is skipped on UNet models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.attention import JointTransformerBlock
from torch import nn

from evalkit.methods import create_method
from evalkit.models import load
from evalkit.trace import generate
from evalkit.trace.concept import ConceptStream
from evalkit.trace.joint import JointTracingProcessor

PROMPT = "a red bird on a table"


class _OneBlock(nn.Module):
    """A transformer of one joint block whose context embedder is the identity (concepts enter as given)."""

    def __init__(self, block: nn.Module, dim: int) -> None:
        super().__init__()
        self.block = block
        self.context_embedder = nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            self.context_embedder.weight.copy_(torch.eye(dim))

    def forward(self, hidden_states, encoder_hidden_states, temb):
        return self.block(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, temb=temb)


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    return x.view(x.shape[0], x.shape[1], h, -1).transpose(1, 2)


@torch.no_grad()
def test_maps_and_stream_equal_the_papers_formula_on_a_hand_built_block():
    torch.manual_seed(0)
    dim, heads = 32, 2
    block = JointTransformerBlock(dim=dim, num_attention_heads=heads, attention_head_dim=dim // heads,
                                  context_pre_only=False, qk_norm="rms_norm").eval()
    model = _OneBlock(block, dim).eval()
    x, p, c = torch.randn(1, 16, dim), torch.randn(1, 5, dim), torch.randn(3, dim)
    temb = torch.randn(1, dim)
    plain = model(x, p, temb)

    stream = ConceptStream(model, c, slice(0, 1), [(0, block)])
    stream.install()
    original = block.attn.processor
    block.attn.set_processor(JointTracingProcessor(original, "sd3", None, slice(0, 1), concepts=stream))
    traced = model(x, p, temb)
    stream.remove()
    block.attn.set_processor(original)
    assert all(torch.equal(a, b) for a, b in zip(plain, traced))  # the image (and prompt) stream is unchanged

    # independent: one masked softmax over [image, prompt, concepts]; image/prompt rows never see concepts,
    # concept rows see the image and the concepts only (the paper's one-directional concept attention)
    attn = block.attn
    x_n, *_ = block.norm1(x, emb=temb)
    p_n, *_ = block.norm1_context(p, emb=temb)
    c_n, c_gate, c_shift, c_scale, c_gate_mlp = block.norm1_context(c[None], emb=temb)
    q = torch.cat([attn.norm_q(_heads(attn.to_q(x_n), heads)), attn.norm_added_q(_heads(attn.add_q_proj(p_n), heads)),
                   attn.norm_added_q(_heads(attn.add_q_proj(c_n), heads))], dim=2)
    k = torch.cat([attn.norm_k(_heads(attn.to_k(x_n), heads)), attn.norm_added_k(_heads(attn.add_k_proj(p_n), heads)),
                   attn.norm_added_k(_heads(attn.add_k_proj(c_n), heads))], dim=2)
    v = torch.cat([_heads(attn.to_v(x_n), heads), _heads(attn.add_v_proj(p_n), heads),
                   _heads(attn.add_v_proj(c_n), heads)], dim=2)
    n, t, m = 16, 5, 3
    allowed = torch.zeros(n + t + m, n + t + m, dtype=torch.bool)
    allowed[: n + t, : n + t] = True
    allowed[n + t :, :n] = True
    allowed[n + t :, n + t :] = True
    scores = (q @ k.transpose(-1, -2)) / (dim // heads) ** 0.5
    out = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v  # (1, H, S, d)
    out = out.transpose(1, 2).flatten(2)
    o_x, o_c = out[:, :n], out[:, n + t :]
    # the output space: each stream's own output projection (image: to_out[0]; concepts: the text stream's)
    phi = (attn.to_out[0](o_x) @ attn.to_add_out(o_c).transpose(-1, -2)).softmax(-1)
    torch.testing.assert_close(stream.sums[0], phi, rtol=1e-5, atol=1e-6)

    # the concept residual stream after the block: the text stream's gates, output projection and MLP
    c1 = c[None] + c_gate[:, None] * attn.to_add_out(o_c)
    mlp_in = block.norm2_context(c1) * (1 + c_scale[:, None]) + c_shift[:, None]
    c2 = c1 + c_gate_mlp[:, None] * block.ff_context(mlp_in)
    torch.testing.assert_close(stream.state, c2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_concept_stream_keeps_images_and_maps_are_distributions_over_concepts(model):
    pipe = load(model)
    plain = generate(pipe, PROMPT, seeds=1, steps=2, guidance=4.0, stats=("attn",))
    traced = generate(pipe, PROMPT, seeds=1, steps=2, guidance=4.0, stats=("attn", "concept"),
                      concepts=["bird", "table", "sky"])
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(traced.images[0]))
    trace = traced.traces[0]
    assert trace.settings["concepts"] == ["bird", "table", "sky"]
    carrying = [s for s in trace.stats["concept"] if s.shape[0]]
    assert carrying and all(s.shape[-1] == 3 for s in trace.stats["concept"])
    for s in carrying:  # a softmax over concepts per image token and step, summed over 2 steps
        torch.testing.assert_close(s.sum(-1), torch.full_like(s.sum(-1), 2.0))
    if model == "tiny-flux":  # single-stream blocks carry no concepts
        assert [s.shape[0] for s in trace.stats["concept"]] == [1, 1, 0, 0]
    attribution = create_method("concept-attention").attribute(trace, ["bird", "table"])
    total = attribution.maps["bird"] + attribution.maps["table"]
    assert attribution.maps["bird"].shape == trace.latent_hw and bool((total <= 1 + 1e-5).all())
    with pytest.raises(ValueError, match="'dog' is not one of the traced concepts"):
        create_method("concept-attention").attribute(trace, ["dog"])
    last = create_method("concept-attention", last_layers=1).attribute(trace, ["bird"])
    assert not torch.allclose(last.maps["bird"], attribution.maps["bird"])


def test_concept_attention_needs_an_mmdit(tmp_path, monkeypatch, capsys):
    from evalkit.cli import main

    with pytest.raises(ValueError, match="needs an MM-DiT model"):
        generate(load("tiny-sd"), PROMPT, seeds=0, steps=1, stats=("concept",))
    monkeypatch.chdir(tmp_path)
    assert main(["attribute", "--model", "tiny-sd", "--prompt", PROMPT, "--methods", "concept-attention",
                 "--steps", "1", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert "concept-attention" in err and "MM-DiT" in err and "\n" not in err


def test_attribute_cli_traces_the_requested_phrases_as_concepts(tmp_path):
    """`evalkit attribute` adds the requested words, phrases included, to the concept list (competitors: the
    prompt's other words and "background"), so every requested word gets its ConceptAttention map."""
    import json

    from evalkit.cli import main

    out = tmp_path / "a"
    assert main(["attribute", "--model", "tiny-flux", "--prompt", "a red bird on a wooden table", "--words",
                 "red bird,table", "--methods", "concept-attention", "--steps", "1", "--out", str(out)]) == 0
    concepts = json.loads((out / "attribution.json").read_text())["settings"]["concepts"]
    assert concepts[:2] == ["red bird", "table"] and concepts[-1] == "background" and "wooden" in concepts
    with np.load(out / "concept-attention.npz") as maps:
        assert set(maps.files) == {"red bird", "table"} and np.isfinite(maps["red bird"]).all()
