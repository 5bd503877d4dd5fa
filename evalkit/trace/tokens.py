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
                f"{[w.text for w in self.words]} (tokens {[self.pieces[p] for w in self.words for p in w.positions]})"
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


SP_SPACE = "\u2581"  # SentencePiece's word-start mark (T5)


def is_sentencepiece(tokenizer) -> bool:
    """True for SentencePiece-style tokenizers (T5): pieces start a word with "\u2581", there is no start
    token, and the prompt's pieces sit at positions 0, 1, ... (the end token ``</s>`` last)."""
    ids = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bool(ids) and tokenizer.convert_ids_to_tokens(ids[:1])[0].startswith(SP_SPACE)


def _group_sentencepiece_words(tokenizer, ids: list[int]) -> list[Word]:
    """Group SentencePiece pieces into words, each starting at a "\u2581" piece; the end token is dropped."""
    pieces = tokenizer.convert_ids_to_tokens(ids)
    end = len(ids) - 1 if ids and ids[-1] == tokenizer.eos_token_id else len(ids)
    words: list[Word] = []
    current: list[int] = []
    text = ""
    for pos in range(end):
        piece = pieces[pos]
        bare = piece.lstrip(SP_SPACE)
        punct = bool(bare) and not any(ch.isalnum() for ch in bare)  # "," after "circle": its own word, as CLIP
        if (piece.startswith(SP_SPACE) or punct or _is_punct(text)) and current:
            words.append(Word(text=text.lower(), positions=tuple(current)))
            current, text = [], ""
        current.append(pos)
        text += bare
    if current:
        words.append(Word(text=text.lower(), positions=tuple(current)))
    return [w for w in words if w.text]  # a lone "\u2581" before punctuation is no word


def _is_punct(text: str) -> bool:
    """Non-empty and without letters or digits."""
    return bool(text) and not any(ch.isalnum() for ch in text)


def _group_words(tokenizer, ids: list[int]) -> list[Word]:
    """Group BPE pieces (between start and end token) into words ending at a ``</w>`` piece (CLIP), or
    SentencePiece pieces into words starting at a "\u2581" piece (T5)."""
    if is_sentencepiece(tokenizer):
        return _group_sentencepiece_words(tokenizer, ids)
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


def tokenize_prompt(tokenizer, prompt: str, truncate: bool = False) -> PromptTokens | JointTokens:
    """Tokenize ``prompt`` with a CLIP BPE or T5 SentencePiece tokenizer and group pieces into words
    (a :class:`JointTokenizer` gives :class:`JointTokens`).

    A prompt longer than the context raises :class:`PromptTooLongError`, or with
    ``truncate=True`` warns and keeps the first tokens, as the pipeline would.
    """
    if isinstance(tokenizer, JointTokenizer):
        return tokenizer.tokenize(prompt, truncate=truncate)
    return _tokenize(tokenizer, prompt, truncate, int(getattr(tokenizer, "model_max_length", 77)))


def _tokenize(tokenizer, prompt: str, truncate: bool, max_length: int) -> PromptTokens:
    """:func:`tokenize_prompt` for a context of ``max_length`` tokens."""
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


@dataclass(frozen=True)
class JointTokens:
    """A prompt as an MM-DiT model's text keys hold it: one or more tokenizers' sequences laid end to end.

    SD3's text keys are CLIP's 77 positions (CLIP-L and CLIP-G states side by side per position) followed by
    T5's ``max_sequence_length`` positions; Flux's are T5's alone. ``parts[i]`` is ``(name, tokens, offset)``:
    key ``offset + p`` holds that tokenizer's position ``p``. A word's positions are its positions in every
    part (a word attends through both its CLIP and its T5 tokens), and a word one of the tokenizers does not
    find is an error that names that tokenizer. ``words`` and ``pieces`` are the first part's.
    """

    prompt: str
    parts: tuple[tuple[str, PromptTokens, int], ...]
    max_length: int  # the number of text keys

    @property
    def primary(self) -> PromptTokens:
        """The first tokenizer's tokens (defines ``words``, ``pieces`` and ``n_tokens``)."""
        return self.parts[0][1]

    @property
    def ids(self) -> tuple[int, ...]:
        """Every part's ids, end to end (what a stored trace is checked against)."""
        return tuple(i for _, tok, _ in self.parts for i in tok.ids)

    @property
    def pieces(self) -> tuple[str, ...]:
        return self.primary.pieces

    @property
    def words(self) -> tuple[Word, ...]:
        return self.primary.words

    @property
    def n_tokens(self) -> int:
        return self.primary.n_tokens

    def positions(self, word: str, occurrence: int | None = None) -> list[int]:
        """Key positions of ``word`` in every part (see :meth:`PromptTokens.positions`)."""
        out: list[int] = []
        for name, tok, offset in self.parts:
            try:
                out.extend(offset + p for p in tok.positions(word, occurrence))
            except WordNotFoundError as err:
                raise WordNotFoundError(f"{name}: {err}") from None
        return out


@dataclass(frozen=True)
class JointTokenizer:
    """The tokenizers whose sequences make up an MM-DiT pipeline's text keys, with their key counts, in key
    order: ``parts[i] = (name, tokenizer, n_keys)``. :func:`tokenize_prompt` accepts it like one tokenizer."""

    parts: tuple[tuple[str, Any, int], ...]

    @property
    def n_keys(self) -> int:
        """The number of text keys (the sum of the parts' lengths)."""
        return sum(n for _, _, n in self.parts)

    def tokenize(self, prompt: str, truncate: bool = False) -> JointTokens:
        """Tokenize ``prompt`` with every part; a prompt too long for one of them raises (or, with
        ``truncate``, is cut there as the pipeline cuts it)."""
        parts, offset = [], 0
        for name, tokenizer, n in self.parts:
            if tokenizer is None:  # a pipeline without this encoder (SD3 without T5): zero states, no words
                offset += n
                continue
            try:
                parts.append((name, _tokenize(tokenizer, prompt, truncate, n), offset))
            except PromptTooLongError as err:
                raise PromptTooLongError(f"{name}: {err}") from None
            offset += n
        return JointTokens(prompt, tuple(parts), offset)
