"""Offline CLIP BPE tokenizer built from the vocabulary that open_clip ships.

No model hub is needed: the byte-pair merges in open_clip's ``bpe_simple_vocab_16e6.txt.gz``
define the same 49,408-token vocabulary that Stable Diffusion 1.x uses.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "MAX_LENGTH",
    "VOCAB_SIZE",
    "build_clip_tokenizer",
    "clip_vocab_and_merges",
    "write_vocab_files",
]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_LENGTH = 77
VOCAB_SIZE = 49408
_NUM_MERGES = 49152 - 256 - 2  # merges used by CLIP: 48,894


def _byte_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode character, as GPT-2/CLIP BPE does."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    # Insertion order (printable bytes first, then the rest) defines the vocabulary order.
    return mapping


def _bpe_path() -> Path:
    """Locate open_clip's bundled BPE merges file."""
    import open_clip.tokenizer as oc_tok

    return Path(oc_tok.default_bpe())


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], tuple[str, ...]]:
    """Return the CLIP token->id vocabulary and the ordered BPE merge lines."""
    with gzip.open(_bpe_path(), "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    merges = tuple(lines[1 : _NUM_MERGES + 1])  # line 0 is a version header
    chars = list(_byte_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    tokens += ["".join(m.split()) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    if len(tokens) != VOCAB_SIZE:
        raise RuntimeError(f"unexpected CLIP vocabulary size {len(tokens)} (expected {VOCAB_SIZE})")
    return {tok: i for i, tok in enumerate(tokens)}, merges


def write_vocab_files(out_dir: Path) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` in the format CLIPTokenizer reads."""
    vocab, merges = clip_vocab_and_merges()
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_file = out_dir / "vocab.json"
    merges_file = out_dir / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


def build_clip_tokenizer(out_dir: Path | None = None, pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
    """Build the SD 1.x CLIP tokenizer offline; write ``vocab.json``/``merges.txt`` to ``out_dir`` if given.

    ``model_max_length=77`` is required: without it the pipeline's padding overflows an int. ``pad_token``
    ``"!"`` gives the tokenizer of SD 2.x and of SDXL's second encoder (OpenCLIP pads with id 0, not the end
    token); the ids of a prompt and its start/end tokens are the same either way.
    """
    vocab, merges = clip_vocab_and_merges()
    if out_dir is not None:
        write_vocab_files(Path(out_dir))
    # transformers>=5 builds the tokenizers-backed BPE from in-memory vocab/merges; the legacy
    # ``vocab_file``/``merges_file`` keywords are silently ignored there (yielding a 3-token vocab).
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=[tuple(m.split()) for m in merges],
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=pad_token,
        model_max_length=MAX_LENGTH,
    )
