"""Word -> token alignment on the real CLIP BPE tokenizer of tiny-sd."""

from __future__ import annotations

import pytest

from evalkit.trace import PromptTooLongError, WordNotFoundError, tokenize_prompt


@pytest.fixture(scope="module")
def tok(tiny_pipe):
    return tiny_pipe.tokenizer


def test_start_token_offset_and_simple_words(tok):
    t = tokenize_prompt(tok, "a dog on a mat")
    assert t.ids[0] == tok.bos_token_id and t.ids[-1] == tok.eos_token_id
    assert [w.text for w in t.words] == ["a", "dog", "on", "a", "mat"]
    assert t.positions("dog") == [2]  # position 0 is the start token
    assert t.pieces[2] == "dog</w>"


def test_multi_piece_word_maps_to_all_pieces(tok):
    t = tokenize_prompt(tok, "a hippopotamus on a table")
    pos = t.positions("hippopotamus")
    assert len(pos) >= 2
    assert "".join(t.pieces[p] for p in pos).replace("</w>", "") == "hippopotamus"
    assert pos == list(range(2, 2 + len(pos)))


def test_repeated_word_all_occurrences_or_one(tok):
    t = tokenize_prompt(tok, "a cat and a cat")
    assert t.positions("cat") == [2, 5]
    assert t.positions("cat", occurrence=1) == [5]
    with pytest.raises(WordNotFoundError, match="occurs 2 time"):
        t.positions("cat", occurrence=2)


def test_case_and_punctuation(tok):
    t = tokenize_prompt(tok, "A Dog, running!")
    assert t.positions("dog") == t.positions("DOG") == [2]
    assert t.positions("Dog,") == [2, 3]  # the comma is its own word
    assert t.positions("running") == [4]


def test_whole_words_only(tok):
    t = tokenize_prompt(tok, "two cats sleep")
    with pytest.raises(WordNotFoundError):
        t.positions("cat")


def test_multi_word_query(tok):
    t = tokenize_prompt(tok, "an oak tree near a tree")
    assert t.positions("oak tree") == [2, 3]


def test_missing_word_names_word_and_tokens(tok):
    t = tokenize_prompt(tok, "a dog on a mat")
    with pytest.raises(WordNotFoundError) as err:
        t.positions("cat")
    msg = str(err.value)
    assert "'cat'" in msg and "a dog on a mat" in msg and "dog</w>" in msg


def test_too_long_prompt_errors_or_warns(tok):
    prompt = " ".join(["red"] * 80)
    with pytest.raises(PromptTooLongError, match="82 tokens"):
        tokenize_prompt(tok, prompt)
    with pytest.warns(UserWarning, match="truncated"):
        t = tokenize_prompt(tok, prompt, truncate=True)
    assert t.n_tokens == 77 and t.ids[-1] == tok.eos_token_id
