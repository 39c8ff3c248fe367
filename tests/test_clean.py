"""Clean: filters (script-aware, code preset, PII), the runner's reasons, the split, the outputs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lm.config import CleanConfig, DataConfig
from lm.data.clean import clean
from lm.data.filters import Document, build_filters, redact_pii, run_filters
from lm.data.sources import stdlib_root
from lm.errors import DataError

CHINESE = (
    "机器学习是人工智能的一个分支，它研究计算机如何从数据中自动学习规律。语言模型通过阅读大量文本来预测下一个词，"
    "从而掌握语法和常识。训练一个好的模型需要干净的数据、合理的分词方法以及足够的计算资源。\n"
    "在实际工程中，数据清洗往往比模型结构本身更加重要，因为重复和低质量的文本会降低模型的表现。研究人员通常会先去除"
    "重复文档，再过滤掉过短或者含有大量符号的页面，最后把文本切分成训练集和验证集。"
)
JAPANESE = (
    "機械学習は人工知能の一分野であり、コンピュータがデータから規則を自動的に学ぶ方法を研究します。言語モデルは大量の"
    "文章を読んで次の単語を予測することで、文法や常識を身につけます。\n良いモデルを訓練するには、きれいなデータと適切"
    "な分かち書き、そして十分な計算資源が必要です。実際の開発では、データの前処理がモデルの構造よりも重要になることが"
    "よくあります。重複した文書や品質の低い文章は性能を下げるため、まず取り除かれます。"
)
RUSSIAN = (
    "Машинное обучение является разделом искусственного интеллекта, который изучает, как компьютеры находят "
    "закономерности в данных. Языковая модель читает большое количество текстов и учится предсказывать следующее "
    "слово, постепенно усваивая грамматику и знания о мире.\nДля обучения хорошей модели нужны чистые данные, "
    "продуманная токенизация и достаточные вычислительные ресурсы. На практике подготовка данных часто оказывается "
    "важнее самой архитектуры модели, потому что дубликаты и мусорные страницы ухудшают качество."
)
ENGLISH = (
    "Machine learning is a branch of artificial intelligence that studies how computers find patterns in data. "
    "A language model reads a large amount of text and learns to predict the next word, slowly picking up grammar "
    "and knowledge about the world.\nTraining a good model needs clean data, a sensible tokenizer and enough "
    "compute. In practice, preparing the data often matters more than the architecture of the model itself."
)


def keep(text: str, **cfg) -> str | None:
    return run_filters(build_filters(CleanConfig(**cfg)), Document("d", text))


@pytest.mark.parametrize("text", [CHINESE, JAPANESE, RUSSIAN, ENGLISH], ids=["zh", "ja", "ru", "en"])
def test_prose_in_other_scripts_passes_the_default_filters(text):
    assert keep(text) is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("short", "too_short"),
        ("word " * 100, "top_2gram"),
        (
            "supercalifragilisticexpialidocious " * 3 + "antidisestablishmentarianism " * 10,
            "mean_word_len_high",
        ),
        ("# " * 30 + ENGLISH, "symbol_ratio"),
        (" ".join(str(1000 + 7 * i) for i in range(100)), "alpha_ratio"),
        ("\n".join(["the same line again"] * 12 + [ENGLISH]), "dup_lines"),
    ],
)
def test_gopher_rules_drop_with_a_reason(text, reason):
    assert keep(text) == reason


def test_each_rule_is_configurable():
    text = "\n".join(["the same line again"] * 12 + [ENGLISH])
    assert keep(text) == "dup_lines"
    assert keep(text, max_dup_line_fraction=None, max_top_ngram_fraction=None) is None
    assert keep(ENGLISH, min_chars=10_000) == "too_short"


def test_code_preset_keeps_python_source_and_drops_minified_blobs():
    root = stdlib_root()
    for name in ("json/decoder.py", "functools.py", "asyncio/queues.py", "email/utils.py"):
        assert keep((root / name).read_text(), preset="code") is None, name
    # The prose rules would throw real code away; the code preset exists for that reason.
    assert keep((root / "functools.py").read_text(), preset="prose") is not None
    assert keep("var a=1;" * 500, preset="code") == "line_too_long"
    assert keep("==== ---- ;;;; ////\n" * 40, preset="code") == "alnum_ratio"


def test_unicode_normalisation_and_control_characters():
    doc = Document("d", "Cafe\u0301 \x00ok\r\nline\x07 two \ufeff")
    assert build_filters(CleanConfig(min_chars=1))[0](doc) is None
    assert doc.text == "Caf\u00e9 ok\nline two "
    assert doc.counts["clean/control_chars_removed"] == 3


def test_pii_is_redacted_and_counted_per_kind():
    doc = Document(
        "d",
        "Write to jane.doe@example.org or call +1 415-555-2671 / (212) 555-0100. "
        "The server is at 192.168.10.1, version 3.11.7 is not an address, nor is 1000 2000 3000.",
    )
    redact_pii(doc)
    assert doc.text == (
        "Write to <EMAIL> or call <PHONE> / <PHONE>. The server is at <IP>, version 3.11.7 is not an "
        "address, nor is 1000 2000 3000."
    )
    assert doc.counts == {"pii/email": 1, "pii/phone": 2, "pii/ip": 1}


def write_docs(path: Path, texts: list[str]) -> Path:
    ids = [f"doc{i}" for i in range(len(texts))]
    pq.write_table(
        pa.table({"doc_id": ids, "source": ["test"] * len(texts), "text": texts}), path, row_group_size=16
    )
    return path


def random_prose(rng: random.Random, vocab: list[str], n_words: int) -> str:
    words = [rng.choice(vocab) for _ in range(n_words)]
    lines = [" ".join(words[i : i + 12]) + "." for i in range(0, n_words, 12)]
    return "\n".join(lines)


def make_vocab(rng: random.Random, n: int = 3000) -> list[str]:
    return [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(n)
    ]


def test_clean_stage_outputs_metrics_and_deterministic_split(tmp_path):
    rng = random.Random(0)
    vocab = make_vocab(rng)
    texts = [random_prose(rng, vocab, 120) for _ in range(100)]
    texts += [
        CHINESE,
        JAPANESE,
        RUSSIAN,
        "tiny",
        texts[0],
        texts[1].upper(),
        "Mail me: a.b@example.com. " + ENGLISH,
    ]
    docs = write_docs(tmp_path / "documents.parquet", texts)
    cfg = DataConfig(val_fraction=0.2, workers=1)
    out1, out2 = tmp_path / "a", tmp_path / "b"
    out1.mkdir(), out2.mkdir()
    r = clean(cfg, docs, out_dir=out1)
    m = r.metrics
    assert m["clean/docs_in"] == 107
    assert m["clean/dropped/too_short"] == 1
    assert m["dedup/exact_dups"] == 2  # a verbatim copy and a case-only copy
    assert m["clean/pii/email"] == 1
    assert m["clean/docs_out"] == m["clean/train_docs"] + m["clean/val_docs"] == 104
    assert 5 <= m["clean/val_docs"] <= 40
    for name in ("train.parquet", "val.parquet", "stats.json", "dropped_samples.jsonl", "length_hist.png"):
        assert (out1 / name).is_file(), name
    assert not (out1 / "_parts").exists()
    train = pq.read_table(out1 / "train.parquet").to_pandas()
    val = pq.read_table(out1 / "val.parquet").to_pandas()
    assert set(train.columns) == {"doc_id", "source", "text"}
    assert set(train.doc_id).isdisjoint(val.doc_id)
    assert {CHINESE, JAPANESE, RUSSIAN} <= set(train.text) | set(val.text)
    samples = [json.loads(line) for line in (out1 / "dropped_samples.jsonl").read_text().splitlines()]
    assert {s["reason"] for s in samples} == {"too_short"} and samples[0]["text"] == "tiny"
    pairs = [json.loads(line) for line in (out1 / "dedup_samples.jsonl").read_text().splitlines()]
    assert sorted((x["kind"], x["dropped_id"], x["kept_id"]) for x in pairs) == [
        ("exact", "doc104", "doc0"),
        ("exact", "doc105", "doc1"),
    ]
    assert "dedup_samples.jsonl" in r.artifacts
    stats = json.loads((out1 / "stats.json").read_text())
    assert stats["dropped"] == {"too_short": 1}
    # Reproducible: same input and config, same split, also with a process pool.
    clean(cfg.model_copy(update={"workers": 2}), docs, out_dir=out2)
    for name in ("train.parquet", "val.parquet"):
        a = pq.read_table(out1 / name).to_pandas()
        b = pq.read_table(out2 / name).to_pandas()
        pd.testing.assert_frame_equal(a, b)


def test_everything_removed_names_the_filter(tmp_path):
    docs = write_docs(tmp_path / "documents.parquet", ["short one", "short two", "x"])
    with pytest.raises(DataError, match=r"removed all 3 documents \(too_short: 3\)"):
        clean(DataConfig(workers=1), docs, out_dir=tmp_path)


def test_one_long_text_is_kept_once_ingest_cuts_it_below_the_length_limit(tmp_path):
    # A nanoGPT-style corpus: one big prose file. Whole, it is longer than the prose preset's
    # max_chars and the error says how to cut it; cut by ingest, it passes.
    from lm.data.ingest import ingest

    rng = random.Random(0)
    text = random_prose(rng, make_vocab(rng), 75_000) + "\n"  # ~500k characters
    (tmp_path / "input.txt").write_text(text)
    cfg = DataConfig(sources=[str(tmp_path / "input.txt")], workers=1)
    for sub in ("a", "b", "c", "d"):
        (tmp_path / sub).mkdir()
    ingest(cfg, out_dir=tmp_path / "a")
    with pytest.raises(DataError, match=r"too_long: 1\).*data\.max_doc_chars=200000"):
        clean(cfg, tmp_path / "a" / "documents", out_dir=tmp_path / "b")
    cut = cfg.model_copy(update={"max_doc_chars": 200_000})
    ingest(cut, out_dir=tmp_path / "c")
    r = clean(cut, tmp_path / "c" / "documents", out_dir=tmp_path / "d")
    assert r.metrics["clean/docs_in"] == 3 and r.metrics["clean/docs_out"] == 3


def test_process_pool_under_a_threaded_caller_matches_one_process(tmp_path):
    """A Prefect worker has threads: the pool then spawns instead of forking, with the same result."""
    import threading

    rng = random.Random(1)
    vocab = make_vocab(rng)
    docs = write_docs(tmp_path / "documents.parquet", [random_prose(rng, vocab, 100) for _ in range(40)])
    stop = threading.Event()
    busy = threading.Thread(target=stop.wait, daemon=True)
    busy.start()
    try:
        (tmp_path / "pool").mkdir()
        pooled = clean(DataConfig(workers=2), docs, out_dir=tmp_path / "pool")
    finally:
        stop.set()
    (tmp_path / "one").mkdir()
    single = clean(DataConfig(workers=1), docs, out_dir=tmp_path / "one")
    assert pooled.metrics["clean/train_docs"] == single.metrics["clean/train_docs"]
    for name in ("train.parquet", "val.parquet"):
        pd.testing.assert_frame_equal(
            pq.read_table(tmp_path / "pool" / name).to_pandas(),
            pq.read_table(tmp_path / "one" / name).to_pandas(),
        )
