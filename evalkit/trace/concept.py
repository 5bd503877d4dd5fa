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
   so the image is unchanged); this is the block's own forward with the concepts in the place of the prompt,
   which is how it is run. Flux's concept tokens carry text position ids 0 (no rotation).
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

from .joint import t5_length

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
    transformer and its joint/double blocks, and consulted by their :class:`~evalkit.trace.joint.
    JointTracingProcessor` (``image_output``/``concept_output``)."""

    def __init__(self, transformer: nn.Module, embeddings: torch.Tensor, rows: slice,
                 blocks: Sequence[tuple[int, nn.Module]], pooled: torch.Tensor | None = None) -> None:
        self.transformer = transformer
        self.embeddings = embeddings  # (C, D_text)
        self.pooled = pooled  # (D_pooled,): the concepts' own adaLN conditioning; None: the image's temb
        self.temb: torch.Tensor | None = None
        self.rows = rows
        self.blocks = list(blocks)  # (layer index, block) of the joint / double blocks
        self.state: torch.Tensor | None = None  # (B, C, D) the concept residual stream
        self.inner = False  # True while a block runs on the concepts (its processor records nothing)
        self.o_x: torch.Tensor | None = None
        self.o_c: torch.Tensor | None = None
        self.sums: dict[int, torch.Tensor] = {}  # layer index -> (1, N, C)
        #: optional ``key_observer(layer index, attn, q_img (B, H, N, d), concept keys (B, H, C, d))``, called in
        #: each block's concept pass: HRV construction on MM-DiT votes with it (evalkit.analysis.hrv_build)
        self.key_observer = None
        self.q_img: torch.Tensor | None = None
        self.current: int | None = None
        self._block_inputs: dict = {}
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
        if self.inner:
            return
        names = ("hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb")
        got = dict(zip(names, args))
        got.update({k: v for k, v in kwargs.items() if k in names})
        self._block_inputs = got

    def _make_after(self, index: int):
        def after(module, args, output) -> None:
            if self.inner or self.state is None:
                return
            self._run_concepts(index, module)
        return after

    @torch.no_grad()
    def _run_concepts(self, index: int, block: nn.Module) -> None:
        """The block's own forward with the concepts as its text stream (one-directional by construction: the
        real image tokens were computed without them), then the layer's map from the two attention outputs."""
        inputs = self._block_inputs
        rows = self.rows
        temb = self.temb if self.temb is not None else inputs["temb"][rows]
        kwargs = {"hidden_states": inputs["hidden_states"][rows], "encoder_hidden_states": self.state, "temb": temb}
        rotary = inputs.get("image_rotary_emb")
        if rotary is not None:  # Flux: text positions carry id 0 (no rotation); the image keeps its own
            t = int(inputs["encoder_hidden_states"].shape[1])
            c = self.state.shape[1]
            kwargs["image_rotary_emb"] = tuple(torch.cat([e[:1].expand(c, -1), e[t:]]) for e in rotary)
        self.inner = True
        self.current = index
        try:
            out = block(**kwargs)
        finally:
            self.inner = False
            self.q_img = None
        new_state = out[0]
        if self.o_x is not None and self.o_c is not None:
            scores = torch.matmul(self.o_x.float(), self.o_c.float().transpose(-1, -2))  # (B, N, C)
            phi = scores.softmax(dim=-1)
            self.sums[index] = phi if index not in self.sums else self.sums[index] + phi
        self.o_x = self.o_c = None
        if new_state is not None:  # SD3's last block updates no text stream
            self.state = new_state
