"""Interventions on MM-DiT joint attention (SD3, Flux), applied through hooks on the layer's own projections so
the model's processor still computes everything else.

- Head removal / scaling (``LayerEdit.head_scale``): each head's slice of the attention output is scaled where
  it enters the output projections: ``to_out[0]`` (image stream) and ``to_add_out`` (text stream) of a joint or
  double-stream block, the attention columns (the first ``heads x head_dim`` inputs) of a Flux single block's
  ``proj_out``. In every row, both halves of classifier-free guidance, as on a UNet.
- Value steering (``LayerEdit.value_scale``, ``value_steps``): the text tokens' value vectors are scaled per
  (head, token) where they leave the value projection: ``add_v_proj`` of a joint or double-stream block, the
  first ``T`` (text) rows of ``to_v`` in a Flux single block; conditional rows only, during the layer's first
  ``value_steps`` calls. The tracer's hooks run after these, so recorded value norms are the steered ones.
- Probability reweighting (``LayerEdit.prob_scale``, HRV weakening and strengthening): the layer's fused
  attention is replaced, for that layer only, by the explicit softmax-matmul (chunked over queries), whose
  image-query x text-key block is multiplied per (head, text key) in the conditional rows after the softmax,
  without renormalization, as on a UNet. The call is intercepted with a ``TorchFunctionMode`` around the
  layer's forward, so the model's processor still does everything else.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .processor import LayerEdit

#: Image queries per chunk of the explicit attention of a reweighted layer (bounds memory at 1024 px).
QUERY_CHUNK = 1024


def check_joint_edit(layer: str, attn: nn.Module, edit: LayerEdit) -> None:
    """Raise a clear error for an edit MM-DiT layers cannot take."""
    if getattr(attn, "fused_projections", False):
        raise ValueError(f"{layer} uses fused q/k/v projections (fuse_qkv_projections()): call "
                         "unfuse_qkv_projections() on the transformer before editing its heads")


def attach_joint_edit(attn: nn.Module, kind: str, block: nn.Module, edit: LayerEdit, rows: slice,
                      text_len: Callable[[], int | None]) -> list:
    """Hook ``edit`` into one joint-attention layer (``kind``: ``sd3``, ``flux-double``, ``flux-single``);
    returns the hook handles. ``rows``: the conditional batch rows; ``text_len``: the text length of the current
    call (Flux single blocks see one sequence, text first)."""
    heads = int(attn.heads)
    head_dim = int(attn.to_q.out_features) // heads
    inner = heads * head_dim
    handles = []
    if edit.head_scale is not None:
        per_channel = edit.head_scale.repeat_interleave(head_dim)  # (inner,)

        def scale_heads(_module, args):
            x = args[0]
            scale = per_channel.to(x)
            if x.shape[-1] == inner:
                return (x * scale, *args[1:])
            return (torch.cat([x[..., :inner] * scale, x[..., inner:]], dim=-1), *args[1:])

        targets = [block.proj_out] if kind == "flux-single" else [attn.to_out[0], getattr(attn, "to_add_out", None)]
        handles.extend(t.register_forward_pre_hook(scale_heads) for t in targets if t is not None)
    if edit.value_scale is not None:
        calls = [0]
        source = attn.to_v if kind == "flux-single" else attn.add_v_proj

        def steer(_module, _args, out):
            n = calls[0]
            calls[0] += 1
            if edit.value_steps is not None and n >= edit.value_steps:
                return None
            t = int(text_len()) if kind == "flux-single" else out.shape[1]
            k = min(t, edit.value_scale.shape[1])
            out = out.clone()
            text = out[rows, :k].unflatten(-1, (heads, head_dim))  # (rows, k, H, d), a view into out
            text.mul_(edit.value_scale[:, :k].transpose(0, 1).to(out)[None, :, :, None])
            return out

        handles.append(source.register_forward_hook(steer))
    if edit.prob_scale is not None:
        handles.extend(_attach_reweighting(attn, kind, edit.prob_scale, rows, text_len))
    return handles


def _sdpa_arguments(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False) -> tuple:
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa


def reweighted_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                         prob_scale: torch.Tensor, rows: slice, image: slice, text: slice) -> torch.Tensor:
    """Explicit attention ``softmax(q k^T * scale) v`` of ``(B, H, N, d)`` inputs whose probabilities of the
    ``image`` queries on the ``text`` keys are multiplied by ``prob_scale`` ``(H, T)`` in the batch ``rows``
    (no renormalization); computed over chunks of queries in the inputs' dtype."""
    out = []
    n = query.shape[2]
    factor = prob_scale[:, : text.stop - text.start].to(query)[None, :, None, :]
    for start in range(0, n, QUERY_CHUNK):
        stop = min(n, start + QUERY_CHUNK)
        probs = (torch.matmul(query[:, :, start:stop], key.transpose(-1, -2)) * scale).softmax(dim=-1)
        lo, hi = max(start, image.start), min(stop, image.stop)
        if lo < hi:
            block = probs[rows, :, lo - start:hi - start, text]
            probs[rows, :, lo - start:hi - start, text] = block * factor
        out.append(torch.matmul(probs, value))
    return torch.cat(out, dim=2)


def _attach_reweighting(attn: nn.Module, kind: str, prob_scale: torch.Tensor, rows: slice,
                        text_len: Callable[[], int | None]) -> list:
    """Hooks that run ``attn``'s forward under a mode replacing its scaled-dot-product attention by
    :func:`reweighted_attention` (text first in Flux, image first in SD3)."""
    from torch.overrides import TorchFunctionMode

    sdpa = torch.nn.functional.scaled_dot_product_attention
    state: dict = {}

    class Reweight(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is not sdpa:
                return func(*args, **kwargs)
            q, k, v, mask, dropout, causal, scale, gqa = _sdpa_arguments(*args, **kwargs)
            if mask is not None or causal or dropout or gqa or k.shape[2] != q.shape[2]:
                raise ValueError("attention reweighting on SD3/Flux expects one unmasked joint attention; this layer "
                                 "calls scaled_dot_product_attention differently")
            n, t = q.shape[2], state["text"]
            image, text = (slice(t, n), slice(0, t)) if kind.startswith("flux") else (slice(0, n - t), slice(n - t, n))
            return reweighted_attention(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale, prob_scale, rows,
                                        image, text)

    def enter(_module, _args, kwargs):
        ehs = kwargs.get("encoder_hidden_states")
        state["text"] = int(ehs.shape[1]) if ehs is not None else int(text_len())
        state["mode"] = Reweight()
        state["mode"].__enter__()

    def leave(*_):
        mode = state.pop("mode", None)
        if mode is not None:
            mode.__exit__(None, None, None)

    return [attn.register_forward_pre_hook(enter, with_kwargs=True),
            attn.register_forward_hook(leave, always_call=True)]
