"""Tracing the joint attention of multimodal diffusion transformers (SD3, Flux).

In an MM-DiT block image and text tokens attend jointly: one softmax over the concatenated image and text
keys. The analogue of a UNet's cross-attention map is the *image-query x text-key* block of that joint
attention. :class:`JointTracingProcessor` wraps the model's own processor, which still computes the layer's
output (so images are bit-identical with and without tracing), and computes that block on the side from the
q and k the processor itself produced (read by hooks on the layer's projection and q/k-norm modules; Flux's
rotary embedding applied as the processor applies it), so only the attention scores are computed again.

Two readings of the block (``reading``):

- ``"joint"`` (default): the joint probabilities of the text keys as the model computed them,
  ``A[h, q, k] = softmax_j(q_h . k_h,j / sqrt(d))`` over all image and text keys j, kept for text keys k.
  Rows sum to the share of attention text receives, not to 1.
- ``"text"``: the same scores renormalized over the text keys alone, ``softmax_k`` over text keys only,
  so every row sums to 1 as in a UNet's cross-attention.

Layers and the block kinds (names are the HRV-style head names ``"<place>, layer: <i>, head: <h>"``):

- SD3 (``SD3Transformer2DModel``, ``JointAttnProcessor2_0``): ``transformer_blocks.<i>.attn``, place
  ``joint``; image tokens first, text projected by ``add_k_proj``/``add_v_proj``, image output through
  ``to_out[0]``.
- Flux (``FluxTransformer2DModel``, ``FluxAttnProcessor``): double-stream ``transformer_blocks.<i>.attn``
  (place ``double``; text first, projected by ``add_*_proj``, image output through ``to_out[0]``) and
  single-stream ``single_transformer_blocks.<i>.attn`` (place ``single``; one sequence, text first, output
  through the attention columns of the block's ``proj_out``).

Per-head value norms (the ``norm`` statistics, paper 000 Eq. 6): ``||v[h, k] W_O^h||`` with ``v`` the text
token's value and ``W_O^h`` the head's columns of the projection the image output goes through (``to_out[0]``
in joint/double blocks, ``proj_out[:, :inner]`` in single blocks); the adaLN gate that follows is per channel
and the same for every token, and is left out, as a UNet's later layers are. Only the conditional rows of
classifier-free guidance are recorded; queries are processed in chunks so memory stays bounded.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from .layers import LayerInfo
from .processor import LayerRecorder
from .tokens import JointTokenizer

#: Readings of the image-query x text-key block.
READINGS = ("joint", "text")
#: Image queries per chunk when recomputing joint probabilities (bounds memory at 1024 px).
QUERY_CHUNK = 1024

_SD3_RE = re.compile(r"^transformer_blocks\.(?P<i>\d+)\.attn$")
_FLUX_RE = re.compile(r"^(?P<kind>transformer_blocks|single_transformer_blocks)\.(?P<i>\d+)\.attn$")


def is_mmdit(denoiser: nn.Module) -> bool:
    """True for the multimodal diffusion transformers evalkit traces (SD3, Flux)."""
    return type(denoiser).__name__ in ("SD3Transformer2DModel", "FluxTransformer2DModel")


def find_joint_attention_layers(transformer: nn.Module) -> list[tuple[LayerInfo, nn.Module, str, nn.Module]]:
    """All joint-attention modules of an SD3 or Flux transformer in forward order, as
    ``(info, attention module, kind, block)`` with kind ``sd3`` / ``flux-double`` / ``flux-single``."""
    cls = type(transformer).__name__
    blocks = dict(transformer.named_modules())
    out: list[tuple[LayerInfo, nn.Module, str, nn.Module]] = []
    if cls == "SD3Transformer2DModel":
        patch = int(transformer.config.patch_size)
        for name, module in transformer.named_modules():
            m = _SD3_RE.match(name)
            if m:
                info = LayerInfo(name=name, place="joint", block=int(m["i"]), index=int(m["i"]),
                                 heads=int(module.heads), downsample=patch)
                out.append((info, module, "sd3", blocks[name.rsplit(".", 1)[0]]))
    elif cls == "FluxTransformer2DModel":
        # Flux packs 2x2 latent patches into one token (patch_size 1 on the packed latent)
        down = 2 * int(transformer.config.patch_size)
        found = {"double": [], "single": []}
        for name, module in transformer.named_modules():
            m = _FLUX_RE.match(name)
            if m:
                place = "double" if m["kind"] == "transformer_blocks" else "single"
                info = LayerInfo(name=name, place=place, block=int(m["i"]), index=int(m["i"]),
                                 heads=int(module.heads), downsample=down)
                found[place].append((info, module, f"flux-{place}", blocks[name.rsplit(".", 1)[0]]))
        out = found["double"] + found["single"]
    if not out:
        raise ValueError(f"{cls} has no joint-attention modules evalkit knows: it traces SD3Transformer2DModel "
                         "(transformer_blocks.*.attn) and FluxTransformer2DModel (transformer_blocks.*.attn, "
                         "single_transformer_blocks.*.attn)")
    return out


def pipeline_tokenizer(pipe) -> object:
    """What defines a pipeline's text-key positions: ``pipe.tokenizer`` for UNet pipelines, a
    :class:`JointTokenizer` for SD3 (CLIP 77 + T5) and Flux (T5)."""
    denoiser = getattr(pipe, "transformer", None)
    if denoiser is None or not is_mmdit(denoiser):
        return pipe.tokenizer
    kind = "sd3" if type(denoiser).__name__ == "SD3Transformer2DModel" else "flux"
    return joint_tokenizer(kind, {n: getattr(pipe, n, None) for n in ("tokenizer", "tokenizer_2", "tokenizer_3")})


def joint_tokenizer(kind: str, tokenizers: dict) -> JointTokenizer:
    """The text keys of an ``sd3`` or ``flux`` pipeline from its tokenizers (pipeline attribute -> tokenizer)."""
    if kind == "sd3":
        clip = tokenizers["tokenizer"]
        t5 = tokenizers.get("tokenizer_3")
        return JointTokenizer((("clip", clip, int(clip.model_max_length)), ("t5", t5, _t5_keys(kind, t5))))
    t5 = tokenizers["tokenizer_2"]
    return JointTokenizer((("t5", t5, _t5_keys(kind, t5)),))


def model_tokenizer(model: str) -> object:
    """:func:`pipeline_tokenizer` of a model (built-in name, folder or cached hub id) from its tokenizer files
    alone: re-scoring a stored trace needs the word alignment, not the weights."""
    from ..models import load_tokenizer, load_tokenizers, model_family

    family = model_family(model).name
    if family in ("sd3", "flux"):
        return joint_tokenizer(family, load_tokenizers(model))
    return load_tokenizer(model)


def t5_length(pipe) -> int:
    """The T5 sequence length evalkit generates with (see :func:`_t5_keys`)."""
    sd3 = type(pipe.transformer).__name__ == "SD3Transformer2DModel"
    tok = getattr(pipe, "tokenizer_3", None) if sd3 else getattr(pipe, "tokenizer_2", None)
    return _t5_keys("sd3" if sd3 else "flux", tok)


def _t5_keys(kind: str, tokenizer) -> int:
    """The pipeline's default ``max_sequence_length`` (SD3 256, Flux 512), or the T5 tokenizer's
    ``model_max_length`` when that is shorter."""
    default = 256 if kind == "sd3" else 512
    limit = int(getattr(tokenizer, "model_max_length", default) or default)
    return min(default, limit)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H*d) -> (B, H, N, d)."""
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def apply_rope(x: torch.Tensor, emb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Flux's rotary embedding on (B, H, S, d) with ``emb = (cos, sin)`` of shape (S, d): adjacent channel
    pairs (x0, x1) rotate to (x0 cos - x1 sin, x1 cos + x0 sin)."""
    cos, sin = (t[None, None].float() for t in emb)
    pairs = x.float().unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return x.float() * cos + rotated * sin


def _proj(attn: nn.Module, x: torch.Tensor, which: str) -> torch.Tensor:
    """One of q/k/v of ``x`` through the image-stream (``to_*``) projections, also when they are fused."""
    if getattr(attn, "fused_projections", False) and hasattr(attn, "to_qkv"):
        return attn.to_qkv(x).chunk(3, dim=-1)["qkv".index(which)]
    return getattr(attn, f"to_{which}")(x)


def _added_proj(attn: nn.Module, x: torch.Tensor, which: str) -> torch.Tensor:
    """One of q/k/v of the text stream ``x`` (``add_*_proj``), also when fused."""
    if getattr(attn, "fused_projections", False) and hasattr(attn, "to_added_qkv"):
        return attn.to_added_qkv(x).chunk(3, dim=-1)["qkv".index(which)]
    return getattr(attn, f"add_{which}_proj")(x)


def maybe_norm(module: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``, or ``x`` when the layer has no such normalization (SD3 without qk_norm)."""
    return x if module is None else module(x)


def _streams(attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, image_v: bool = True):
    """The image stream's q, k (normed) and v (None unless ``image_v``), and the text stream's k (normed) and v,
    as ``(B, H, n, d)``."""
    heads = attn.heads
    q = maybe_norm(attn.norm_q, split_heads(_proj(attn, hidden_states, "q"), heads))
    k = maybe_norm(attn.norm_k, split_heads(_proj(attn, hidden_states, "k"), heads))
    v = split_heads(_proj(attn, hidden_states, "v"), heads) if image_v else None
    ek = maybe_norm(attn.norm_added_k, split_heads(_added_proj(attn, encoder_hidden_states, "k"), heads))
    ev = split_heads(_added_proj(attn, encoder_hidden_states, "v"), heads)
    return q, k, v, ek, ev


def joint_qkv(attn: nn.Module, kind: str, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
              rotary: tuple[torch.Tensor, torch.Tensor] | None, text_len: int | None):
    """Image queries ``(B, H, N_img, d)``, all keys ``(B, H, S, d)``, text values ``(B, H, T, d)`` and the text
    keys' slice of ``S``, recomputed from the layer's own projections in the processor's order."""
    heads = attn.heads
    if kind == "sd3":
        q, k, _, ek, ev = _streams(attn, hidden_states, encoder_hidden_states, image_v=False)
        n_img = q.shape[2]
        return q, torch.cat([k, ek], dim=2), ev, slice(n_img, n_img + ek.shape[2])
    # Flux: norms act on (B, N, H, d) in the processor; they normalize the last dim, so (B, H, N, d) is the same
    if kind == "flux-double":
        q, k, _, ek, ev = _streams(attn, hidden_states, encoder_hidden_states, image_v=False)
        t = ek.shape[2]
        keys = torch.cat([ek, k], dim=2)
    else:  # flux-single: one sequence, text first
        t = int(text_len)
        q = maybe_norm(attn.norm_q, split_heads(_proj(attn, hidden_states, "q"), heads))
        keys = maybe_norm(attn.norm_k, split_heads(_proj(attn, hidden_states, "k"), heads))
        ev = split_heads(_proj(attn, hidden_states, "v"), heads)[:, :, :t]
        q = q[:, :, t:]
    if rotary is not None:
        cos, sin = rotary
        q = apply_rope(q, (cos[t:], sin[t:]))
        keys = apply_rope(keys, (cos, sin))
    return q, keys, ev, slice(0, t)


def text_probabilities(q: torch.Tensor, keys: torch.Tensor, text: slice, scale: float, reading: str,
                       chunk: int = QUERY_CHUNK) -> torch.Tensor:
    """``(B, H, N_img, T)`` attention of image queries on the text keys in one of the :data:`READINGS`,
    computed in float32 over chunks of ``chunk`` queries."""
    if reading not in READINGS:
        raise ValueError(f"unknown joint-attention reading {reading!r}; choose one of {list(READINGS)}")
    q, keys = q.float(), keys.float()
    out = []
    for start in range(0, q.shape[2], chunk):
        scores = torch.matmul(q[:, :, start:start + chunk], keys.transpose(-1, -2)) * scale
        if reading == "joint":
            out.append(scores.softmax(dim=-1)[..., text])
        else:
            out.append(scores[..., text].softmax(dim=-1))
    return torch.cat(out, dim=2)


#: What :meth:`JointTracingProcessor.attach` captures: name -> (the normalizing module, else the projection).
_CAPTURED = {"q": ("norm_q", "to_q"), "k": ("norm_k", "to_k"), "ek": ("norm_added_k", "add_k_proj"),
             "ev": (None, "add_v_proj"), "v": (None, "to_v")}


def _captured_heads(kind: str, source: str, x: torch.Tensor, heads: int) -> torch.Tensor:
    """A captured projection (B, N, H*d) or normalized q/k (SD3: (B, H, N, d); Flux: (B, N, H, d)) as
    (B, H, N, d)."""
    if source == "proj":
        return split_heads(x, heads)
    return x if kind == "sd3" else x.transpose(1, 2)


class JointTracingProcessor:
    """Wraps an MM-DiT layer's own processor: the output is the original processor's, unchanged; the
    image-query x text-key probabilities of the conditional rows go to ``recorder`` (and to ``observer``,
    ``observer(attn, q_img, text_keys, text_values, rows)``). After :meth:`attach`, the q/k/v the processor
    computes are read from forward hooks on the layer's projection and q/k-norm modules instead of being
    projected a second time (only the attention scores are computed again); without it (fused projections),
    they are recomputed (:func:`joint_qkv`), with the same result."""

    def __init__(self, original, kind: str, recorder: LayerRecorder | None, rows: slice, reading: str = "joint",
                 text_len: Callable[[], int | None] = lambda: None, observer=None, concepts=None,
                 prob_scale: torch.Tensor | None = None) -> None:
        if reading not in READINGS:
            raise ValueError(f"unknown joint-attention reading {reading!r}; choose one of {list(READINGS)}")
        self.original = original
        self.kind = kind
        self.recorder = recorder
        self.rows = rows
        self.reading = reading
        self.text_len = text_len
        self.observer = observer
        self.concepts = concepts  # a ConceptStream (evalkit.trace.concept) for joint/double layers, or None
        self.prob_scale = prob_scale  # (H, T) reweighting of this layer (evalkit.trace.joint_edits), recorded too
        self.n_calls = 0
        self._capturing = False
        self._captured: dict[str, tuple[str, torch.Tensor]] = {}
        self._expected: set[str] = set()

    def attach(self, attn: nn.Module) -> list:
        """Register read-only forward hooks that keep what the processor computes for q, k (image and text) and
        the text values; returns the hook handles (remove them to detach). Fused projections: none."""
        if getattr(attn, "fused_projections", False):
            return []
        wanted = ("q", "k", "v") if self.kind == "flux-single" else ("q", "k", "ek", "ev")
        handles = []
        for name in wanted:
            norm, proj = _CAPTURED[name]
            module = getattr(attn, norm, None) if norm else None
            source = "norm" if module is not None else "proj"
            module = module if module is not None else getattr(attn, proj, None)
            if module is None:  # a layer laid out differently: recompute instead
                for handle in handles:
                    handle.remove()
                return []
            handles.append(module.register_forward_hook(self._keeper(name, source)))
        self._expected = set(wanted)
        return handles

    def _keeper(self, name: str, source: str):
        def keep(_module, _args, output) -> None:
            if self._capturing:
                self._captured[name] = (source, output)
        return keep

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None, *args, **kwargs):
        stream = self.concepts
        self._captured = {}
        self._capturing = bool(self._expected)
        try:
            if image_rotary_emb is not None:
                out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                    *args, **kwargs)
            else:
                out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        finally:
            self._capturing = False
        if attention_mask is not None:
            raise ValueError("evalkit does not trace joint attention with an attention mask (a padded text "
                             "mask): generate without one")
        with torch.no_grad():
            q_img = self._record(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
            if stream is not None and stream.state is not None:  # hand the real pass to the concept stream
                rows = self.rows
                if stream.key_observer is not None and q_img is None:
                    q_img = self._qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)[0]
                stream.image_pass(hidden_states[rows], out[0][rows], image_rotary_emb,
                                  int(encoder_hidden_states.shape[1]), q_img)
        self.n_calls += 1
        self._captured = {}
        return out

    def _qkv(self, attn, hidden_states, encoder_hidden_states, rotary):
        """:func:`joint_qkv` of the conditional rows, from the captured tensors when every one was seen."""
        rows = self.rows
        got = self._captured
        if not self._expected or set(got) != self._expected:
            ehs = None if encoder_hidden_states is None else encoder_hidden_states[rows]
            return joint_qkv(attn, self.kind, hidden_states[rows], ehs, rotary, self.text_len())
        heads = attn.heads

        def take(name: str) -> torch.Tensor:
            source, x = got[name]
            return _captured_heads(self.kind, source, x, heads)[rows]

        q, k = take("q"), take("k")
        if self.kind == "sd3":
            ek, ev = take("ek"), split_heads(got["ev"][1], heads)[rows]
            n_img = q.shape[2]
            return q, torch.cat([k, ek], dim=2), ev, slice(n_img, n_img + ek.shape[2])
        if self.kind == "flux-double":
            ek, ev = take("ek"), split_heads(got["ev"][1], heads)[rows]
            t, keys = ek.shape[2], torch.cat([ek, k], dim=2)
        else:
            t = int(self.text_len())
            keys, ev, q = k, split_heads(got["v"][1], heads)[rows][:, :, :t], q[:, :, t:]
        if rotary is not None:
            cos, sin = rotary
            q, keys = apply_rope(q, (cos[t:], sin[t:])), apply_rope(keys, (cos, sin))
        return q, keys, ev, slice(0, t)

    def _record(self, attn, hidden_states, encoder_hidden_states, rotary) -> torch.Tensor | None:
        """Record the call; returns the image queries of the conditional rows (None when nothing needed them)."""
        if self.recorder is None and self.observer is None:
            return None
        q, keys, values, text = self._qkv(attn, hidden_states, encoder_hidden_states, rotary)
        if self.observer is not None:
            self.observer(attn, q, keys[:, :, text], values, slice(0, q.shape[0]))
        if self.recorder is None:
            return q
        scale = float(getattr(attn, "scale", q.shape[-1] ** -0.5))
        probs = text_probabilities(q, keys, text, scale, self.reading)
        if self.prob_scale is not None:  # reweighted by joint_edits: record the probabilities the model used
            probs = probs * self.prob_scale[:, : probs.shape[-1]].to(probs)[None, :, None, :]
        source = encoder_hidden_states if encoder_hidden_states is not None else hidden_states
        vkey = self.recorder_key(source)
        self.recorder.record_probs(attn, probs, values, vkey)
        return q

    def recorder_key(self, source: torch.Tensor) -> tuple:
        """A value key that changes with every call: MM-DiT text states are rewritten by each block at every
        step, so value norms are recomputed per call (exact)."""
        return ("joint", self.n_calls, id(source))
