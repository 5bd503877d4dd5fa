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
- Probability reweighting (``LayerEdit.prob_scale``) needs the attention probabilities, which the model's
  fused attention keeps inside: refused with an error that says so.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .processor import LayerEdit


def check_joint_edit(layer: str, attn: nn.Module, edit: LayerEdit) -> None:
    """Raise a clear error for an edit MM-DiT layers cannot take."""
    if edit.prob_scale is not None:
        raise ValueError(f"attention reweighting edits the probabilities of {layer}, which SD3/Flux compute inside "
                         "their fused attention: run reweighting (head reweighting, concept rescaling) on a UNet "
                         "model; head removal and value steering work on MM-DiT models")
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
    return handles
