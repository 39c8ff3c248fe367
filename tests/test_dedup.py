"""Dedup: planted near duplicates found with precision and recall >= 0.95, before the split."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lm.config import DataConfig, DedupConfig
from lm.data.clean import clean
from lm.data.dedup import MinHasher, exact_key, lsh_params, word_hashes


def words(rng: random.Random, vocab: list[str], n: int) -> list[str]:
    return [rng.choice(vocab) for _ in range(n)]


def as_text(ws: list[str]) -> str:
    return "\n".join(" ".join(ws[i : i + 10]) + "." for i in range(0, len(ws), 10))


def edit(rng: random.Random, ws: list[str], vocab: list[str], fraction: float) -> list[str]:
    """Substitute, delete or insert ``fraction`` of the words at random places."""
    ws = list(ws)
    for _ in range(max(1, round(fraction * len(ws)))):
        i = rng.randrange(len(ws))
        op = rng.random()
        if op < 0.5:
            ws[i] = rng.choice(vocab)
        elif op < 0.75:
            del ws[i]
        else:
            ws.insert(i, rng.choice(vocab))
    return ws


def test_planted_near_duplicates_precision_and_recall(tmp_path):
    rng = random.Random(1234)
    vocab = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
        for _ in range(5000)
    ]
    originals = [words(rng, vocab, rng.randint(150, 400)) for _ in range(400)]
    ids, texts, planted = [], [], set()
    for i, ws in enumerate(originals):
        ids.append(f"orig{i}")
        texts.append(as_text(ws))
    for j in range(100):  # a quarter of the originals get a copy with 2-4 % of the words edited
        src = rng.randrange(len(originals))
        ids.append(f"copy{j}_of{src}")
        texts.append(as_text(edit(rng, originals[src], vocab, rng.uniform(0.02, 0.04))))
        planted.add(ids[-1])
    order = list(range(len(ids)))
    rng.shuffle(order)
    order.sort(key=lambda k: not ids[k].startswith("orig"))  # copies after their originals
    table = pa.table(
        {"doc_id": [ids[k] for k in order], "source": ["t"] * len(order), "text": [texts[k] for k in order]}
    )
    pq.write_table(table, tmp_path / "documents.parquet", row_group_size=64)
    out = tmp_path / "out"
    out.mkdir()
    cfg = DataConfig(
        workers=1, val_fraction=0.2, dedup=DedupConfig(shingle_size=3, threshold=0.7, num_perm=128)
    )
    result = clean(cfg, tmp_path / "documents.parquet", out_dir=out)
    kept = set()
    for split in ("train", "val"):
        kept |= set(pq.read_table(out / f"{split}.parquet", columns=["doc_id"]).column(0).to_pylist())
    removed = set(ids) - kept
    true_pos = len(removed & planted)
    precision = true_pos / max(1, len(removed))
    recall = true_pos / len(planted)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    assert result.metrics["dedup/near_dups"] == len(removed)
    assert result.metrics["dedup/clusters"] >= 0.9 * len({i.split("_of")[1] for i in planted})
    # A person can judge the threshold from sampled pairs: each names a copy and its original.
    pairs = [json.loads(line) for line in (out / "dedup_samples.jsonl").read_text().splitlines()]
    near = [x for x in pairs if x["kind"] == "near"]
    assert len(near) == 10
    assert sum(x["dropped_id"].endswith("_of" + x["kept_id"].removeprefix("orig")) for x in near) >= 9
    assert all(0.5 < x["jaccard_estimate"] <= 1 and x["dropped_text"] and x["kept_text"] for x in near)
    # Dedup ran before the split: a found copy is gone from both sides, so the only copies that can
    # train on a validation document's near twin are the few that MinHash missed.
    val = set(pq.read_table(out / "val.parquet", columns=["doc_id"]).column(0).to_pylist())
    leaks = {i for i in planted if f"orig{i.split('_of')[1]}" in val and i in kept - val}
    assert leaks <= planted - removed


def test_minhash_estimates_jaccard():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(10_000)]
    a = words(rng, vocab, 2000)
    b = a[:1000] + words(rng, vocab, 1000)  # 1-shingles: Jaccard ~ 1000 / 3000
    sig, has = MinHasher(num_perm=256, shingle_size=1).signatures([" ".join(a), " ".join(b), ""])
    est = np.mean(sig[0] == sig[1])
    true = len(set(a) & set(b)) / len(set(a) | set(b))
    assert abs(est - true) < 0.08
    assert has.tolist() == [True, True, False]


def test_word_hashes_are_script_aware_and_position_independent():
    h, doc = word_hashes(["Hello, world!", "world 你好 hello"])
    assert doc.tolist() == [0, 0, 1, 1, 1, 1]
    assert h[0] == h[5] and h[1] == h[2]  # case-folded; the same word hashes the same anywhere
    assert len(set(h.tolist())) == 4  # hello, world, 你, 好


def test_exact_key_ignores_case_and_whitespace_only():
    assert exact_key("Hello   World\n") == exact_key("hello world")
    assert exact_key("hello world") != exact_key("hello, world")


def test_lsh_parameters_fit_the_threshold():
    bands, rows = lsh_params(0.8, 128)
    assert bands * rows <= 128
    # The S-curve's midpoint (1/b)^(1/r) sits near the threshold.
    assert abs((1 / bands) ** (1 / rows) - 0.8) < 0.1


def test_a_batch_longer_than_the_powers_cache_hashes_the_same(monkeypatch):
    # The cached powers are capped (so one huge batch does not pin their memory for the process's
    # life); past the cap they are computed for the batch: the hashes must not change.
    from lm.data import dedup

    rng = random.Random(0)
    texts = [" ".join(f"w{rng.randrange(500)}" for _ in range(3000)) for _ in range(4)]
    cached = word_hashes(texts)
    monkeypatch.setattr(dedup, "_POW_CACHE", {})
    monkeypatch.setattr(dedup, "_POW_CACHE_MAX", 1000)
    uncached = word_hashes(texts)
    assert dedup._POW_CACHE == {}
    np.testing.assert_array_equal(cached[0], uncached[0])
    np.testing.assert_array_equal(cached[1], uncached[1])
