"""ConceptAttention's concept stream (Helbling et al., ICML 2025, arXiv 2502.04320) for SD3 and Flux.

Concept tokens (one per concept word) travel through the joint-attention blocks beside the image and prompt
tokens without influencing them:

1. Each concept is encoded on its own by the pipeline's T5 and its first token kept, then mapped into the
   transformer's width by its ``context_embedder``, as prompt tokens are. Their adaLN modulation comes from
   the timestep and the pooled CLIP embedding of the concepts joined by spaces (the transformer's own
   ``time_text_embed``), as in the authors' implementation.
2. In every joint (SD3) / double-stream (Flux) block, the concepts go through the block's *text-stream*
   weights (``norm1_context``, ``add_q/k/v_proj``, ``to_add_out``, ``ff_context``). Their queries attend over
   the image keys and the concept keys only (one-directional: no image or prompt token attends to a concept,
   so the image is unchanged): the text path of the block's forward with the concepts in the place of the
   prompt, computed alone (the image path is the real pass's). Flux's concepts carry position id 0 (no rotation).
3. The maps live in the attention *output* space: ``o_x`` (N x D), the image tokens' attention output through
   the image output projection (``to_out[0]``), against ``o_c`` (C x D), the concepts' through the text output
   projection (``to_add_out``; SD3's last block has none, so there the raw output): per layer and step,
   ``phi = softmax over concepts (o_x o_c^T)``, the paper's definition. (The authors' released code applies
   its softmax over the last axis of a (concepts, patches) array, i.e. over patches; evalkit keeps the paper's
   reading.) The ``concept`` statistic is ``sum over steps of phi`` per layer, ``(1, N, C)``; Flux's
   single-stream blocks carry no concepts and hold an empty ``(0, N, C)``.

The softmax runs over the concept list, so the maps of a word depend on its competitors: by default every
word of the prompt plus ``"background"``, recorded in the trace's ``settings["concepts"]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .joint import apply_rope, maybe_norm, split_heads, t5_length

#: The concept added to the prompt's words by default, as a competitor for background pixels.
DEFAULT_EXTRA = ("background",)


@torch.no_grad()
def concept_embeddings(pipe, concepts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C, D_text)`` T5 embeddings of the concepts, each encoded on its own with its first token kept (SD3's
    ``text_encoder_3``, Flux's ``text_encoder_2``), and ``(D_pooled,)``, the pipeline's pooled CLIP embedding of
    the concepts joined by spaces (what the concepts' adaLN modulation is computed from)."""
    sd3 = type(pipe.transformer).__name__ == "SD3Transformer2DModel"
    tokenizer = pipe.tokenizer_3 if sd3 else pipe.tokenizer_2
    encoder = pipe.text_encoder_3 if sd3 else pipe.text_encoder_2
    if tokenizer is None or encoder is None:
        raise ValueError("ConceptAttention encodes concepts with the pipeline's T5 encoder, which this pipeline "
                         "does not have")
    firsts = []
    for concept in concepts:
        ids = tokenizer(concept, add_special_tokens=True, return_tensors="pt")["input_ids"].to(encoder.device)
        firsts.append(encoder(ids)[0][0, 0])
    joined = " ".join(concepts)
    length = t5_length(pipe)  # the pipeline's own T5 length, so nothing is reported as truncated
    if sd3:
        pooled = pipe.encode_prompt(prompt=joined, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
                                    max_sequence_length=length)[2]
    else:
        pooled = pipe.encode_prompt(prompt=joined, prompt_2=None, max_sequence_length=length)[1]
    return torch.stack(firsts), pooled[0]


class ConceptStream:
    """State of the concept tokens during one traced generation: installed by the tracer as hooks on the
    transformer (a fresh stream per call) and on its joint / double-stream blocks (the concepts' pass after
    each block), fed by their :class:`~evalkit.trace.joint.JointTracingProcessor` with what the real pass
    computed: the image tokens' attention input and projected output (:meth:`image_pass`)."""

    def __init__(self, transformer: nn.Module, embeddings: torch.Tensor, rows: slice,
                 blocks: Sequence[tuple[int, nn.Module]], pooled: torch.Tensor | None = None) -> None:
        self.transformer = transformer
        self.embeddings = embeddings  # (C, D_text)
        self.pooled = pooled  # (D_pooled,): the concepts' own adaLN conditioning; None: the image's temb
        self.temb: torch.Tensor | None = None
        self.rows = rows
        self.blocks = list(blocks)  # (layer index, block) of the joint / double blocks
        self.state: torch.Tensor | None = None  # (B, C, D) the concept residual stream
        self.sums: dict[int, torch.Tensor] = {}  # layer index -> (B, N, C)
        #: optional ``key_observer(layer index, attn, q_img (B, H, N, d), concept keys (B, H, C, d))``, called in
        #: each block's concept pass: HRV construction on MM-DiT votes with it (evalkit.analysis.hrv_build)
        self.key_observer = None
        self._image: dict = {}  # the real pass of the current block (image_pass)
        self._temb: torch.Tensor | None = None
        self._hooks: list = []

    def install(self) -> None:
        """Hook the transformer (start a fresh stream each call) and the blocks (run the concepts after each)."""
        self._hooks.append(self.transformer.register_forward_pre_hook(self._start, with_kwargs=True))
        for index, block in self.blocks:
            self._hooks.append(block.register_forward_pre_hook(self._remember, with_kwargs=True))
            self._hooks.append(block.register_forward_hook(self._make_after(index)))

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _start(self, module, args, kwargs) -> None:
        ref = self.transformer.context_embedder.weight
        emb = self.transformer.context_embedder(self.embeddings.to(ref.device, ref.dtype))
        n = self._n_rows()
        self.state = emb[None].expand(n, -1, -1).clone() if n else None
        self.temb = None if self.pooled is None or not n else self._concept_temb(kwargs, n)

    def _concept_temb(self, kwargs: dict, n: int) -> torch.Tensor:
        """The transformer's timestep embedding with the concepts' pooled embedding, for the conditional rows,
        computed as the transformer's own forward computes its ``temb`` (Flux: timestep and guidance x 1000)."""
        t = self.transformer
        ref = t.context_embedder.weight
        timestep = kwargs["timestep"][self.rows]
        pooled = self.pooled.to(ref.device, ref.dtype)[None].expand(n, -1)
        if type(t).__name__ == "FluxTransformer2DModel":
            timestep = timestep.to(ref.dtype) * 1000
            guidance = kwargs.get("guidance")
            if guidance is not None:
                return t.time_text_embed(timestep, guidance[self.rows].to(ref.dtype) * 1000, pooled)
            return t.time_text_embed(timestep, pooled)
        return t.time_text_embed(timestep, pooled)

    def _n_rows(self) -> int:
        start, stop = self.rows.start or 0, self.rows.stop
        return int(stop - start)

    def _remember(self, module, args, kwargs) -> None:
        """The block's ``temb`` (the concepts' adaLN conditioning when they have no pooled embedding of their own)."""
        temb = kwargs.get("temb", args[2] if len(args) > 2 else None)
        self._temb = None if temb is None else temb[self.rows]
        self._image = {}

    def image_pass(self, x_norm: torch.Tensor, o_x: torch.Tensor, rotary, text_len: int,
                   q_img: torch.Tensor | None) -> None:
        """Called by the layer's processor in the real pass: the normalized image tokens the attention saw
        (conditional rows), their attention output through ``to_out`` (``o_x``), Flux's rotary embedding and the
        prompt's text length (to take the image part of it), and the image queries (for ``key_observer``)."""
        self._image = {"x_norm": x_norm, "o_x": o_x, "rotary": rotary, "t": text_len, "q_img": q_img}

    def _make_after(self, index: int):
        def after(module, args, output) -> None:
            if self.state is not None and self._image:
                self._run_concepts(index, module)
        return after

    @torch.no_grad()
    def _run_concepts(self, index: int, block: nn.Module) -> None:
        """The concepts' pass through one block with its text-stream weights: adaLN (``norm1_context``), queries
        over the image keys and the concept keys (one-directional: the real pass never saw the concepts), the
        text output projection, the gated residual and ``ff_context``; then the layer's map."""
        attn, seen = block.attn, self._image
        self._image = {}
        temb = self.temb if self.temb is not None else self._temb
        c = self.state
        pre_only = bool(getattr(block, "context_pre_only", False))
        if pre_only:  # SD3's last block: the text stream ends here
            c_norm = block.norm1_context(c, temb)
        else:
            c_norm, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(c, emb=temb)
        heads, x_norm = attn.heads, seen["x_norm"]
        k_img = maybe_norm(attn.norm_k, split_heads(attn.to_k(x_norm), heads))
        v_img = split_heads(attn.to_v(x_norm), heads)
        if seen["rotary"] is not None:  # Flux: the image keys' own rotation; concepts carry position id 0
            cos, sin = seen["rotary"]
            k_img = apply_rope(k_img, (cos[seen["t"]:], sin[seen["t"]:])).to(v_img.dtype)
        q_c = maybe_norm(attn.norm_added_q, split_heads(attn.add_q_proj(c_norm), heads))
        k_c = maybe_norm(attn.norm_added_k, split_heads(attn.add_k_proj(c_norm), heads))
        v_c = split_heads(attn.add_v_proj(c_norm), heads)
        keys, values = torch.cat([k_img, k_c], dim=2).float(), torch.cat([v_img, v_c], dim=2).float()
        scale = float(getattr(attn, "scale", q_c.shape[-1] ** -0.5))
        out = (torch.matmul(q_c.float(), keys.transpose(-1, -2)) * scale).softmax(-1) @ values  # (B, H, C, d)
        out = out.transpose(1, 2).flatten(2)
        o_c = out if pre_only else torch.nn.functional.linear(
            out, attn.to_add_out.weight.float(), None if attn.to_add_out.bias is None else attn.to_add_out.bias.float())
        if self.key_observer is not None and seen["q_img"] is not None:
            self.key_observer(index, attn, seen["q_img"], k_c)
        phi = torch.matmul(seen["o_x"].float(), o_c.transpose(-1, -2)).softmax(dim=-1)  # (B, N, C)
        self.sums[index] = phi if index not in self.sums else self.sums[index] + phi
        if pre_only:
            return
        c = c + gate_msa.unsqueeze(1) * o_c.to(c.dtype)
        mlp_in = block.norm2_context(c) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        c = c + gate_mlp.unsqueeze(1) * block.ff_context(mlp_in)
        if c.dtype == torch.float16:
            c = c.clip(-65504, 65504)
        self.state = c
