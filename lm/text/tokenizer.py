"""Tokenizer primitives: byte-level BPE training, a bytes-only tokenizer, loading ``tokenizer.json``
(Hugging Face ``tokenizers``), the ids of the special tokens. The tokenize stage
(:mod:`lm.text.tokenize_stage`) and everything that reads text build on these."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lm.errors import DataError

TOKENIZER = "tokenizer.json"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (Radford et al. 2019), the alphabet of
    byte-level BPE: printable Latin-1 bytes map to themselves, the rest to code points 256+."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars, strict=True)}


def _byte_level(tok: Tokenizer, use_regex: bool) -> Tokenizer:
    # No normaliser: the text is encoded exactly as it is, which is what makes decoding exact.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    tok.decoder = decoders.ByteLevel()
    return tok


def byte_tokenizer(special_tokens: list[str]) -> Tokenizer:
    """256 byte tokens (id = byte value) + the special tokens; nothing to train."""
    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = _byte_level(Tokenizer(models.BPE(vocab=vocab, merges=[])), use_regex=False)
    tok.add_special_tokens(special_tokens)
    return tok


def train_bpe(texts: Iterator[str], vocab_size: int, special_tokens: list[str]) -> Tokenizer:
    """Byte-level BPE (Sennrich et al. 2016; GPT-2's byte alphabet) learned from ``texts``."""
    tok = _byte_level(Tokenizer(models.BPE()), use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: Path) -> Tokenizer:
    """A saved ``tokenizer.json`` (ours or any other)."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER
    if not path.is_file():
        raise DataError(f"tokenizer file {path} does not exist")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
        raise DataError(f"{path} is not a tokenizers tokenizer.json: {e}") from None


def special_ids(tok: Tokenizer, special_tokens: list[str]) -> dict[str, int]:
    """eot/pad/mask ids: the first, second and third special token (the end-of-text one if absent)."""
    ids = [tok.token_to_id(t) for t in special_tokens]
    eot = ids[0]
    return {
        "eot_id": eot,
        "pad_id": ids[1] if len(ids) > 1 else eot,
        "mask_id": ids[2] if len(ids) > 2 else eot,
    }
