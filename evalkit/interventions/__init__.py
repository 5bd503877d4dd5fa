"""Causal interventions, applied through the same attn2 processors as tracing (composable with it):
token removal, head ablation, head reweighting (HRV ordered weakening), value steering, and HRV
concept strengthening / adjusting. Each is deterministic under a fixed seed."""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..trace import JointTokens, LayerEdit, LayerInfo, PromptTokens


def head_index(layers: Sequence[LayerInfo]) -> dict[str, tuple[LayerInfo, int]]:
    """HRV-style head name -> (layer, head index) for a model's attn2 layers."""
    return {name: (layer, h) for layer in layers for h, name in enumerate(layer.head_names())}


def _check_heads(heads: Sequence[str], layers: Sequence[LayerInfo]) -> dict[str, tuple[LayerInfo, int]]:
    index = head_index(layers)
    unknown = [h for h in heads if h not in index]
    if unknown:
        raise ValueError(
            f"heads {unknown[:3]} are not heads of this model; its heads look like {list(index)[:2]} "
            f"({len(index)} in all)"
        )
    return index


def semantic_positions(tokens: PromptTokens | JointTokens) -> list[int]:
    """Token positions of the prompt's words: everything between the start and the end token; on an MM-DiT
    (:class:`JointTokens`) the word tokens of every tokenizer's part (CLIP's and T5's on SD3, T5's on Flux, which
    has no start token), as key positions."""
    if isinstance(tokens, JointTokens):
        return sorted({offset + p for _, tok, offset in tokens.parts for w in tok.words for p in w.positions})
    return list(range(1, tokens.n_tokens - 1))


class Intervention:
    """Base class: an intervention may rewrite the prompt and/or edit attn2 layers."""

    kind: str = "intervention"

    def rewrite(self, prompt: str) -> str:
        """The prompt to generate from (unchanged unless the intervention edits the text)."""
        return prompt

    def edits(self, layers: Sequence[LayerInfo], tokens: PromptTokens) -> dict[str, LayerEdit]:
        """Per-layer edits for a prompt tokenized as ``tokens``."""
        return {}

    def params(self) -> dict:
        """Parameters that identify this intervention (logged, part of cache keys)."""
        return {}

    def describe(self) -> dict:
        """``{"kind": ..., **params}``: a JSON-able description."""
        return {"kind": self.kind, **self.params()}


@dataclass
class TokenRemoval(Intervention):
    """Remove one prompt word (all of its tokens) and regenerate with the same seed (paper 000
    Eq. 5). ``occurrence`` (0-based) removes one occurrence of a repeated word; default all.
    Matching is case-insensitive on whole words; surrounding whitespace is collapsed."""

    word: str
    occurrence: int | None = None
    kind: str = field(default="token-removal", init=False)

    def rewrite(self, prompt: str) -> str:
        pattern = re.compile(rf"(?<![\w]){re.escape(self.word)}(?![\w])", re.IGNORECASE)
        matches = list(pattern.finditer(prompt))
        if not matches:
            raise ValueError(f"cannot remove {self.word!r}: it is not a word of the prompt {prompt!r}")
        if self.occurrence is not None:
            if not 0 <= self.occurrence < len(matches):
                raise ValueError(f"{self.word!r} occurs {len(matches)} time(s) in {prompt!r}")
            matches = [matches[self.occurrence]]
        out = prompt
        for m in reversed(matches):
            out = out[: m.start()] + out[m.end():]
        return re.sub(r"\s+", " ", out).strip()

    def params(self) -> dict:
        return {"word": self.word, "occurrence": self.occurrence}


@dataclass
class HeadAblation(Intervention):
    """Zero the output of chosen (layer, head) pairs in every row of the batch, at every step.

    Heads are named as in HRV files ("up, layer: 2, head: 5"); see :meth:`top_k` and :meth:`random`.
    """

    heads: Sequence[str]
    kind: str = field(default="head-ablation", init=False)

    @staticmethod
    def top_k(scores: Mapping[str, float], k: int) -> list[str]:
        """The ``k`` heads with the highest score (ties: name order)."""
        return [name for name, _ in sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]

    @staticmethod
    def random(head_names: Sequence[str], k: int, seed: int) -> list[str]:
        """``k`` distinct heads drawn uniformly with a seeded generator."""
        if k > len(head_names):
            raise ValueError(f"cannot draw {k} heads from {len(head_names)}")
        return sorted(random.Random(seed).sample(list(head_names), k))

    def edits(self, layers, tokens):
        index = _check_heads(self.heads, layers)
        out: dict[str, LayerEdit] = {}
        for name in self.heads:
            layer, h = index[name]
            edit = out.setdefault(layer.name, LayerEdit(head_scale=torch.ones(layer.heads)))
            edit.head_scale[h] = 0.0
        return out

    def params(self) -> dict:
        return {"heads": list(self.heads)}


@dataclass
class HeadReweighting(Intervention):
    """Multiply the attention maps of the prompt's semantic tokens (special tokens untouched) by
    ``factor`` in the chosen heads, at all steps, in the conditional rows. With the default
    ``factor=-2.0`` this is HRV ordered weakening (paper 001 sec. 4)."""

    heads: Sequence[str]
    factor: float = -2.0
    kind: str = field(default="head-reweighting", init=False)

    def edits(self, layers, tokens):
        index = _check_heads(self.heads, layers)
        positions = semantic_positions(tokens)
        out: dict[str, LayerEdit] = {}
        for name in self.heads:
            layer, h = index[name]
            edit = out.setdefault(layer.name, LayerEdit(prob_scale=torch.ones(layer.heads, tokens.max_length)))
            edit.prob_scale[h, positions] = self.factor
        return out

    def params(self) -> dict:
        return {"heads": list(self.heads), "factor": self.factor}


@dataclass
class ValueSteering(Intervention):
    """Scale the value vectors of ``words``' tokens by ``alpha`` (paper 000 Eq. 12) in the chosen
    heads (the paper: top-5 by S(h, i)), in the conditional rows, during the first ``steps`` UNet
    calls only (the paper: 25 of 50); later calls run unsteered."""

    words: Sequence[str]
    heads: Sequence[str]
    alpha: float = 2.0
    steps: int | None = 25
    kind: str = field(default="value-steering", init=False)

    @classmethod
    def from_sensitivity(cls, scores: Mapping[str, object], *, alpha: float = 2.0, k: int = 5,
                         steps: int | None = 25) -> list[ValueSteering]:
        """One steering per word, each in that word's top-``k`` heads by S(h, i) (``HeadScores``)."""
        return [cls([w], [name for name, _ in s.top(k)], alpha, steps) for w, s in scores.items()]

    def edits(self, layers, tokens):
        index = _check_heads(self.heads, layers)
        positions = sorted({p for w in self.words for p in tokens.positions(w)})
        out: dict[str, LayerEdit] = {}
        for name in self.heads:
            layer, h = index[name]
            edit = out.setdefault(
                layer.name, LayerEdit(value_scale=torch.ones(layer.heads, tokens.max_length), value_steps=self.steps)
            )
            edit.value_scale[h, positions] = self.alpha
        return out

    def params(self) -> dict:
        return {"words": list(self.words), "heads": list(self.heads), "alpha": self.alpha, "steps": self.steps}


@dataclass
class ConceptRescaling(Intervention):
    """HRV concept steering (paper 001 sec. 5): the h-th head's attention map of ``word``'s tokens
    is multiplied by the h-th element of a rescaling vector, at all steps, in the conditional rows.
    Strengthening (no ``undesired``): the desired concept's HRV. Adjusting: HRV(desired) -
    HRV(undesired) + 1 (equal concepts give the all-ones vector, i.e. no change)."""

    word: str
    hrv: object  # evalkit.methods.HeadRelevance
    desired: str
    undesired: str | None = None
    kind: str = field(default="concept-rescaling", init=False)

    def vector(self) -> dict[str, float]:
        """Head name -> rescaling factor."""
        vec = self.hrv.vector(self.desired)
        if self.undesired is not None:
            vec = vec - self.hrv.vector(self.undesired) + 1.0
        return {name: float(v) for name, v in zip(self.hrv.heads, vec)}

    def edits(self, layers, tokens):
        factors = self.vector()
        index = _check_heads(list(factors), layers)
        positions = tokens.positions(self.word)
        out: dict[str, LayerEdit] = {}
        for name, f in factors.items():
            layer, h = index[name]
            edit = out.setdefault(layer.name, LayerEdit(prob_scale=torch.ones(layer.heads, tokens.max_length)))
            edit.prob_scale[h, positions] = f
        return out

    def params(self) -> dict:
        return {"word": self.word, "desired": self.desired, "undesired": self.undesired}


__all__ = [
    "ConceptRescaling",
    "HeadAblation",
    "HeadReweighting",
    "Intervention",
    "TokenRemoval",
    "ValueSteering",
    "head_index",
    "semantic_positions",
]

from .sweep import RemovalSweep, auto_batch_size, prompt_words, token_removal_sweep  # noqa: E402

__all__ += ["RemovalSweep", "auto_batch_size", "prompt_words", "token_removal_sweep"]
