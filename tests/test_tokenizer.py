"""Tokenizer kinds: saved, loadable, byte-exact round trips in every script; shards and index."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from lm.config import SPECIAL_TOKENS, Config, TokenizerConfig
from lm.text.chat import CHATML, PLAIN_TEXT
from lm.text.shards import TokenShards
from lm.text.tokenize_stage import tokenize
from lm.text.tokenizer import load_tokenizer

DOCS = [
    "机器学习是人工智能的一个分支，它研究计算机如何从数据中自动学习规律。",
    "機械学習は人工知能の一分野であり、コンピュータがデータから規則を学びます。",
    "Машинное обучение изучает, как компьютеры находят закономерности в данных.",
    "Emoji: 🎉 👨‍👩‍👧‍👦 🏳️‍🌈 and combining marks: e\u0301, Å, ﬁ ligature, \u00a0nbsp.",
    "def f(x: int) -> int:\n\t# tabs, \\ backslashes, 'quotes'\n    return x ** 2  # <|endoftext|> in text\n",
    "  leading spaces, trailing spaces   \n\n\n",
    "control \x01\x02 chars and a lone \r carriage return",
]


def write_split(dir_: Path, name: str, texts: list[str]) -> None:
    ids = [f"{name}{i}" for i in range(len(texts))]
    pq.write_table(
        pa.table({"doc_id": ids, "source": ["t"] * len(ids), "text": texts}), dir_ / f"{name}.parquet"
    )


@pytest.fixture
def clean_dir(tmp_path) -> Path:
    d = tmp_path / "clean"
    d.mkdir()
    train = DOCS * 20 + [f"document {i} says hello to the world in plain English." for i in range(200)]
    write_split(d, "train", train)
    write_split(d, "val", DOCS)
    return d


def run(clean_dir: Path, out: Path, **tok) -> tuple[object, dict]:
    out.mkdir()
    cfg = Config(tokenizer=TokenizerConfig(**tok))
    result = tokenize(cfg, clean_dir, out_dir=out)
    return result, json.loads((out / "index.json").read_text())


@pytest.mark.parametrize("kind", ["bpe", "byte"])
def test_every_document_round_trips_byte_for_byte(clean_dir, tmp_path, kind):
    result, index = run(clean_dir, tmp_path / kind, kind=kind, vocab_size=400)
    tok = Tokenizer.from_file(str(tmp_path / kind / "tokenizer.json"))
    for doc in DOCS:
        ids = tok.encode(doc, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == doc
    # The shards hold exactly the documents, each followed by the end-of-text token.
    val = TokenShards(tmp_path / kind, "val")
    stream = val.window(0, val.num_tokens)
    assert stream[-1] == index["eot_id"]
    pieces = np.split(stream, np.flatnonzero(stream == index["eot_id"]) + 1)[:-1]
    assert [tok.decode(p[:-1].tolist(), skip_special_tokens=False) for p in pieces] == DOCS
    assert index["dtype"] == "uint16" and index["vocab_size"] == tok.get_vocab_size()
    assert result.metrics["tokenize/val_tokens"] == val.num_tokens == index["splits"]["val"]["tokens"]
    assert result.metrics["tokenize/tokens_per_s"] > 0


def test_byte_tokenizer_is_256_bytes_plus_specials(clean_dir, tmp_path):
    _, index = run(clean_dir, tmp_path / "b", kind="byte")
    tok = load_tokenizer(tmp_path / "b" / "tokenizer.json")
    assert index["vocab_size"] == 256 + len(SPECIAL_TOKENS)
    assert (index["eot_id"], index["pad_id"], index["mask_id"]) == (256, 257, 258)
    assert tok.encode("A€", add_special_tokens=False).ids == [65, 0xE2, 0x82, 0xAC]


def test_bpe_learns_merges_and_respects_vocab_size(clean_dir, tmp_path):
    result, index = run(clean_dir, tmp_path / "bpe", kind="bpe", vocab_size=500)
    assert 300 < index["vocab_size"] <= 500
    tok = load_tokenizer(tmp_path / "bpe")
    assert len(tok.encode("document says hello to the world").ids) < len("document says hello to the world")
    assert result.outputs == {
        "tokenizer": "tokenizer.json", "tokenizer_config": "tokenizer_config.json", "index": "index.json",
        "train_docs": "train_docs.npy", "val_docs": "val_docs.npy",
    }


def test_file_tokenizer_reuses_an_existing_tokenizer_json(clean_dir, tmp_path):
    run(clean_dir, tmp_path / "first", kind="bpe", vocab_size=400)
    _, index = run(
        clean_dir, tmp_path / "second", kind="file", path=str(tmp_path / "first" / "tokenizer.json")
    )
    a = load_tokenizer(tmp_path / "first" / "tokenizer.json")
    b = load_tokenizer(tmp_path / "second" / "tokenizer.json")
    assert a.get_vocab() == b.get_vocab()
    first = TokenShards(tmp_path / "first", "train")
    second = TokenShards(tmp_path / "second", "train")
    assert np.array_equal(first.window(0, first.num_tokens), second.window(0, second.num_tokens))


def test_the_tokenizer_config_carries_the_chat_template_and_special_tokens(clean_dir, tmp_path):
    run(clean_dir, tmp_path / "chatml", kind="bpe", vocab_size=400)
    config = json.loads((tmp_path / "chatml" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHATML and config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["eos_token"], config["pad_token"], config["bos_token"]) == ("<|endoftext|>", "<|pad|>", None)
    # A tokenizer file that comes with its own template keeps it ...
    own = tmp_path / "own"
    own.mkdir()
    (own / "tokenizer.json").write_bytes((tmp_path / "chatml" / "tokenizer.json").read_bytes())
    (own / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}"}))
    run(clean_dir, tmp_path / "file", kind="file", path=str(own / "tokenizer.json"))
    assert json.loads((tmp_path / "file" / "tokenizer_config.json").read_text())["chat_template"] == (
        "{{ messages[0]['content'] }}"
    )
    # ... and one without the ChatML tokens gets the plain-text template.
    run(clean_dir, tmp_path / "plain", kind="byte", special_tokens=["<|endoftext|>", "<|pad|>"])
    assert json.loads((tmp_path / "plain" / "tokenizer_config.json").read_text())["chat_template"] == PLAIN_TEXT


def test_shards_are_cut_at_the_configured_size(clean_dir, tmp_path):
    _, index = run(clean_dir, tmp_path / "s", kind="byte", shard_tokens=1000)
    files = index["splits"]["train"]["files"]
    assert len(files) > 3 and files[0] == "train_00000.bin"
    sizes = [(tmp_path / "s" / f).stat().st_size // 2 for f in files]
    assert all(s == 1000 for s in sizes[:-1]) and sum(sizes) == index["splits"]["train"]["tokens"]


def _tricky_text(n_lines: int) -> str:
    """Lines that end every way the pre-tokenizer cares about: in letters, digits, punctuation,
    spaces, tabs, blank runs, CRLF, CJK, emoji."""
    endings = ["word", "42", "();", "   ", "\t", "", "é", "。", "🎉", " x", "\r", "'s", "  y  "]
    lines = []
    for i in range(n_lines):
        indent = " " * (i % 5) + "\t" * (i % 2 == 0 and i % 3 == 0)
        lines.append(f"{indent}line {i} {DOCS[i % len(DOCS)][:20]}{endings[i % len(endings)]}")
    return "\n".join(lines) + "\n\n \n"


@pytest.mark.parametrize("kind", ["bpe", "byte"])
def test_long_documents_are_encoded_in_pieces_with_the_same_tokens(clean_dir, tmp_path, monkeypatch, kind):
    # The encoder's memory grows with the text it encodes at once, so long documents are encoded in
    # pieces cut before a line break; the tokens must be exactly those of the whole document.
    import lm.text.tokenize_stage as T

    run(clean_dir, tmp_path / "tok", kind=kind, vocab_size=400)
    tok = load_tokenizer(tmp_path / "tok")
    tok.encode_special_tokens = True
    assert T.can_encode_in_pieces(tok)
    text = _tricky_text(3000)
    bounds = list(T.encoding_pieces(text, 500))
    assert len(bounds) > 50 and "".join(text[a:b] for a, b in bounds) == text
    whole = tok.encode(text, add_special_tokens=False).ids
    pieces = [i for a, b in bounds for i in tok.encode(text[a:b], add_special_tokens=False).ids]
    assert pieces == whole
    # Through the stage: one long validation document, a short one; each ends with one end-of-text.
    d = tmp_path / "clean2"
    d.mkdir()
    write_split(d, "train", DOCS * 5)
    write_split(d, "val", [text, "short"])
    monkeypatch.setattr(T, "ENCODE_PIECE_CHARS", 500)
    cfg = Config(tokenizer=TokenizerConfig(kind="file", path=str(tmp_path / "tok" / "tokenizer.json")))
    (tmp_path / "out").mkdir()
    tokenize(cfg, d, out_dir=tmp_path / "out")
    val = TokenShards(tmp_path / "out", "val")
    eot = val.eot_id
    short = tok.encode("short", add_special_tokens=False).ids
    assert val.window(0, val.num_tokens).tolist() == whole + [eot] + short + [eot]


def test_a_tokenizer_whose_tokens_depend_on_the_cut_is_encoded_whole():
    from tokenizers import models, pre_tokenizers

    import lm.text.tokenize_stage as T

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)  # a space before every text
    assert not T.can_encode_in_pieces(tok)
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    assert not T.can_encode_in_pieces(tok)
    assert list(T.encoding_pieces("a\nb" * 1000, None)) == [(0, 3000)]
