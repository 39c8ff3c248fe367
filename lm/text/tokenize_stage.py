"""Tokenizer (bpe | byte | file) and the token shards it writes.

Every kind is a ``tokenizers.Tokenizer`` saved as ``tokenizer.json`` next to the shards, and
every kind is byte-level: text -> UTF-8 bytes -> tokens, so any string (Chinese, emoji, code,
stray control characters) round-trips encode -> decode byte for byte, with no unknown token.

Shards are flat little-endian arrays of token ids (uint16 when the vocabulary fits, else
uint32), the documents of a split one after another, each followed by the end-of-text token, cut
into files of ``tokenizer.shard_tokens`` tokens. ``index.json`` describes them; see
``lm.text.shards.TokenShards`` for the reader. ``tokenizer_config.json`` beside ``tokenizer.json`` holds
what Hugging Face tools read with it: the special tokens and the chat template (``lm.text.chat``).

A retrain whose tokenizer is the earlier run's (a warm start keeps the champion's) encodes only the
documents that run did not: ``{split}_docs.npy`` holds each document's text digest and token count,
and the others' tokens are copied from the earlier shards (:class:`EarlierTokens`), so the shards
are those a full encode writes.
"""

from __future__ import annotations

import hashlib
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tokenizers import Tokenizer, pre_tokenizers

from lm.config import Config, TokenizerConfig
from lm.data.batching import char_bounded
from lm.errors import DataError
from lm.memory import trim_heap
from lm.pipeline.stage import StageResult
from lm.text.chat import write_tokenizer_config
from lm.text.shards import INDEX, TokenIndex, TokenShards
from lm.text.tokenizer import TOKENIZER, byte_tokenizer, load_tokenizer, special_ids, train_bpe

SPLITS = {"train": "train.parquet", "val": "val.parquet"}
# Per split, per document: the digest of its text and its token count (what a retrain reuses).
DOC_INDEX = "{split}_docs.npy"
DOC_DTYPE = np.dtype([("digest", "<u8"), ("tokens", "<i8")])
BATCH_DOCS = 512  # documents per encode_batch call: enough for every core, little memory
# ...and at most this many characters: an Encoding costs ~50 bytes per token on the Rust side, so a
# batch of large files would otherwise cost memory in proportion to the corpus's largest files.
BATCH_CHARS = 2_000_000
ENCODE_PIECE_CHARS = 100_000  # a longer document is encoded in pieces (see encoding_pieces)


def text_batches(path: Path, batch_size: int = BATCH_DOCS) -> Iterator[list[str]]:
    """The texts of a documents parquet file written by the clean stage, in lists of ``batch_size``,
    read a row group at a time (clean writes one per part, so a row group is a few MB).

    Not ``ParquetFile.iter_batches``: measured on a 359 MB train split, its reader held 47 MB of
    Arrow memory from the first batch and 100 MB by the end; row group by row group holds 5 MB."""
    pf = pq.ParquetFile(path)
    for i in range(pf.metadata.num_row_groups):
        texts = pf.read_row_group(i, columns=["text"]).column(0).to_pylist()
        for j in range(0, len(texts), batch_size):
            yield texts[j : j + batch_size]


def iter_texts(path: Path, max_bytes: float | None = None) -> Iterator[str]:
    """Texts of a documents parquet file; stop after ``max_bytes`` of UTF-8."""
    seen = 0
    for texts in text_batches(path):
        for text in texts:
            yield text
            seen += len(text.encode("utf-8", errors="surrogatepass"))
            if max_bytes is not None and seen >= max_bytes:
                return


def build_tokenizer(cfg: TokenizerConfig, train_parquet: Path) -> Tokenizer:
    if cfg.kind == "byte":
        return byte_tokenizer(cfg.special_tokens)
    if cfg.kind == "file":
        tok = load_tokenizer(Path(cfg.path))
        missing = [t for t in cfg.special_tokens if tok.token_to_id(t) is None]
        if missing:
            tok.add_special_tokens(missing)
        return tok
    max_bytes = None if cfg.train_max_mb is None else cfg.train_max_mb * 2**20
    return train_bpe(iter_texts(train_parquet, max_bytes), cfg.vocab_size, cfg.special_tokens)


class ShardWriter:
    """Appends token ids to ``{split}_00000.bin``, ``{split}_00001.bin`` ... of ``shard_tokens`` each."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.files: list[str] = []
        self.tokens = 0
        self._f = None
        self._in_file = 0

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype, copy=False)
        while ids.size:
            if self._f is None or self._in_file >= self.shard_tokens:
                self._open()
            take = min(ids.size, self.shard_tokens - self._in_file)
            self._f.write(ids[:take].tobytes())
            self._in_file += take
            self.tokens += take
            ids = ids[take:]

    def _open(self) -> None:
        if self._f is not None:
            self._f.close()
        name = f"{self.split}_{len(self.files):05d}.bin"
        self.files.append(name)
        self._f = open(self.out_dir / name, "wb")
        self._in_file = 0

    def close(self) -> None:
        if self._f is None:
            self._open()  # an empty split still has one (empty) file, so readers need no special case
        self._f.close()


def text_digest(text: str) -> int:
    """64-bit digest of a document's text: what tells a retrain's tokenize a document it encoded before."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", errors="surrogatepass"), digest_size=8).digest(), "little")


class EarlierTokens:
    """The token shards of an earlier tokenize made with the same tokenizer: per split, where each of
    its documents' tokens are, by the digest of the document's text (:data:`DOC_INDEX`)."""

    COPY_TOKENS = 1 << 22  # tokens copied at once at most (memory)

    def __init__(self, folder: Path, split: str, digests: np.ndarray, counts: np.ndarray):
        self.shards = TokenShards(folder, split)
        starts = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
        # Sorted by digest, for lookups a batch at a time (24 bytes a document, no Python objects).
        order = np.argsort(digests, kind="stable")
        self.digests, self.starts, self.counts = digests[order], starts[order], counts[order].astype(np.int64)

    def find(self, digests: np.ndarray) -> np.ndarray:
        """Per digest, the index of the earlier document with that text (into starts/counts), or -1."""
        if not len(self.digests):
            return np.full(len(digests), -1)
        pos = np.minimum(np.searchsorted(self.digests, digests), len(self.digests) - 1)
        return np.where(self.digests[pos] == digests, pos, -1)

    @classmethod
    def open(cls, folder: Path | None, tokenizer_json: Path, dtype: np.dtype) -> dict[str, EarlierTokens]:
        """Per split, the earlier tokens in ``folder`` if they can be reused: the same tokenizer (file
        bytes), the same token type, and a document index; else nothing."""
        if folder is None:
            return {}
        try:
            index = TokenIndex.load(folder)
            if (folder / index.tokenizer).read_bytes() != tokenizer_json.read_bytes() or np.dtype(index.dtype) != dtype:
                return {}
            docs = {split: np.load(folder / DOC_INDEX.format(split=split)) for split in SPLITS}
            return {split: cls(folder, split, d["digest"], d["tokens"]) for split, d in docs.items()}
        except (OSError, ValueError, KeyError, DataError):  # an older layout, or removed meanwhile
            return {}

    def copy(self, runs: list[tuple[int, int]], writer: ShardWriter) -> None:
        """Write the tokens at ``(start, count)`` ranges of the earlier split, consecutive ones at once."""
        merged: list[list[int]] = []
        for start, count in runs:
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1][1] += count
            else:
                merged.append([start, count])
        for start, count in merged:
            for at in range(start, start + count, self.COPY_TOKENS):
                writer.write(self.shards.window(at, min(self.COPY_TOKENS, start + count - at), self.shards.dtype))


def _encode_documents(tok: Tokenizer, texts: list[str], eot: np.ndarray, piece_chars: int | None) -> list[np.ndarray]:
    """Each text's tokens followed by the end-of-text token; long texts encoded in pieces."""
    pieces = [(doc, text[a:b]) for doc, text in enumerate(texts) for a, b in encoding_pieces(text, piece_chars)]
    ids: list[list[np.ndarray]] = [[] for _ in texts]
    for group in char_bounded(pieces, BATCH_CHARS, size=lambda p: len(p[1])):
        # encode_batch_fast: Rust threads over every core, no offsets computed (not needed here).
        encodings = tok.encode_batch_fast([p for _, p in group], add_special_tokens=False)
        for enc, (doc, _) in zip(encodings, group, strict=True):
            ids[doc].append(np.asarray(enc.ids, dtype=np.int64))
        del encodings
    return [np.concatenate([*parts, eot]) for parts in ids]


@dataclass
class SplitTokens:
    """What :func:`encode_split` wrote: per document, the digest of its text and its token count."""

    digests: np.ndarray  # uint64 (documents,)
    counts: np.ndarray  # int64 (documents,), the end-of-text token included
    reused: int  # documents whose tokens were copied from an earlier tokenize
    encoded_tokens: int = 0  # tokens of the documents encoded here (the rest were copied)
    encode_seconds: float = 0.0  # time spent in the tokenizer


def encode_split(
    tok: Tokenizer, parquet: Path, writer: ShardWriter, eot_id: int, earlier: EarlierTokens | None = None
) -> SplitTokens:
    """Encode every document of ``parquet`` into ``writer``, in order. A document ``earlier`` encoded
    (same text, same tokenizer) is not encoded again: its tokens are copied, so the shards are
    those a full encode writes, byte for byte."""
    from tqdm import tqdm

    bar = tqdm(
        total=pq.ParquetFile(parquet).metadata.num_rows,
        desc=f"tokenize {writer.split}",
        unit="doc",
        file=sys.stderr,
        disable=None,
        leave=False,
    )
    eot = np.array([eot_id], dtype=np.int64)
    piece_chars = ENCODE_PIECE_CHARS if can_encode_in_pieces(tok) else None
    digests: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    reused = encoded_tokens = 0
    encode_seconds = 0.0
    for texts in text_batches(parquet):
        batch = np.array([text_digest(t) for t in texts], dtype=np.uint64)
        found = np.full(len(texts), -1) if earlier is None else earlier.find(batch)
        t0 = time.perf_counter()
        encoded = _encode_documents(tok, [t for t, f in zip(texts, found, strict=True) if f < 0], eot, piece_chars)
        encode_seconds += time.perf_counter() - t0
        encoded_tokens += sum(ids.size for ids in encoded)
        fresh = iter(encoded)
        sizes = np.zeros(len(texts), dtype=np.int64)
        runs: list[tuple[int, int]] = []  # earlier ranges not yet written, in order
        for i, f in enumerate(found.tolist()):
            if f >= 0:
                runs.append((int(earlier.starts[f]), int(earlier.counts[f])))
                sizes[i] = earlier.counts[f]
                continue
            if runs:
                earlier.copy(runs, writer)
                reused += len(runs)
                runs = []
            ids = next(fresh)
            writer.write(ids)
            sizes[i] = ids.size
        if runs:
            earlier.copy(runs, writer)
            reused += len(runs)
        digests.append(batch)
        counts.append(sizes)
        if (found < 0).any():  # something was encoded: give its memory back
            trim_heap()
        bar.update(len(texts))
    bar.close()
    return SplitTokens(
        np.concatenate(digests) if digests else np.zeros(0, np.uint64),
        np.concatenate(counts) if counts else np.zeros(0, np.int64),
        reused,
        encoded_tokens,
        encode_seconds,
    )


def can_encode_in_pieces(tok: Tokenizer) -> bool:
    """Whether cutting a text before a line break that follows a non-space character leaves its
    tokens unchanged: true of byte-level tokenizers with GPT-2's pre-tokenizer regex (ours), whose
    pieces never span such a point, and with no normaliser and no prefix space added per text."""
    pre = tok.pre_tokenizer
    return tok.normalizer is None and isinstance(pre, pre_tokenizers.ByteLevel) and not pre.add_prefix_space


def encoding_pieces(text: str, max_chars: int | None) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of consecutive pieces of ``text`` of about ``max_chars`` (None: the whole
    text), each cut just before a line break that follows a non-space character.

    The tokenizer's encoder needs ~100-250 bytes per character of the text it encodes at once (the
    normalised string keeps an alignment per byte): a 1M-character document cost 230 MB, pieces of
    100k characters 25 MB. Where there is no such line break the piece runs on to the next one."""
    start, n = 0, len(text)
    while max_chars is not None and n - start > max_chars:
        cut = text.rfind("\n", start + 1, start + max_chars)
        while cut > start and text[cut - 1].isspace():
            cut = text.rfind("\n", start + 1, cut)
        if cut <= start:
            m = _CUT_AFTER.search(text, start + max_chars)
            if m is None:
                break
            cut = m.start()
        yield start, cut
        start = cut
    yield start, n


# A line break after a non-space character. (str.isspace counts as space all that the pre-tokenizer's
# \s does, and a few more: only ever fewer cut points, never an unsafe one.)
_CUT_AFTER = re.compile(r"(?<=\S)\n")


@dataclass
class ChosenTokenizer:
    """The tokenizer a tokenize uses, and where its special tokens and own configuration come from."""

    tok: Tokenizer
    specials: list[str]
    own_dir: Path | None  # the folder of its own tokenizer_config.json, if it brings one
    from_base: bool  # the base model's (model.init_from), used as it is


def tokenize(
    cfg: Config, clean_dir: Path, *, out_dir: Path, base_dir: Path | None = None, previous: Path | None = None
) -> StageResult:
    """Build the tokenizer and write token shards of the train and val splits of ``clean_dir``.
    ``base_dir``: the base_model stage's folder; a model brought from elsewhere (model.init_from)
    brings its tokenizer, which is then used as it is (the tokenizer section does not apply).
    ``previous``: an earlier tokenize's folder (only read); if it was made with the same tokenizer
    (a retrain that warm-starts from the champion keeps the champion's), the documents it encoded
    are copied from its shards and only new or changed ones are encoded."""
    clean_dir, out_dir = Path(clean_dir), Path(out_dir)
    _check_clean_splits(clean_dir)
    t0 = time.perf_counter()
    chosen = _choose_tokenizer(cfg, clean_dir, base_dir)
    train_seconds = time.perf_counter() - t0
    tok = chosen.tok
    tok.save(str(out_dir / TOKENIZER))
    # Hugging Face's companion file, with the chat template instruction tuning and serving render with.
    chat_config = write_tokenizer_config(out_dir, tok, chosen.specials, chosen.own_dir)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    dtype = np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")
    ids = special_ids(tok, chosen.specials)
    # Text that happens to contain "<|endoftext|>" is encoded as plain text, never as the special
    # token: only the stage itself places document boundaries.
    tok.encode_special_tokens = True
    earlier = EarlierTokens.open(None if previous is None else Path(previous), out_dir / TOKENIZER, dtype)
    splits, written = _encode_splits(cfg.tokenizer, tok, clean_dir, out_dir, dtype, ids["eot_id"], earlier)
    _write_doc_indexes(out_dir, written)
    if splits["train"]["tokens"] == 0:
        raise DataError(f"{clean_dir / SPLITS['train']} holds no documents: nothing to train on")
    index = TokenIndex(
        dtype="uint16" if dtype.itemsize == 2 else "uint32",
        vocab_size=vocab_size,
        **ids,
        splits=splits,
        tokenizer=TOKENIZER,
        kind="base_model" if chosen.from_base else cfg.tokenizer.kind,
    )
    index.save(out_dir)
    return _tokenize_result(cfg, index, written, chat_config, train_seconds, time.perf_counter() - t0, previous)


def _check_clean_splits(clean_dir: Path) -> None:
    for name in SPLITS.values():
        if not (clean_dir / name).is_file():
            raise DataError(f"{clean_dir / name} does not exist: run the clean stage first")


def _choose_tokenizer(cfg: Config, clean_dir: Path, base_dir: Path | None) -> ChosenTokenizer:
    """The base model's tokenizer if it brings one, else the one the tokenizer section builds."""
    from lm.models.source import read_source

    source = read_source(base_dir) if base_dir is not None else None
    own_dir = Path(cfg.tokenizer.path).parent if cfg.tokenizer.kind == "file" else None  # its own config
    if source is not None and bool(source.get("tokenizer")):
        return ChosenTokenizer(load_tokenizer(Path(base_dir) / TOKENIZER), source["special_tokens"], Path(base_dir), True)
    tok = build_tokenizer(cfg.tokenizer, clean_dir / SPLITS["train"])
    return ChosenTokenizer(tok, cfg.tokenizer.special_tokens, own_dir, False)


def _encode_splits(
    cfg: TokenizerConfig, tok: Tokenizer, clean_dir: Path, out_dir: Path, dtype: np.dtype, eot_id: int,
    earlier: dict[str, EarlierTokens],
) -> tuple[dict[str, dict], dict[str, SplitTokens]]:
    """Each split's shards. Returns per split its index entry (files, tokens, documents) and what
    :func:`encode_split` wrote."""
    splits, written = {}, {}
    for split, name in SPLITS.items():
        writer = ShardWriter(out_dir, split, dtype, cfg.shard_tokens)
        written[split] = encode_split(tok, clean_dir / name, writer, eot_id, earlier.get(split))
        writer.close()
        splits[split] = {"files": writer.files, "tokens": writer.tokens, "documents": len(written[split].counts)}
    return splits, written


def _write_doc_indexes(out_dir: Path, written: dict[str, SplitTokens]) -> None:
    """Per split, :data:`DOC_INDEX`: what a retrain's tokenize reuses."""
    for split, w in written.items():
        docs = np.empty(len(w.counts), dtype=DOC_DTYPE)
        docs["digest"], docs["tokens"] = w.digests, w.counts
        np.save(out_dir / DOC_INDEX.format(split=split), docs)


def _tokenize_result(
    cfg: Config, index: TokenIndex, written: dict[str, SplitTokens], chat_config: str, train_seconds: float,
    seconds: float, previous: Path | None,
) -> StageResult:
    encoded = sum(w.encoded_tokens for w in written.values())
    encode_seconds = sum(w.encode_seconds for w in written.values())
    return StageResult(
        metrics={
            "tokenize/vocab_size": float(index.vocab_size),
            "tokenize/train_tokens": float(index.splits["train"]["tokens"]),
            "tokenize/val_tokens": float(index.splits["val"]["tokens"]),
            "tokenize/train_seconds": train_seconds,
            # The tokenizer's speed: tokens it encoded over the time it took (copied tokens not counted).
            "tokenize/tokens_per_s": encoded / max(encode_seconds, 1e-9),
            "tokenize/seconds": seconds,
            # Documents whose tokens were copied from an earlier tokenize with the same tokenizer.
            "tokenize/docs_reused": float(sum(w.reused for w in written.values())),
            "tokenize/docs_encoded": float(sum(len(w.counts) - w.reused for w in written.values())),
        },
        params={
            "dtype": index.dtype,
            # A tokenizer.json (kind=file) brings its own size, which the config leaves open (None).
            **({"tokenizer.vocab_size": index.vocab_size} if cfg.tokenizer.vocab_size is None else {}),
        },
        artifacts=[TOKENIZER, chat_config, INDEX],
        outputs={"tokenizer": TOKENIZER, "tokenizer_config": chat_config, "index": INDEX,
                 **{f"{split}_docs": DOC_INDEX.format(split=split) for split in SPLITS}},
        tags={"lmforge.extends": str(previous)} if any(w.reused for w in written.values()) else {},
    )
