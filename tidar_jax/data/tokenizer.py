"""Tokenizers for the corpus: train a byte-level BPE, or load an existing ``tokenizer.json`` (file or HF dir).

Either way the tokenizer ends up with an end-of-text token (document separator) and a mask token (TiDAR's [MASK]);
if a loaded tokenizer has neither of the known spellings, the missing one is added as a new special token.
"""

from __future__ import annotations

import os
from typing import Iterable

from tidar_jax.data.sources import DataError

TOKENIZER_FILE = "tokenizer.json"
EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"
# Known spellings, in preference order. Qwen reuses <|fim_pad|> as [MASK] (see ModelConfig.mask_token_id).
EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>")
MASK_CANDIDATES = (MASK_TOKEN, "<|fim_pad|>", "[MASK]", "<mask>")
MIN_VOCAB = 258  # 256 byte symbols + the two special tokens


def tokenizer_file(path: str) -> str:
    """``path`` itself if it is a file, else ``path/tokenizer.json``; DataError if neither exists."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    candidate = os.path.join(path, TOKENIZER_FILE)
    if os.path.isfile(candidate):
        return candidate
    raise DataError(f"tokenizer {path!r}: not a tokenizer.json file or a directory containing {TOKENIZER_FILE}")


def load_tokenizer(data_dir_or_file):
    """A ``tokenizers.Tokenizer`` from a prepared data dir, an HF dir, or a ``tokenizer.json`` path."""
    from tokenizers import Tokenizer

    path = tokenizer_file(data_dir_or_file)
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # the Rust side raises a generic Exception for malformed files
        raise DataError(f"tokenizer {path!r}: cannot be loaded ({e})") from None


def train_bpe(texts: Iterable[str], vocab_size: int, length: int | None = None):
    """A byte-level BPE (GPT-2 style, exact round trip) trained on ``texts``; ids 0/1 are <|endoftext|>/<|mask|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or not MIN_VOCAB <= vocab_size < 2 ** 32:
        raise DataError(f"vocab_size={vocab_size!r}: must be an integer in [{MIN_VOCAB}, 2**32)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, MASK_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer, length=length)
    return tok


def ensure_special_tokens(tok) -> dict:
    """Find (or add) the eos and mask tokens; returns the tokenizer section of the manifest (minus file hash)."""
    added = []

    def find_or_add(candidates, default):
        for spelling in candidates:
            token_id = tok.token_to_id(spelling)
            if token_id is not None:
                return spelling, token_id
        tok.add_special_tokens([default])
        added.append(default)
        return default, tok.token_to_id(default)

    eos, eos_id = find_or_add(EOS_CANDIDATES, EOS_TOKEN)
    mask, mask_id = find_or_add(MASK_CANDIDATES, MASK_TOKEN)
    return {"vocab_size": tok.get_vocab_size(with_added_tokens=True), "eos_token": eos, "eos_token_id": eos_id,
            "mask_token": mask, "mask_token_id": mask_id, "added_special_tokens": added}


def encode_documents(tok, texts: list[str]) -> list[list[int]]:
    """Token ids per document, with no BOS/EOS added and special-token *text* inside documents encoded as text.

    ``encode_special_tokens`` matters: a source file that contains the literal string "<|endoftext|>" (the stdlib
    has some) must not inject a fake document boundary.
    """
    previous = tok.encode_special_tokens
    tok.encode_special_tokens = True
    try:
        return [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]  # no offsets: faster
    finally:
        tok.encode_special_tokens = previous
