"""Prompt tokenization and word -> token alignment for CLIP BPE tokenizers.

Token positions are indices into the text encoder's sequence, so position 0 is the start token
and the first prompt piece sits at position 1 (the "start token offset").

SDXL encodes the prompt twice (``tokenizer``/``text_encoder`` and ``tokenizer_2``/``text_encoder_2``) and
concatenates the two states per position, so a cross-attention key k mixes both encoders' token k. The first
tokenizer defines the positions. Both use the same CLIP BPE, so the prompt's ids, and the words' positions,
are identical; they differ only in padding (the first pads with the end token, the second with "!", id 0),
which lies after the end token. :func:`check_same_positions` verifies this for a pipeline's second tokenizer.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

END_OF_WORD = "</w>"


class WordNotFoundError(ValueError):
    """A requested word does not occur in the prompt."""


class PromptTooLongError(ValueError):
    """A prompt has more tokens than the text encoder's context (77 for CLIP)."""


@dataclass(frozen=True)
class Word:
    """One word of the prompt as the tokenizer splits it: its text and token positions."""

    text: str
    positions: tuple[int, ...]


@dataclass(frozen=True)
class PromptTokens:
    """A tokenized prompt: ids with start/end tokens, readable pieces, and word grouping."""

    prompt: str
    ids: tuple[int, ...]
    pieces: tuple[str, ...]
    words: tuple[Word, ...]
    max_length: int
    tokenizer: Any = field(default=None, repr=False, compare=False)

    @property
    def n_tokens(self) -> int:
        """Number of tokens including the start and end tokens."""
        return len(self.ids)

    def _query_words(self, word: str) -> list[str]:
        """Split a query into words the way the prompt was split (same tokenizer)."""
        if self.tokenizer is None:
            return word.lower().split()
        ids = list(self.tokenizer(word, truncation=False, add_special_tokens=True)["input_ids"])
        return [w.text for w in _group_words(self.tokenizer, ids)]

    def positions(self, word: str, occurrence: int | None = None) -> list[int]:
        """Token positions of ``word`` (one or more prompt words) in the encoder sequence.

        Matching ignores case and works on whole words, so "cat" does not match "cats" and a
        multi-piece word maps to all of its pieces. A word that occurs several times maps to all
        occurrences (as DAAM merges them) unless ``occurrence`` (0-based) picks one.
        """
        query = self._query_words(word)
        if not query:
            raise WordNotFoundError(f"empty word {word!r}: give a word of the prompt {self.prompt!r}")
        texts = [w.text for w in self.words]
        starts = [
            i for i in range(len(texts) - len(query) + 1) if texts[i : i + len(query)] == query
        ]
        if not starts:
            raise WordNotFoundError(
                f"word {word!r} is not in the prompt {self.prompt!r}; its words are "
                f"{[w.text for w in self.words]} (tokens {list(self.pieces[1:-1])})"
            )
        if occurrence is not None:
            if not 0 <= occurrence < len(starts):
                raise WordNotFoundError(
                    f"word {word!r} occurs {len(starts)} time(s) in {self.prompt!r}; "
                    f"occurrence {occurrence} does not exist"
                )
            starts = [starts[occurrence]]
        out: list[int] = []
        for s in starts:
            for w in self.words[s : s + len(query)]:
                out.extend(w.positions)
        return out




def check_same_positions(tokenizer_2, tokens: PromptTokens) -> None:
    """A second tokenizer (SDXL's ``tokenizer_2``) splits the prompt into the same ids as the first, so word
    positions hold for both encoders' halves of each key; a custom pipeline whose vocabularies differ raises."""
    ids = list(tokenizer_2(tokens.prompt, truncation=False, add_special_tokens=True, verbose=False)["input_ids"])
    if len(ids) > tokens.max_length:  # cut the way the first tokenizer's ids were (truncate=True)
        ids = ids[: tokens.max_length - 1] + [ids[-1]]
    if ids != list(tokens.ids):
        raise ValueError(
            f"the pipeline's second tokenizer splits {tokens.prompt!r} into other tokens than the first "
            f"({len(ids)} vs {tokens.n_tokens} ids): word positions would differ between the two text encoders"
        )


def _group_words(tokenizer, ids: list[int]) -> list[Word]:
    """Group BPE pieces (between start and end token) into words ending at a ``</w>`` piece."""
    pieces = tokenizer.convert_ids_to_tokens(ids)
    words: list[Word] = []
    current: list[int] = []
    text = ""
    for pos in range(1, len(ids) - 1):
        piece = pieces[pos]
        current.append(pos)
        if piece.endswith(END_OF_WORD):
            text += piece[: -len(END_OF_WORD)]
            words.append(Word(text=_decode(tokenizer, text), positions=tuple(current)))
            current, text = [], ""
        else:
            text += piece
    if current:
        words.append(Word(text=_decode(tokenizer, text), positions=tuple(current)))
    return words


def tokenize_prompt(tokenizer, prompt: str, truncate: bool = False) -> PromptTokens:
    """Tokenize ``prompt`` with a CLIP BPE tokenizer and group pieces into words.

    A prompt longer than the context raises :class:`PromptTooLongError`, or with
    ``truncate=True`` warns and keeps the first tokens, as the pipeline would.
    """
    max_length = int(getattr(tokenizer, "model_max_length", 77))
    if max_length > 10_000:
        raise ValueError(
            "the tokenizer has no model_max_length (it is unbounded): build it with model_max_length=77"
        )
    ids = list(tokenizer(prompt, truncation=False, add_special_tokens=True, verbose=False)["input_ids"])
    if len(ids) > max_length:
        msg = (
            f"prompt {prompt!r} has {len(ids)} tokens with start/end tokens, more than the "
            f"text encoder's {max_length}"
        )
        if not truncate:
            raise PromptTooLongError(msg + ": shorten it, or cut it as the pipeline does (CLI: --truncate; "
                                     "Python: truncate=True)")
        warnings.warn(msg + f"; it is truncated to the first {max_length} tokens", stacklevel=2)
        ids = ids[: max_length - 1] + [ids[-1]]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    words = _group_words(tokenizer, ids)
    return PromptTokens(prompt, tuple(ids), tuple(pieces), tuple(words), max_length, tokenizer)


def _decode(tokenizer, text: str) -> str:
    """Turn byte-level BPE characters back into readable text."""
    decoder = getattr(tokenizer, "byte_decoder", None)
    if decoder is None:
        return text.lower()
    try:
        return bytearray(decoder[c] for c in text).decode("utf-8", errors="replace").lower()
    except KeyError:
        return text.lower()
