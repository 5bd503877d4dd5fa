"""Recording one denoiser call's attn2 layers together, at the end of the call, one group of equally shaped
layers at a time.

On a GPU at batch 1 a UNet step is bound by kernel launches, not by arithmetic: SDPA does not return its
probabilities, so a recorder recomputes ``softmax(q k^T / sqrt(d))`` of the conditional rows and adds it to
its sums, a handful of launches per attn2 call (SD 1.5: 16 calls per step). :class:`StepBatch` keeps each
call's query (a reference, no copy) and, when the call of the denoiser returns, computes the probabilities of
every layer with the same geometry in one stacked matmul and one softmax and adds them to the layers' sums
with one multi-tensor (``_foreach``) add, so the launches per step scale with the number of distinct layer
geometries (SD 1.5: 4), not with the number of layers. The keys come from the text embedding, which does not
change across steps: each layer's scaled, transposed fp32 keys (and their stack per group) are computed once
per segment of unchanged values (see :class:`~evalkit.trace.processor.LayerRecorder`). The arithmetic per
layer is the same as the per-call path (fp32 scores of the fp16/bf16 inputs, one softmax per row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PendingCall:
    """One attn2 call waiting for its step's end: the recorder, the layer module, the conditional rows of the
    query ``(B, H, Q, d)``, key and value ``(B, H, K, d)``, and the values' segment key."""

    recorder: object
    attn: torch.nn.Module
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    value_key: tuple | None


class StepBatch:
    """Deferred recording of the attn2 calls of one denoiser call (see the module docstring).

    The tracer flushes it from a forward hook on the denoiser; reading a recorder's statistics flushes it too,
    and a second call of a layer before a flush flushes first, so the order of calls per layer is kept.
    ``max_bytes`` bounds the memory this costs: the batch flushes early once the queries it holds exceed it
    (SDXL at 1024 px holds 70 layers' queries otherwise), and a group is computed in chunks whose fp32 scores
    stay under it (SD 1.5 at 512 px: one flush per UNet call, one chunk per geometry)."""

    max_bytes: int = 64 * 2**20

    def __init__(self) -> None:
        self._pending: list[PendingCall] = []
        self._waiting: set[int] = set()  # ids of the recorders with a pending call
        self._held = 0  # bytes of the query tensors the pending calls keep alive
        self._stacked: dict[tuple, torch.Tensor] = {}  # members' (recorder id, key id) -> their stacked keys

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, call: PendingCall) -> None:
        """Keep ``call`` until the end of the denoiser call (or until the held queries exceed ``max_bytes``)."""
        if id(call.recorder) in self._waiting:
            self.flush()
        self._pending.append(call)
        self._waiting.add(id(call.recorder))
        self._held += call.query.untyped_storage().nbytes()
        if self._held > self.max_bytes:
            self.flush()

    def discard(self) -> None:
        """Forget the pending calls (the denoiser call they belong to raised)."""
        self._pending, self._waiting, self._held = [], set(), 0

    @torch.no_grad()
    def flush(self) -> None:
        """Record every pending call, one stacked computation per group of equally shaped layers."""
        if not self._pending:
            return
        pending, self._pending, self._waiting, self._held = self._pending, [], set(), 0
        groups: dict[tuple, list[PendingCall]] = {}
        for call in pending:
            sig = (tuple(call.query.shape), tuple(call.key.shape), call.query.dtype, call.query.device)
            groups.setdefault(sig, []).append(call)
        for (q_shape, k_shape, *_), calls in groups.items():
            scores_bytes = 4 * q_shape[0] * q_shape[1] * q_shape[2] * k_shape[2]  # fp32 (B, H, Q, K) of one call
            per_chunk = max(1, self.max_bytes // scores_bytes)
            for start in range(0, len(calls), per_chunk):
                self._record_group(calls[start:start + per_chunk])

    def _record_group(self, calls: list[PendingCall]) -> None:
        """Record equally shaped calls of different layers: one stacked matmul, softmax and multi-tensor add."""
        keys = [call.recorder.scaled_keys(call.attn, call.key, call.value_key) for call in calls]
        if len(calls) == 1:
            scores = torch.matmul(calls[0].query.float(), keys[0][1])[None]
        else:
            ids = tuple((id(call.recorder), kid) for call, (kid, _) in zip(calls, keys))
            stacked = self._stacked.get(ids)
            if stacked is None:
                stacked = torch.stack([k for _, k in keys])
                if all(kid is not None for _, kid in ids):  # reusable while no member's keys change
                    if len(self._stacked) >= 64:
                        self._stacked.clear()
                    self._stacked[ids] = stacked
            scores = torch.matmul(torch.stack([call.query for call in calls]).float(), stacked)
        probs = scores.softmax(dim=-1)
        del scores  # not held while the sums grow
        adds: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        squares: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        for call, p in zip(calls, probs.unbind(0)):
            call.recorder.accumulate_into(call.attn, p, call.value, call.value_key, adds, squares)
        if adds[0]:
            torch._foreach_add_(adds[0], adds[1])
        if squares[0]:
            torch._foreach_addcmul_(squares[0], squares[1], squares[1])
