"""An attention processor for attn2 modules that computes the layer's output exactly as diffusers'
``AttnProcessor2_0`` does and, on the side, streams the statistics attribution methods need.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: Statistics a trace can accumulate; each is kept per layer for the conditional batch rows.
STAT_DOCS: dict[str, str] = {
    "attn": "sum over steps of attention probabilities A[h, q, k]; (heads, Q, K)",
    "norm": "sum over steps of A[h, q, k] * ||v[h, k] W_O^h||_2 (paper 000 Eq. 6 norm); (heads, Q, K)",
    "norm_sq": "sum over steps of (A[h, q, k] * ||v[h, k] W_O^h||_2)^2; (heads, Q, K)",
    "attn_steps": "per step, mean over heads of A[h, q, k]; (steps, Q, K)",
    "norm_steps": "per step, mean over heads of the norm contribution; (steps, Q, K)",
}


class LayerRecorder:
    """Streaming accumulators of one attn2 layer; memory is independent of the number of steps
    unless a per-step statistic ("*_steps") is requested."""

    def __init__(self, stats: frozenset[str], cond_rows: slice | None = None) -> None:
        unknown = set(stats) - set(STAT_DOCS)
        if unknown:
            raise ValueError(f"unknown trace statistics {sorted(unknown)}; known: {sorted(STAT_DOCS)}")
        self.stats = stats
        self.cond_rows = cond_rows
        self.sums: dict[str, torch.Tensor] = {}
        self.steps: dict[str, list[torch.Tensor]] = {}
        self.n_calls = 0
        self.need_norm = bool(stats & {"norm", "norm_sq", "norm_steps"})

    def _rows(self, batch: int) -> slice:
        """Rows of the batch that belong to the conditional half of classifier-free guidance."""
        if self.cond_rows is not None:
            return self.cond_rows
        return slice(0, batch)

    @torch.no_grad()
    def record(
        self,
        attn,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> None:
        """Add one call's statistics. ``query`` (B, H, Q, d), ``key``/``value`` (B, H, K, d)."""
        rows = self._rows(query.shape[0])
        q = query[rows].float()
        k = key[rows].float()
        scores = torch.matmul(q, k.transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            scores = scores + attention_mask[rows].float()
        self._accumulate(attn, scores.softmax(dim=-1), value[rows])

    @torch.no_grad()
    def record_probs(self, attn, probs: torch.Tensor, value: torch.Tensor) -> None:
        """Add one call's statistics from probabilities already computed (and possibly edited)."""
        rows = self._rows(probs.shape[0])
        self._accumulate(attn, probs[rows].float(), value[rows])

    def _accumulate(self, attn, probs: torch.Tensor, value: torch.Tensor) -> None:
        """``probs`` (B, H, Q, K) and ``value`` (B, H, K, d) of the conditional rows."""
        self.n_calls += 1
        if "attn" in self.stats:
            self._add("attn", probs)
        if "attn_steps" in self.stats:
            self.steps.setdefault("attn_steps", []).append(probs.mean(dim=1))
        if self.need_norm:
            contrib = probs * self.value_norms(attn, value)[:, :, None, :]
            if "norm" in self.stats:
                self._add("norm", contrib)
            if "norm_sq" in self.stats:
                self._add("norm_sq", contrib.square())
            if "norm_steps" in self.stats:
                self.steps.setdefault("norm_steps", []).append(contrib.mean(dim=1))

    def _add(self, name: str, x: torch.Tensor) -> None:
        acc = self.sums.get(name)
        if acc is None:
            self.sums[name] = x.clone()
        else:
            acc.add_(x)

    @staticmethod
    def value_norms(attn, value: torch.Tensor) -> torch.Tensor:
        """||v[b, h, k] W_O^(h)||_2 per (batch, head, token); ``value`` is (B, H, K, d).

        W_O^(h) is the head's column slice of the output projection (bias excluded: it does not
        depend on the token). Never materializes a (Q x K x d) tensor: ||A v W|| = A ||v W||.
        """
        weight = attn.to_out[0].weight.float()  # (C_out, H * d)
        b, h, k, d = value.shape
        w = weight.view(weight.shape[0], h, d)  # (C_out, H, d)
        projected = torch.einsum("bhkd,ohd->bhko", value.float(), w)
        return projected.norm(dim=-1)


@dataclass
class LayerEdit:
    """Edits of one attn2 layer during generation (all optional; ``None`` leaves a part untouched).

    - ``prob_scale`` ``(heads, K)``: multiplies the conditional rows' attention probabilities after
      the softmax (no renormalization, as in Prompt-to-Prompt reweighting); forces the explicit
      attention path.
    - ``value_scale`` ``(heads, K)``: multiplies the conditional rows' value vectors; only during the
      first ``value_steps`` UNet calls when that is set.
    - ``head_scale`` ``(heads,)``: multiplies each head's attention output in every row (0 removes a
      head from the model, for both halves of classifier-free guidance).
    """

    prob_scale: torch.Tensor | None = None
    value_scale: torch.Tensor | None = None
    value_steps: int | None = None
    head_scale: torch.Tensor | None = None

    def merged(self, other: LayerEdit) -> LayerEdit:
        """Both edits applied together (multipliers multiply)."""

        def mul(a, b):
            return b if a is None else a if b is None else a * b

        if self.value_scale is not None and other.value_scale is not None and self.value_steps != other.value_steps:
            raise ValueError("two value edits with different step windows cannot be combined on one layer")
        return LayerEdit(
            prob_scale=mul(self.prob_scale, other.prob_scale),
            value_scale=mul(self.value_scale, other.value_scale),
            value_steps=self.value_steps if self.value_scale is not None else other.value_steps,
            head_scale=mul(self.head_scale, other.head_scale),
        )


class TracingAttnProcessor:
    """Drop-in replacement of ``AttnProcessor2_0`` for one attn2 module that records statistics
    (``recorder``) and/or applies an intervention (``edit``). Without a probability edit the output
    path runs the same operations in the same order as diffusers, so images are bit-identical to
    untraced generation; with one, attention is computed explicitly (softmax, edit, matmul)."""

    def __init__(self, recorder: LayerRecorder | None = None, edit: LayerEdit | None = None,
                 cond_rows: slice | None = None, observer=None) -> None:
        self.recorder = recorder
        self.edit = edit
        self.cond_rows = cond_rows
        self.observer = observer  # callable(attn, query, key, value, rows): read-only analyses (HRV construction)
        self.n_calls = 0

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        edit = self.edit
        rows = self.cond_rows if self.cond_rows is not None else slice(0, batch_size)
        if self.observer is not None:
            self.observer(attn, query, key, value, rows)
        if edit is not None and edit.value_scale is not None and (
            edit.value_steps is None or self.n_calls < edit.value_steps
        ):
            value = value.clone()
            value[rows] = value[rows] * edit.value_scale.to(value)[None, :, :, None]
        if edit is not None and edit.prob_scale is not None:
            scores = torch.matmul(query, key.transpose(-1, -2)) * attn.scale
            if attention_mask is not None:
                scores = scores + attention_mask
            probs = scores.softmax(dim=-1)
            probs[rows] = probs[rows] * edit.prob_scale.to(probs)[None, :, None, :]
            out = torch.matmul(probs, value)
            if self.recorder is not None:
                self.recorder.record_probs(attn, probs, value)
        else:
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )
            if self.recorder is not None:
                self.recorder.record(attn, query, key, value, attention_mask)
        if edit is not None and edit.head_scale is not None:
            out = out * edit.head_scale.to(out)[None, :, None, None]
        self.n_calls += 1

        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
