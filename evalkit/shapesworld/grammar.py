"""The ShapesWorld prompt grammar: render a :class:`~evalkit.shapesworld.scene.Scene` as an English prompt.

Every object phrase is ``determiner [size] colour noun`` (e.g. "a small red circle"); a scene may add a
coarse position ("in the top left"), a relation that holds in the picture ("above", "left of", "next to"),
conjunctions ("and", "with") and verbs or adverbs that do not change the picture ("resting quietly").
The grammar records, for every word that names an object (its noun and its colour and size adjectives),
which object it grounds, so exact masks can be attached to prompt words.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scene import FILLER_ADVERBS, FILLER_VERBS, Scene, SceneObject

__all__ = ["GroundedWord", "Prompt", "describe", "object_phrase"]

_POSITION_PHRASES = {
    "center": "in the center",
    "top": "at the top",
    "bottom": "at the bottom",
    "left": "on the left",
    "right": "on the right",
}


@dataclass(frozen=True)
class GroundedWord:
    """A prompt word that names an object: the word, its character offset, role and object index."""

    word: str
    start: int
    role: str  # "noun", "color" or "size"
    object_index: int
    occurrence: int  # 0-based occurrence of this word in the prompt


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt with its grounded words (in prompt order)."""

    text: str
    words: tuple[GroundedWord, ...]

    def nouns(self) -> list[GroundedWord]:
        """The shape nouns, one per object, in prompt order."""
        return [w for w in self.words if w.role == "noun"]


def _position_phrase(scene: Scene, obj: SceneObject) -> str:
    pos = scene.position(obj)
    return _POSITION_PHRASES.get(pos, f"in the {pos}")


def object_phrase(obj: SceneObject, *, determiner: str = "a", with_size: bool = True) -> list[tuple[str, str | None]]:
    """Tokens of one object phrase as ``(word, role)`` pairs; role is None for non-grounding words."""
    tokens: list[tuple[str, str | None]] = []
    if with_size:
        tokens.append((obj.size, "size"))
    tokens += [(obj.color, "color"), (obj.shape, "noun")]
    if determiner == "a" and tokens[0][0][0] in "aeiou":
        determiner = "an"
    return [(determiner, None), *tokens]


def _assemble(parts: list[tuple[str, str | None, int | None]]) -> Prompt:
    """Join ``(word_or_phrase, role, object_index)`` parts with spaces; commas attach to the previous word."""
    text = ""
    words: list[GroundedWord] = []
    counts: dict[str, int] = {}
    for word, role, idx in parts:
        if word == ",":
            text += ","
            continue
        if text:
            text += " "
        start = len(text)
        text += word
        for w in word.split():
            counts[w] = counts.get(w, 0)
        if role is not None and idx is not None:
            words.append(GroundedWord(word, start, role, idx, counts[word]))
        for w in word.split():
            counts[w] += 1
    return Prompt(text=text, words=tuple(words))


def describe(
    scene: Scene,
    rng: np.random.Generator | int | None = None,
    *,
    p_size: float = 0.7,
    p_position: float = 0.25,
    p_relation: float = 0.5,
    p_filler: float = 0.2,
) -> Prompt:
    """Render ``scene`` as a prompt; ``rng`` draws the grammar choices (None: the plainest prompt).

    With ``rng=None`` the prompt is deterministic: every object as "a <size> <colour> <noun>", joined by
    "and" (no positions, relations or fillers).
    """
    plain = rng is None
    if isinstance(rng, int):
        rng = np.random.default_rng(rng)

    def coin(p: float) -> bool:
        return False if plain else bool(rng.random() < p)

    def pick(options):
        return options[0] if plain else options[int(rng.integers(len(options)))]

    objs = list(scene.objects)
    parts: list[tuple[str, str | None, int | None]] = []

    def add_object(i: int, first: bool) -> None:
        det = "a" if plain else pick(("a", "a", "one", "the") if first else ("a", "a", "the"))
        size = True if plain else coin(p_size)
        for word, role in object_phrase(objs[i], determiner=det, with_size=size):
            parts.append((word, role, i if role else None))

    def add_filler() -> None:
        if coin(p_filler):
            parts.append((pick(FILLER_VERBS), None, None))
            if coin(0.6):
                parts.append((pick(FILLER_ADVERBS), None, None))

    if len(objs) == 1:
        add_object(0, True)
        add_filler()
        if coin(p_position):
            parts.append((_position_phrase(scene, objs[0]), None, None))
        return _assemble(parts)

    if len(objs) == 2:
        add_object(0, True)
        add_filler()
        if coin(p_relation):
            rel = scene.relation(objs[0], objs[1]) if coin(0.8) else "next to"
            parts.append((rel, None, None))
        else:
            parts.append((pick(("and", "and", "with")), None, None))
        add_object(1, False)
        return _assemble(parts)

    # three objects: "A, B and C" or "A rel B and C"
    add_object(0, True)
    if coin(p_relation):
        parts.append((scene.relation(objs[0], objs[1]), None, None))
    else:
        parts.append((",", None, None))
    add_object(1, False)
    parts.append(("and", None, None))
    add_object(2, False)
    add_filler()
    return _assemble(parts)
