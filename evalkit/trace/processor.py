"""An attention processor for attn2 modules that computes the layer's output exactly as diffusers'
``AttnProcessor2_0`` does and, on the side, streams the statistics attribution methods need.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .batch import PendingCall, StepBatch

#: Statistics a trace can accumulate; each is kept per layer for the conditional batch rows.
STAT_DOCS: dict[str, str] = {
    "attn": "sum over steps of attention probabilities A[h, q, k]; (heads, Q, K)",
    "norm": "sum over steps of A[h, q, k] * ||v[h, k] W_O^h||_2 (paper 000 Eq. 6 norm); (heads, Q, K)",
    "norm_sq": "sum over steps of (A[h, q, k] * ||v[h, k] W_O^h||_2)^2; (heads, Q, K)",
    "attn_steps": "per step, mean over heads of A[h, q, k]; (steps, Q, K)",
    "norm_steps": "per step, mean over heads of the norm contribution; (steps, Q, K)",
    "concept": "MM-DiT only: sum over steps of ConceptAttention's softmax over concepts of o_x o_c^T; (1, Q, C), "
               "C the concepts in settings['concepts'] (evalkit.trace.concept)",
}
#: Statistics the per-layer recorder accumulates (``concept`` comes from the concept stream).
RECORDED_STATS = frozenset(STAT_DOCS) - {"concept"}


class LayerRecorder:
    """Streaming accumulators of one attn2 layer; memory is independent of the number of steps
    unless a per-step statistic ("*_steps") is requested.

    The value norms n[h, k] = ||v[h, k] W_O^h|| of cross-attention come from the text embedding, which
    does not change across denoising steps, so ``norm`` = sum_t A_t * n = (sum_t A_t) * n and
    ``norm_sq`` = (sum_t A_t^2) * n^2. The recorder therefore accumulates attention sums over a
    *segment* of calls with unchanged values and multiplies by the norms once, when the values change
    (a value-steering window opens or closes, another prompt batch) or when the sums are read. Values
    count as unchanged while the layer sees the same ``encoder_hidden_states`` tensor object, unmodified
    (its version counter), and the same value edit; anything else starts a new segment, so the
    result equals per-step accumulation (up to float rounding) in every case."""

    def __init__(self, stats: frozenset[str], cond_rows: slice | None = None,
                 out_weight: torch.Tensor | None = None, batch: StepBatch | None = None) -> None:
        unknown = set(stats) - RECORDED_STATS
        if unknown:
            raise ValueError(f"unknown trace statistics {sorted(unknown)}; known: {sorted(RECORDED_STATS)}")
        self.stats = stats
        self.cond_rows = cond_rows
        self.out_weight = out_weight  # the output projection of the values (default: attn.to_out[0].weight)
        self._sums: dict[str, torch.Tensor] = {}
        self.steps: dict[str, list[torch.Tensor]] = {}
        self._n_calls = 0
        self.need_norm = bool(stats & {"norm", "norm_sq", "norm_steps"})
        self.factor = bool(stats & {"norm", "norm_sq"})  # norm sums from attention sums x norms
        self._seg: dict[str, torch.Tensor] = {}  # sum of A (and A^2) over the current segment
        self._norms: torch.Tensor | None = None  # (B, H, K) value norms of the current segment
        self._value_key: tuple | None = None
        self._cache: tuple[int, dict[str, torch.Tensor]] | None = None
        self._keys: tuple[int, torch.Tensor] | None = None  # (key id, scaled transposed fp32 keys) of the segment
        self.batch = batch  # calls deferred to the end of the denoiser call (evalkit.trace.batch); None: at once

    @property
    def n_calls(self) -> int:
        """Calls recorded so far (deferred ones included)."""
        if self.batch is not None:
            self.batch.flush()
        return self._n_calls

    @property
    def sums(self) -> dict[str, torch.Tensor]:
        """The summed statistics (``attn``, ``norm``, ``norm_sq`` as requested) over all calls so far."""
        if self.batch is not None:
            self.batch.flush()
        if self._cache is not None and self._cache[0] == self._n_calls:
            return self._cache[1]
        out = dict(self._sums)
        if self._seg:
            if "attn" in self.stats:
                out["attn"] = self._seg["attn"] if "attn" not in out else out["attn"] + self._seg["attn"]
            if "norm" in self.stats:
                part = self._seg["attn"] * self._norms[:, :, None, :]
                out["norm"] = part if "norm" not in out else out["norm"] + part
            if "norm_sq" in self.stats:
                part = self._seg["attn_sq"] * self._norms.square()[:, :, None, :]
                out["norm_sq"] = part if "norm_sq" not in out else out["norm_sq"] + part
        self._cache = (self._n_calls, out)
        return out

    def nbytes(self) -> int:
        """Bytes held by the accumulators (sums, the open segment, its norms, per-step lists)."""
        held = [*self._sums.values(), *self._seg.values(), *(t for ts in self.steps.values() for t in ts)]
        if self._norms is not None:
            held.append(self._norms)
        return sum(t.nbytes for t in held)

    def _flush(self) -> None:
        """Close the current segment: fold its attention sums times its norms into the totals."""
        if not self._seg:
            return
        self._sums = {k: v for k, v in self.sums.items()}
        self._seg = {}
        self._cache = None

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
        value_key: tuple | None = None,
    ) -> None:
        """Add one call's statistics. ``query`` (B, H, Q, d), ``key``/``value`` (B, H, K, d);
        ``value_key`` identifies the values (see :meth:`TracingAttnProcessor.value_key`; None: they
        may have changed since the last call). With a :class:`~evalkit.trace.batch.StepBatch` the work waits
        for the end of the denoiser call (unless a mask is given)."""
        rows = self._rows(query.shape[0])
        if self.batch is not None:
            if attention_mask is None:
                self.batch.add(PendingCall(self, attn, query[rows], key[rows], value[rows], value_key))
                return
            self.batch.flush()
        scores = torch.matmul(query[rows].float(), self.scaled_keys(attn, key[rows], value_key)[1])
        if attention_mask is not None:
            scores = scores + attention_mask[rows].float()
        self._accumulate(attn, scores.softmax(dim=-1), value[rows], value_key)

    @torch.no_grad()
    def record_probs(self, attn, probs: torch.Tensor, value: torch.Tensor, value_key: tuple | None = None) -> None:
        """Add one call's statistics from probabilities already computed (and possibly edited)."""
        if self.batch is not None:
            self.batch.flush()
        rows = self._rows(probs.shape[0])
        self._accumulate(attn, probs[rows].float(), value[rows], value_key)

    def scaled_keys(self, attn, key: torch.Tensor, value_key: tuple | None) -> tuple[int | None, torch.Tensor]:
        """``(key id, k^T * scale)`` in fp32 for the conditional rows' keys ``key`` (B, H, K, d): computed once
        per segment of unchanged text embedding (``value_key[0]``), every call when that is unknown."""
        kid = None if value_key is None else value_key[0]
        if kid is not None and self._keys is not None and self._keys[0] == kid:
            return self._keys
        scaled = (key.float() * attn.scale).transpose(-1, -2)
        self._keys = (kid, scaled) if kid is not None else None
        return kid, scaled

    def _accumulate(self, attn, probs: torch.Tensor, value: torch.Tensor, value_key: tuple | None) -> None:
        """``probs`` (B, H, Q, K) and ``value`` (B, H, K, d) of the conditional rows."""
        adds: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        squares: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        self.accumulate_into(attn, probs, value, value_key, adds, squares)
        for acc, x in zip(*adds):
            acc.add_(x)
        for acc, x in zip(*squares):
            acc.addcmul_(x, x)  # one fused kernel: launches dominate on a GPU

    def accumulate_into(self, attn, probs: torch.Tensor, value: torch.Tensor, value_key: tuple | None,
                        adds: tuple[list, list], squares: tuple[list, list]) -> None:
        """Count one call and open a new segment if its values changed; the running sums it must add ``probs``
        to (and its square, for ``norm_sq``) are appended to ``adds`` / ``squares`` as (accumulator, term)
        pairs, so a caller can add many layers' terms in one multi-tensor kernel."""
        self._n_calls += 1
        self._cache = None
        if "attn_steps" in self.stats:
            self.steps.setdefault("attn_steps", []).append(probs.mean(dim=1))
        norms = None
        if self.factor:
            if value_key is None or value_key != self._value_key or self._norms is None:
                self._flush()  # the values changed: a new segment with new norms
                self._norms = self.value_norms(attn, value, self.out_weight)
                self._value_key = value_key
            norms = self._norms
            self._seg_term("attn", probs, adds)
            if "norm_sq" in self.stats:
                if "attn_sq" in self._seg:
                    squares[0].append(self._seg["attn_sq"])
                    squares[1].append(probs)
                else:
                    self._seg["attn_sq"] = probs.square()
        elif "attn" in self.stats:
            self._seg_term("attn", probs, adds)
        if "norm_steps" in self.stats:
            norms = norms if norms is not None else self.value_norms(attn, value, self.out_weight)
            self.steps.setdefault("norm_steps", []).append((probs * norms[:, :, None, :]).mean(dim=1))

    def _seg_term(self, name: str, x: torch.Tensor, adds: tuple[list, list]) -> None:
        """Start segment sum ``name`` with ``x`` or note that ``x`` is to be added to it."""
        acc = self._seg.get(name)
        if acc is None:
            self._seg[name] = x.clone()
        else:
            adds[0].append(acc)
            adds[1].append(x)

    @staticmethod
    def value_norms(attn, value: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """||v[b, h, k] W_O^(h)||_2 per (batch, head, token); ``value`` is (B, H, K, d).

        W_O^(h) is the head's column slice of the output projection ``weight`` (default ``attn.to_out[0]``;
        bias excluded: it does not depend on the token). Never materializes a (Q x K x d) tensor:
        ||A v W|| = A ||v W||.
        """
        weight = (attn.to_out[0].weight if weight is None else weight).float()  # (C_out, H * d)
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
        self._context: weakref.ref | None = None
        self._context_version = -1
        self._context_serial = 0

    def value_key(self, encoder_hidden_states: torch.Tensor, value_edited: bool) -> tuple | None:
        """A key that stays equal while this layer's value vectors cannot have changed: the same
        ``encoder_hidden_states`` tensor object (alive, same version counter) and the same value edit. None for
        a tensor made under ``torch.inference_mode`` (it has no version counter): every call is then its own
        segment, which stays exact."""
        if encoder_hidden_states.is_inference():
            self._context = None
            return None
        same = (self._context is not None and self._context() is encoder_hidden_states
                and encoder_hidden_states._version == self._context_version)
        if not same:
            self._context = weakref.ref(encoder_hidden_states)
            self._context_version = encoder_hidden_states._version
            self._context_serial += 1
        return (self._context_serial, value_edited)

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
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states  # values' source
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
        value_edited = edit is not None and edit.value_scale is not None and (
            edit.value_steps is None or self.n_calls < edit.value_steps
        )
        if value_edited:
            value = value.clone()
            value[rows] = value[rows] * edit.value_scale.to(value)[None, :, :, None]
        vkey = self.value_key(context, value_edited) if self.recorder is not None else None
        if edit is not None and edit.prob_scale is not None:
            scores = torch.matmul(query, key.transpose(-1, -2)) * attn.scale
            if attention_mask is not None:
                scores = scores + attention_mask
            probs = scores.softmax(dim=-1)
            probs[rows] = probs[rows] * edit.prob_scale.to(probs)[None, :, None, :]
            out = torch.matmul(probs, value)
            if self.recorder is not None:
                self.recorder.record_probs(attn, probs, value, vkey)
        else:
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )
            if self.recorder is not None:
                self.recorder.record(attn, query, key, value, attention_mask, vkey)
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
