"""Ingest: every source kind, provenance, and each kind of bad input counted or reported."""

from __future__ import annotations

import csv
import gzip
import json
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from lm.config import DataConfig
from lm.data.ingest import Documents, ingest
from lm.errors import DataError


def run(tmp_path: Path, sources: list[str], **kw) -> tuple[object, pd.DataFrame, pd.DataFrame]:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    result = ingest(DataConfig(sources=sources, **kw), out_dir=out)
    docs = Documents(out / result.outputs["documents"]).read().to_pandas()
    prov = pd.read_csv(out / result.outputs["provenance"], keep_default_na=False)
    return result, docs, prov


def jsonl_lines(n: int, field: str = "text") -> list[str]:
    return [json.dumps({field: f"document number {i} " * 5, "id": i}) for i in range(n)]


def test_mixed_sources_in_one_config(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("plain text file")
    (d / "sub" / "b.md").write_text("# markdown\n\nbody")
    (d / "sub" / "c.py").write_text("def f():\n    return 1\n")
    lines = "\n".join(jsonl_lines(3)) + "\n"
    (tmp_path / "r.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    (tmp_path / "r2.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    pd.DataFrame({"body": ["csv one", "csv, two"]}).to_csv(tmp_path / "t.csv.gz", index=False)
    pq.write_table(pa.table({"body": ["pq one", "pq two", "pq three"]}), tmp_path / "t.parquet")
    result, docs, prov = run(tmp_path, [str(d), str(tmp_path / "r.jsonl.gz"), str(tmp_path / "r2.jsonl.zst")])
    assert len(docs) == 3 + 3 + 3
    assert set(docs.columns) == {"doc_id", "source", "text"}
    assert docs.doc_id.is_unique
    assert "def f():\n    return 1\n" in set(docs.text)
    assert docs.text.str.startswith("document number 0").sum() == 2  # from .gz and from .zst
    assert result.metrics["ingest/documents"] == 9
    assert result.metrics["ingest/files"] == 5
    assert result.datasets[0]["path"] == "documents" and len(result.datasets[0]["digest"]) == 64
    # Tables: the column named by text_field, compressed CSV included.
    _, docs2, _ = run(tmp_path, [str(tmp_path / "t.csv.gz"), str(tmp_path / "t.parquet")], text_field="body")
    assert list(docs2.text) == ["csv one", "csv, two", "pq one", "pq two", "pq three"]


def test_provenance_and_deterministic_digest(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    for i in range(3):
        (d / f"{i}.txt").write_text(f"text {i}")
    r1, _, prov = run(tmp_path, [str(d)])
    assert list(prov.columns[:5]) == ["source", "path", "size", "sha256", "documents"]
    assert prov["documents"].tolist() == [1, 1, 1]
    assert prov["size"].tolist() == [6, 6, 6]
    r2, _, _ = run(tmp_path, [str(d)])
    assert r1.datasets[0]["digest"] == r2.datasets[0]["digest"]
    (d / "1.txt").write_text("changed")
    r3, _, _ = run(tmp_path, [str(d)])
    assert r3.datasets[0]["digest"] != r1.datasets[0]["digest"]


def test_invalid_utf8_is_decoded_with_replacement_and_counted(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "bad.txt").write_bytes(b"caf\xe9 au lait")
    (d / "good.txt").write_text("café", encoding="utf-8")
    result, docs, prov = run(tmp_path, [str(d)])
    assert "caf\ufffd au lait" in set(docs.text)
    assert result.metrics["ingest/invalid_utf8"] == 1
    assert prov.set_index(prov.path.map(lambda p: Path(p).name)).loc["bad.txt", "invalid_utf8"] == 1


def test_binary_files_are_skipped_and_counted(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (d / "text.txt").write_text("hello")
    result, docs, prov = run(tmp_path, [str(d)])
    assert list(docs.text) == ["hello"]
    assert result.metrics["ingest/binary_skipped"] == 1
    assert prov.binary_skipped.sum() == 1


def test_malformed_jsonl_lines_are_counted_with_line_numbers(tmp_path):
    lines = jsonl_lines(200)
    lines[4] = '{"text": "unterminated'
    lines[9] = "not json at all"
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result, docs, prov = run(tmp_path, [str(path)], max_bad_fraction=0.05)
    assert len(docs) == 198
    assert result.metrics["ingest/bad_jsonl_lines"] == 2
    assert prov.first_bad_lines[0] == "5 10"
    assert result.params["bad_lines_first"] == "r.jsonl: lines 5 10"


def test_too_many_malformed_jsonl_lines_fail_the_stage(tmp_path):
    lines = jsonl_lines(20)
    for i in (1, 3, 5):
        lines[i] = "{broken"
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"3 of 20 records.*lines 2, 4, 6.*max_bad_fraction"):
        run(tmp_path, [str(path)], max_bad_fraction=0.1)


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_missing_field_or_column_is_named_with_the_existing_ones(tmp_path, kind):
    path = tmp_path / f"t.{kind}"
    if kind == "jsonl":
        path.write_text("\n".join(jsonl_lines(3, field="content")))
    elif kind == "csv":
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows([["content", "id"], ["a", "1"]])
    else:
        pq.write_table(pa.table({"content": ["a"], "id": [1]}), path)
    with pytest.raises(DataError, match=r"'text'.*content, id"):
        run(tmp_path, [str(path)])


def test_missing_path_is_named(tmp_path):
    with pytest.raises(DataError, match="nowhere/at_all"):
        run(tmp_path, [str(tmp_path / "nowhere/at_all")])
    with pytest.raises(DataError, match="glob matches no files"):
        run(tmp_path, [str(tmp_path / "*.nothing")])


def test_empty_result_is_an_error(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "blob.bin").write_bytes(b"\x00\x01\x02")
    with pytest.raises(DataError, match="no documents.*1 binary files skipped"):
        run(tmp_path, [str(d)])


def test_stdlib_corpus_is_deterministic_and_capped(tmp_path):
    r1, docs, _ = run(tmp_path, ["stdlib"], max_docs=50)
    assert len(docs) == 50 and r1.metrics["ingest/documents"] == 50
    assert docs.doc_id.iloc[0].startswith("stdlib:") and docs.source.eq("stdlib").all()
    r2, docs2, _ = run(tmp_path, ["stdlib"], max_docs=50)
    assert docs.equals(docs2) and r1.datasets[0]["digest"] == r2.datasets[0]["digest"]


def test_hugging_face_source_fails_fast_and_clearly_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(DataError, match="hf:wikitext.*(pip install datasets|cannot be reached)"):
        run(tmp_path, ["hf:wikitext"])
    assert time.perf_counter() - start < 5


def test_row_groups_bound_memory(tmp_path):
    import pyarrow as pa

    d = tmp_path / "c"
    d.mkdir()
    for i in range(40):
        (d / f"{i:02d}.txt").write_text("x" * 30_000)
    run(tmp_path, [str(d)], row_group_mb=0.1)
    docs = Documents(tmp_path / "out" / "documents")
    assert docs.num_row_groups >= 10 and docs.num_rows == 40

    def peak_bytes(read) -> int:
        """Arrow's peak allocation while ``read`` runs (a pool of its own counts only that)."""
        default = pa.default_memory_pool()
        pool = pa.proxy_memory_pool(default)
        pa.set_memory_pool(pool)
        try:
            read()
        finally:
            pa.set_memory_pool(default)
        return pool.max_memory()

    def group_by_group() -> None:
        for g in range(docs.num_row_groups):
            assert docs.read_row_group(g, ["text"]).num_rows >= 1

    text_bytes = 40 * 30_000
    whole = peak_bytes(lambda: Documents(tmp_path / "out" / "documents").read())
    assert whole >= text_bytes  # the measure sees a whole read
    # A reader going group by group holds about one group (0.1 MB of text), not the corpus.
    assert peak_bytes(group_by_group) < 0.3 * text_bytes


def test_long_text_file_is_cut_at_line_breaks_into_pieces_that_join_back(tmp_path):
    # A nanoGPT-style corpus: one big text file. Read in 1 MiB chunks and cut into documents of at
    # most max_doc_chars, so neither ingest nor a later stage ever holds the whole file as one text.
    from lm.data import sources

    d = tmp_path / "c"
    d.mkdir()
    lines = [f"line {i}: " + "é" * (i % 50) + "\n" for i in range(60_000)]  # 2-byte chars straddle chunks
    text = "".join(lines)
    assert len(text.encode()) > 2 * sources.READ_CHUNK
    (d / "big.txt").write_text(text, encoding="utf-8")
    (d / "small.txt").write_text("short\n")
    result, docs, prov = run(tmp_path, [str(d)], max_doc_chars=200_000)
    big = docs[docs.doc_id.str.startswith("big.txt")]
    assert list(big.doc_id) == ["big.txt"] + [f"big.txt#{i}" for i in range(1, len(big))]
    assert len(big) >= len(text) // 200_000
    assert "".join(big.text) == text  # nothing lost, nothing added
    assert big.text.str.len().max() <= 200_000
    assert big.text.iloc[:-1].str.endswith("\n").all()  # cut after a line break
    assert result.metrics["ingest/split_documents"] == 1 and result.metrics["ingest/invalid_utf8"] == 0
    assert docs.set_index("doc_id").loc["small.txt", "text"] == "short\n"
    assert prov.set_index(prov.path.map(lambda p: Path(p).name)).loc["big.txt", "split"] == 1
    assert result.params["max_doc_chars"] == 200_000


def test_long_record_and_a_line_without_breaks_are_cut_too(tmp_path):
    long_record = "word " * 50_000  # 250,000 characters, one line
    (tmp_path / "r.jsonl").write_text(
        json.dumps({"text": long_record}) + "\n" + json.dumps({"text": "ok"}) + "\n"
    )
    result, docs, _ = run(tmp_path, [str(tmp_path / "r.jsonl")], max_doc_chars=100_000)
    ids = [i.rpartition("/")[2] for i in docs.doc_id]  # a single-file source's ids carry its path
    assert ids == ["r.jsonl:1", "r.jsonl:1#1", "r.jsonl:1#2", "r.jsonl:2"]
    assert "".join(docs.text[:3]) == long_record and docs.text.str.len().max() == 100_000
    assert result.metrics["ingest/split_documents"] == 1


def test_invalid_utf8_after_the_first_chunk_is_counted_once(tmp_path):
    from lm.data import sources

    d = tmp_path / "c"
    d.mkdir()
    good = ("ü" * 1000 + "\n").encode() * ((sources.READ_CHUNK // 2001) + 5)
    (d / "late.txt").write_bytes(good + b"\xff\xfe broken \xc3" + "ö".encode())
    (d / "z.txt").write_text("a file in UTF-8 beside it")  # one file in two not UTF-8: read, not refused
    result, docs, _ = run(tmp_path, [str(d)])
    assert result.metrics["ingest/invalid_utf8"] == 1
    assert docs.text.iloc[0] == good.decode() + "\ufffd\ufffd broken \ufffdö"


def test_a_file_named_by_two_sources_is_read_once(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "a.txt").write_text("alpha")
    (d / "b.txt").write_text("beta")
    result, docs, prov = run(tmp_path, [str(d), str(d / "a.txt"), str(d / "*.txt")])
    assert sorted(docs.text) == ["alpha", "beta"] and result.metrics["ingest/files"] == 2
    assert len(prov) == 2


def test_a_retrain_links_the_parts_it_did_not_change_and_rewrites_the_one_it_did(tmp_path):
    """Parts end after files chosen by their name's hash: a changed file and a new one beside it
    move no boundary but their own part's, so a retrain hard-links every other earlier part and
    writes what a full ingest of the same files writes."""
    import os

    from lm.data.ingest import DOCUMENTS

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(400):
        (corpus / f"{i:04d}.txt").write_text(f"file {i}: " + "words in a file " * (5 + i % 7))
    cfg = DataConfig(sources=[str(corpus)])
    first, second, full = tmp_path / "first", tmp_path / "second", tmp_path / "full"
    for d in (first, second, full):
        d.mkdir()
    r1 = ingest(cfg, out_dir=first)
    parts = int(r1.metrics["ingest/parts"])
    assert parts >= 3 and sorted(p.name for p in (first / DOCUMENTS).iterdir())[-1] == f"part-{parts - 1:05d}.parquet"
    (corpus / "0200.txt").write_text("file 200, changed: " + "other words " * 9)
    (corpus / "0200b.txt").write_text("a new file beside it " * 4)
    r2 = ingest(cfg, out_dir=second, previous=first)
    assert r2.metrics["ingest/files_read"] == 2
    assert r2.metrics["ingest/parts_linked"] == parts - 1 and r2.metrics["ingest/parts"] == parts
    ingest(cfg, out_dir=full)
    names = sorted(p.name for p in (full / DOCUMENTS).iterdir())
    assert names == sorted(p.name for p in (second / DOCUMENTS).iterdir())
    linked = 0
    for name in names:
        assert (second / DOCUMENTS / name).read_bytes() == (full / DOCUMENTS / name).read_bytes(), name
        linked += os.stat(second / DOCUMENTS / name).st_ino == os.stat(first / DOCUMENTS / name).st_ino
    assert linked == parts - 1  # the same file, not a copy
    for name in ("doc_digests.npy", "provenance.csv"):
        assert (second / name).read_bytes() == (full / name).read_bytes(), name
    texts = Documents(second / DOCUMENTS).read().to_pandas().set_index("doc_id").text
    assert texts["0200.txt"].startswith("file 200, changed") and "0200b.txt" in texts and len(texts) == 401


def test_documents_are_read_with_one_part_file_open_at_a_time(tmp_path):
    """A large corpus has thousands of parts: more than a process may keep open (ulimit -n)."""
    import resource

    from lm.data.ingest import DOCUMENTS, PART

    folder = tmp_path / DOCUMENTS
    folder.mkdir()
    for i in range(300):
        pq.write_table(pa.table({"doc_id": [f"d{i}"], "source": ["s"], "text": [f"text {i}"]}), folder / PART.format(i))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        docs = Documents(folder)
        assert docs.num_row_groups == 300 and docs.num_rows == 300
        assert [docs.read_row_group(g).column("text")[0].as_py() for g in range(300)] == [f"text {i}" for i in range(300)]
        assert docs.column("doc_id") == [f"d{i}" for i in range(300)]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_an_ingest_into_a_folder_that_holds_an_earlier_one_replaces_its_parts(tmp_path):
    """Part boundaries follow file names: a folder of 200 files makes several parts, one file one
    part. Written into the same folder, the second ingest's documents are all that is read back."""
    from lm.data.ingest import DOCUMENTS, ends_part

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(200):
        (corpus / f"{i:04d}.txt").write_text(f"file {i}")
    assert sum(ends_part(f"{i:04d}.txt") for i in range(199)) >= 1  # the names make several parts
    first, _, _ = run(tmp_path, [str(corpus)])
    assert first.metrics["ingest/parts"] >= 2
    second, docs, _ = run(tmp_path, [str(corpus / "0007.txt")])
    assert second.metrics["ingest/parts"] == 1 and list(docs.text) == ["file 7"]
    assert len(list((tmp_path / "out" / DOCUMENTS).iterdir())) == 1
