"""Clean: filters -> exact + near dedup -> deterministic train/val split.

Work is split into parts (row groups of the ingested documents). Each part is cleaned by
:func:`clean_part`, in a process pool over every core, or (``data.dask_address``) as Prefect
tasks on a Dask cluster through Prefect's DaskTaskRunner (``tasks/cluster.py``): it runs the
filters, writes its surviving documents to a part file and returns small arrays (per document:
its verdict, dedup hashes, MinHash signature, split hash). The driver then finds exact and near
duplicates over the whole corpus, BEFORE the split, so no near copy of a validation document is
trained on, and streams the part files into ``train.parquet`` and ``val.parquet``. Memory holds
one part's text per worker plus ~(bands * 8 + 150) bytes and the id of each document; signatures
go to a file that is memory-mapped for verification.

Which copy of a duplicate survives does not depend on the order documents are processed in: the
first in corpus order (data.sources in order, each one's files as ingest lists them, sorted). The
split is by content hash (:func:`split_hash`): a document's assignment never changes while its
text does not, whatever else is added or removed.

A retrain extends an earlier clean (``previous``, same settings): ``dedup_index.parquet`` holds
what it decided for every document (filter verdict, counts, dedup and split hashes) and
``dedup_signatures.u32`` the MinHash signatures, and ``duplicates.parquet`` the cleaned text of
the duplicates it dropped (one comes back when the copy kept instead of it is removed), so only new
or changed documents (matched by id and :func:`lm.data.ingest.document_digest`) go through the
filters and MinHash; the duplicate search and the split run over old and new together. The outputs are those a full clean of the
same documents writes: the same documents kept, the same split, the same bytes. (An extended clean
holds the earlier cleaned text in memory, as Arrow data: the whole corpus once.)

``plan_parts`` / ``clean_part`` / ``finish_clean`` are the map and reduce steps that ``clean``
composes; its ``map_parts`` argument says where the map step runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lm.config import DataConfig
from lm.data.batching import char_bounded
from lm.data.dedup import MinHasher, band_keys, exact_key, lsh_params, near_duplicates
from lm.data.filters import Document, build_filters, run_filters
from lm.data.ingest import DIGESTS, SCHEMA, Documents, document_digest
from lm.errors import DataError
from lm.fileio import file_sha256
from lm.memory import trim_heap
from lm.pipeline.stage import StageResult

TRAIN, VAL = "train.parquet", "val.parquet"
STATS, DROPPED, HIST = "stats.json", "dropped_samples.jsonl", "length_hist.png"
DEDUP_PAIRS = "dedup_samples.jsonl"  # (dropped, kept) duplicate pairs, to judge the threshold
DROPPED_PLOT = "dropped_by_reason.png"
DEDUP_SAMPLES = 10  # pairs of each kind (exact, near)
SAMPLE_CHARS = 2000  # characters of each dropped document kept for a person to judge the filter
MINHASH_CHARS = 1_000_000
HIST_BINS = np.logspace(0, 7, 71)  # document length in characters, 1 .. 10M, 10 bins per decade
# What this clean decided per document, for the retrain that extends it (see the module docstring).
INDEX, SIGNATURES = "dedup_index.parquet", "dedup_signatures.u32"
DUPLICATES = "duplicates.parquet"  # cleaned text of the documents dropped as duplicates
INDEX_VERSION = "1"
INDEX_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("digest", pa.uint64()),  # lm.data.ingest.document_digest(source, text)
        ("reason", pa.string()),  # why the filters dropped it; null: it passed them
        ("chars", pa.int64()),  # as ingested
        ("bytes", pa.int64()),
        ("counts", pa.string()),  # JSON of what the filters counted in it (PII, control characters)
        # The rest only for documents that passed the filters.
        ("exact", pa.uint64()),
        ("split", pa.uint64()),
        ("has_shingles", pa.bool_()),
        ("kept", pa.bool_()),  # not a duplicate: in train.parquet or val.parquet
    ]
)


@dataclass
class PartTask:
    """One unit of work: some row groups of a documents parquet file (``rows``: only these rows of
    them), cleaned into ``out_path``."""

    index: int
    documents: str
    row_groups: list[int]
    out_path: str
    rows: list[int] | None = None


@dataclass
class PartResult:
    """Per document of the part (in order): its verdict and counts; per document that passed the
    filters: its dedup and split hashes (its cleaned text is in the part file)."""

    index: int
    doc_id: list[str] = field(default_factory=list)
    digest: list[int] = field(default_factory=list)
    reason: list[str | None] = field(default_factory=list)
    chars: list[int] = field(default_factory=list)
    bytes: list[int] = field(default_factory=list)
    counts: list[str] = field(default_factory=list)
    samples: dict[str, list[dict]] = field(default_factory=dict)  # the first dropped per reason (+ "row")
    exact: np.ndarray | None = None  # uint64 (kept,)
    signatures: np.ndarray | None = None  # uint32 (kept, num_perm)
    has_shingles: np.ndarray | None = None  # bool (kept,)
    split_hash: np.ndarray | None = None  # uint64 (kept,)
    seconds: float = 0.0

    @property
    def docs_kept(self) -> int:
        return len(self.exact)


def plan_parts(documents: Path, scratch: Path) -> list[PartTask]:
    """One part per row group of ``documents`` (ingest's folder of parts, or one parquet file):
    ingest bounds a row group's size (data.row_group_mb), so a worker's memory does not grow with
    the corpus."""
    docs = Documents(documents)
    return [PartTask(i, *_located(docs, i), str(scratch / f"part_{i:05d}.parquet")) for i in range(docs.num_row_groups)]


def _located(docs: Documents, group: int) -> tuple[str, list[int]]:
    """(file, [row group in it]) of a row group of the documents: what a :class:`PartTask` names."""
    file, local = docs.locate(group)
    return file, [local]


def split_hash(text: str, seed: int) -> int:
    """Deterministic per-text value in [0, 2^64): the split depends on content, not on order."""
    h = hashlib.blake2b(
        text.encode("utf-8", errors="surrogatepass"), digest_size=8, key=seed.to_bytes(8, "little")
    )
    return int.from_bytes(h.digest(), "little")


def clean_part(task: PartTask, cfg: DataConfig) -> PartResult:
    """Filter one part, write its kept documents, return per-document verdicts and hashes."""
    start = time.perf_counter()
    filters = build_filters(cfg.clean)
    res = PartResult(task.index)
    table = pq.ParquetFile(task.documents).read_row_groups(task.row_groups)
    if task.rows is not None:
        table = table.take(task.rows)
    ids, srcs, texts = (table.column(c).to_pylist() for c in ("doc_id", "source", "text"))
    del table
    kept_ids, kept_srcs, kept_texts = [], [], []
    for row, (doc_id, src, text) in enumerate(zip(ids, srcs, texts, strict=True)):
        res.doc_id.append(doc_id)
        res.digest.append(document_digest(src, text))
        res.chars.append(len(text))
        res.bytes.append(len(text.encode("utf-8", errors="surrogatepass")))
        doc = Document(doc_id, text)
        reason = run_filters(filters, doc)
        res.reason.append(reason)
        res.counts.append(json.dumps(doc.counts) if doc.counts else "")
        if reason is not None:
            bucket = res.samples.setdefault(reason, [])
            if len(bucket) < cfg.clean.dropped_samples:
                bucket.append(
                    {"reason": reason, "doc_id": doc_id, "chars": len(text), "text": text[:SAMPLE_CHARS], "row": row}
                )
            continue
        kept_ids.append(doc_id)
        kept_srcs.append(src)
        kept_texts.append(doc.text)
    pq.write_table(
        pa.table([kept_ids, kept_srcs, kept_texts], schema=SCHEMA), task.out_path, compression="zstd"
    )
    res.exact = np.array([exact_key(t) for t in kept_texts], dtype=np.uint64)
    res.split_hash = np.array([split_hash(t, cfg.seed) for t in kept_texts], dtype=np.uint64)
    if cfg.dedup.near:
        # In slices of ~1M characters: the vectorised hashing needs ~40 bytes per character.
        mh = MinHasher(cfg.dedup.num_perm, cfg.dedup.shingle_size, cfg.seed)
        sigs, has = [np.zeros((0, cfg.dedup.num_perm), np.uint32)], [np.zeros(0, bool)]
        for batch in char_bounded(kept_texts, MINHASH_CHARS):
            s, h = mh.signatures(batch)
            sigs.append(s)
            has.append(h)
        res.signatures, res.has_shingles = np.concatenate(sigs), np.concatenate(has)
    else:
        res.has_shingles = np.zeros(len(kept_texts), bool)
    del ids, srcs, texts, kept_ids, kept_srcs, kept_texts
    trim_heap()  # a worker cleans many parts: without this its memory creeps up part by part
    res.seconds = time.perf_counter() - start
    return res


def _map_parts(tasks: list[PartTask], cfg: DataConfig, workers: int) -> Iterable[PartResult]:
    """Results in task order: in this process or a process pool over this machine's cores.
    (On a Dask cluster, ``tasks/cluster.py`` maps :func:`clean_part` with Prefect's DaskTaskRunner.)"""
    if workers <= 1 or len(tasks) <= 1:
        for t in tasks:
            yield clean_part(t, cfg)
        return
    # fork is fast and needs no `if __name__ == "__main__"` guard in the caller's script, but forking
    # a process whose other threads hold locks (a Prefect worker, an MLflow client) can deadlock the
    # child; there spawn (which does need the guard in a script) is the safe choice.
    method = "fork" if _single_threaded() and sys.platform == "linux" else "spawn"
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context(method)) as pool:
        yield from pool.map(clean_part, tasks, [cfg] * len(tasks))


def _single_threaded() -> bool:
    """No thread but the main one (tqdm's progress-bar monitor, which only sleeps, does not count)."""
    from tqdm._monitor import TMonitor

    others = [
        t for t in threading.enumerate() if t is not threading.main_thread() and not isinstance(t, TMonitor)
    ]
    return not others


MapParts = Callable[[list[PartTask], DataConfig], Iterable[PartResult]]


def _settings(cfg: DataConfig) -> str:
    """What decides every verdict, hash and split: an earlier clean made with other values is not
    extended (the stage's cache key changes with them too)."""
    return json.dumps(
        {"version": INDEX_VERSION, "clean": cfg.clean.model_dump(mode="json"), "dedup": cfg.dedup.model_dump(mode="json"),
         "val_fraction": cfg.val_fraction, "seed": cfg.seed},
        sort_keys=True,
    )


@dataclass
class Records:
    """Per document of the ingested documents, in their order: what cleaning decided; per document that
    passed the filters ("passed", in the same order): its hashes. Signatures are in a file."""

    doc_id: np.ndarray  # str (N,)
    digest: np.ndarray  # uint64 (N,)
    reason: np.ndarray  # object (N,): str or None
    chars: np.ndarray  # int64 (N,)
    bytes: np.ndarray  # int64 (N,)
    counts: np.ndarray  # object (N,): JSON or ""
    exact: np.ndarray  # uint64 (passed,)
    split: np.ndarray  # uint64 (passed,)
    has_shingles: np.ndarray  # bool (passed,)

    @classmethod
    def concat(cls, parts: list[Records]) -> Records:
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in cls.__dataclass_fields__))

    @classmethod
    def of(cls, res: PartResult) -> Records:
        return cls(
            np.array(res.doc_id, dtype=object), np.array(res.digest, dtype=np.uint64),
            np.array(res.reason, dtype=object), np.array(res.chars, dtype=np.int64), np.array(res.bytes, dtype=np.int64),
            np.array(res.counts, dtype=object), res.exact, res.split_hash, res.has_shingles,
        )

    def take(self, docs: np.ndarray) -> Records:
        """The records of documents ``docs`` (indices, in order)."""
        passed_index = np.cumsum(self.passed) - 1
        sel = docs[self.passed[docs]]
        return Records(self.doc_id[docs], self.digest[docs], self.reason[docs], self.chars[docs], self.bytes[docs],
                       self.counts[docs], self.exact[passed_index[sel]], self.split[passed_index[sel]],
                       self.has_shingles[passed_index[sel]])

    @property
    def passed(self) -> np.ndarray:
        return np.equal(self.reason, None).astype(bool)


@dataclass
class Texts:
    """Where cleaned texts come from: per part (row group of the ingested documents), the cleaned rows
    of its documents that passed the filters, in order; and the dropped documents' samples."""

    part: Callable[[int], pa.Table]  # part -> its rows
    samples: Callable[[list[int]], dict[int, dict]]  # document positions -> their sample


def clean(
    cfg: DataConfig,
    documents: Path,
    *,
    out_dir: Path,
    map_parts: MapParts | None = None,
    previous: Path | None = None,
) -> StageResult:
    """Clean, deduplicate and split ``documents`` (ingest's folder of parts, or one parquet file)
    into ``train.parquet`` and ``val.parquet``.

    ``map_parts(parts, cfg)`` runs :func:`clean_part` over the parts and yields the results in part
    order; by default a process pool over ``data.workers`` cores (the Prefect task passes one that
    runs them on a Dask cluster). ``previous``: an earlier clean's folder to extend (only read; used
    if it was made with the same settings and ingest wrote document digests)."""
    out_dir = Path(out_dir)
    documents = Path(documents)
    start = time.perf_counter()
    if map_parts is None:
        workers = cfg.workers or os.cpu_count() or 1
        map_parts = partial(_map_parts, workers=workers)
    scratch = out_dir / "_parts"
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        earlier = _open_earlier(Path(previous), cfg, documents) if previous is not None else None
        if earlier is None:
            tasks = plan_parts(documents, scratch)
            return finish_clean(cfg, tasks, map_parts(tasks, cfg), out_dir=out_dir, start=start)
        return _extend(cfg, earlier, map_parts, scratch, out_dir=out_dir, start=start)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def finish_clean(
    cfg: DataConfig,
    tasks: list[PartTask],
    results: Iterable[PartResult],
    *,
    out_dir: Path,
    start: float | None = None,
) -> StageResult:
    """The reduce step of a full clean: gather the parts' records (signatures into a file), then
    :func:`_reduce` (dedup over all parts, split, write outputs and metrics)."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    records, parts, samples = [], [], {}
    first = 0
    with open(out_dir / SIGNATURES, "wb") as sig_file:
        for res in tqdm(
            results, total=len(tasks), desc="clean", unit="part", file=sys.stderr, disable=None, leave=False
        ):
            records.append(Records.of(res))
            parts.append(res.docs_kept)
            for items in res.samples.values():
                samples.update({first + item["row"]: item for item in items})
            first += len(res.doc_id)
            if res.signatures is not None:
                sig_file.write(np.ascontiguousarray(res.signatures).tobytes())
    if not records:
        raise DataError("the documents file holds no documents")
    part_files = [t.out_path for t in tasks]
    texts = Texts(lambda part: pq.read_table(part_files[part]), lambda positions: {p: samples[p] for p in positions})
    return _reduce(cfg, Records.concat(records), np.array(parts, dtype=np.int64), texts, out_dir=out_dir,
                   start=start, reuse=(0, sum(len(r.doc_id) for r in records)))


@dataclass
class Earlier:
    """An earlier clean being extended, and which of this corpus's documents it cleaned."""

    folder: Path
    records: Records  # of the earlier corpus
    kept: np.ndarray  # bool (earlier N,)
    match: np.ndarray  # int64 (N,): the earlier document each document is, or -1 (new or changed)
    docs: Documents  # this corpus's documents (their footers read once, for matching and extending)


def _open_earlier(folder: Path, cfg: DataConfig, documents: Path) -> Earlier | None:
    """The earlier clean in ``folder`` if it can be extended: its index exists and was made with the
    same settings, and ingest wrote the documents' digests to match them by."""
    digests_path = documents.parent / DIGESTS
    try:
        index = pq.read_table(folder / INDEX)
    except (OSError, pa.ArrowException):
        return None
    meta = index.schema.metadata or {}
    if meta.get(b"lmforge.settings", b"").decode() != _settings(cfg) or not digests_path.is_file():
        return None
    col = {name: index.column(name) for name in INDEX_SCHEMA.names}
    reason = np.array(col["reason"].to_pylist(), dtype=object)
    passed = np.equal(reason, None).astype(bool)
    records = Records(
        np.array(col["doc_id"].to_pylist(), dtype=object), col["digest"].to_numpy(), reason,
        col["chars"].to_numpy(), col["bytes"].to_numpy(), np.array(col["counts"].to_pylist(), dtype=object),
        col["exact"].filter(pa.array(passed)).to_numpy(), col["split"].filter(pa.array(passed)).to_numpy(),
        col["has_shingles"].filter(pa.array(passed)).to_numpy(zero_copy_only=False),
    )
    kept = col["kept"].fill_null(False).to_numpy(zero_copy_only=False)
    # This corpus's documents, matched to the earlier ones by (id, digest of source and text).
    docs = Documents(documents)
    ids = docs.column("doc_id")
    digests = np.load(digests_path)
    if len(ids) != len(digests):
        return None
    where = {key: i for i, key in enumerate(zip(records.doc_id.tolist(), records.digest.tolist(), strict=True))}
    if len(where) != len(records.doc_id):  # ids not unique: matching would be ambiguous
        return None
    match = np.array([where.get(key, -1) for key in zip(ids, digests.tolist(), strict=True)], dtype=np.int64)
    return Earlier(folder, records, kept, match, docs)


@dataclass
class Merged:
    """Every document's records in this corpus's order, the earlier clean's where a document matches,
    and where each passed document's signature and cleaned text come from."""

    records: Records  # (N,)
    old_docs: np.ndarray  # int64: the documents the earlier clean cleaned (positions in this corpus)
    earlier_rows: np.ndarray  # int64: the rows of those that passed in the earlier signatures
    src: np.ndarray  # int64 (passed,): which of the old then new passed documents each passed one is
    num_passed_new: int


def _extend(
    cfg: DataConfig, earlier: Earlier, map_parts: MapParts, scratch: Path, *, out_dir: Path,
    start: float,
) -> StageResult:
    """Clean only the documents the earlier clean did not see, take the rest of its records, and
    reduce over all of them (see the module docstring)."""
    group_start = np.concatenate(([0], np.cumsum(earlier.docs.group_rows)))
    new_docs = np.flatnonzero(earlier.match < 0)
    tasks, positions = _new_document_tasks(earlier.docs, group_start, new_docs, scratch)
    results = list(map_parts(tasks, cfg))
    new = Records.concat([Records.of(r) for r in results]) if results else earlier.records.take(new_docs)
    samples = _new_samples(results, positions)
    merged = _merge_records(earlier, new, new_docs)
    _gather_signatures(cfg, earlier.folder / SIGNATURES, merged.earlier_rows,
                       [r.signatures for r in results if r.signatures is not None], merged.src, out_dir / SIGNATURES)
    table, pool_rows = _text_pool(cfg, earlier, merged, tasks)
    passed_start = _passed_start(merged.records, group_start)
    texts = Texts(partial(_pool_part, table, pool_rows, passed_start),
                  partial(_extended_samples, earlier, merged.records, samples, group_start))
    result = _reduce(cfg, merged.records, np.diff(passed_start), texts, out_dir=out_dir,
                     start=start, reuse=(len(merged.old_docs), len(new_docs)))
    if len(merged.old_docs):
        result.tags["lmforge.extends"] = str(earlier.folder)
    return result


def _new_document_tasks(
    docs: Documents, group_start: np.ndarray, new_docs: np.ndarray, scratch: Path
) -> tuple[list[PartTask], list[np.ndarray]]:
    """A task per row group holding new documents, for those rows only; and the rows' positions."""
    group = np.searchsorted(group_start, new_docs, side="right") - 1
    tasks, positions = [], []
    for g in np.unique(group):
        rows = new_docs[group == g]
        tasks.append(PartTask(len(tasks), *_located(docs, int(g)), str(scratch / f"new_{g:05d}.parquet"),
                              rows=(rows - group_start[g]).tolist()))
        positions.append(rows)
    return tasks, positions


def _new_samples(results: list[PartResult], positions: list[np.ndarray]) -> dict[int, dict]:
    """The dropped samples of the new documents' tasks, by document position in this corpus."""
    samples: dict[int, dict] = {}
    for res, pos in zip(results, positions, strict=True):
        for items in res.samples.values():
            samples.update({int(pos[item["row"]]): item for item in items})
    return samples


def _merge_records(earlier: Earlier, new: Records, new_docs: np.ndarray) -> Merged:
    """Every document's records, in this corpus's order: the earlier ones' where they match."""
    old_docs = np.flatnonzero(earlier.match >= 0)
    old = earlier.records.take(earlier.match[old_docs])
    order = np.argsort(np.concatenate((old_docs, new_docs)), kind="stable")
    records = Records.concat([old, new]).take(order)
    # Each passed document (in this corpus's order): which of the old then new passed documents it is.
    num_passed_old, num_passed_new = int(old.passed.sum()), int(new.passed.sum())
    src = np.concatenate((np.arange(num_passed_old), num_passed_old + np.arange(num_passed_new)))
    src = src[np.argsort(np.concatenate((old_docs[old.passed], new_docs[new.passed])), kind="stable")]
    earlier_passed = np.cumsum(earlier.records.passed) - 1
    earlier_rows = earlier_passed[earlier.match[old_docs][old.passed]]  # their rows in the earlier signatures
    return Merged(records, old_docs, earlier_rows, src, num_passed_new)


def _text_pool(cfg: DataConfig, earlier: Earlier, merged: Merged, tasks: list[PartTask]) -> tuple[pa.Table, np.ndarray]:
    """Cleaned texts: the earlier train/val/duplicates rows of the documents it cleaned (each passed
    document is in one of them, in order), then the new part files; and each passed document's row."""
    pool = [pq.read_table(earlier.folder / name) for name in (TRAIN, VAL, DUPLICATES)]
    pool += [pq.read_table(t.out_path) for t in tasks]
    earlier_val = _in_val(earlier.records.split, cfg.val_fraction)
    kept_e = earlier.kept[earlier.records.passed]
    row_in_pool = np.select(
        [kept_e & ~earlier_val, kept_e & earlier_val],
        [np.cumsum(kept_e & ~earlier_val) - 1, pool[0].num_rows + np.cumsum(kept_e & earlier_val) - 1],
        pool[0].num_rows + pool[1].num_rows + np.cumsum(~kept_e) - 1,
    )
    offset = sum(t.num_rows for t in pool[:3])
    pool_rows = np.concatenate((row_in_pool[merged.earlier_rows], offset + np.arange(merged.num_passed_new)))[merged.src]
    return pa.concat_tables(pool), pool_rows


def _passed_start(records: Records, group_start: np.ndarray) -> np.ndarray:
    """Per part (row group of the ingested documents): its first passed document; the count last."""
    part_of_passed = np.searchsorted(group_start, np.flatnonzero(records.passed), side="right") - 1
    return np.searchsorted(part_of_passed, np.arange(len(group_start)))


def _pool_part(table: pa.Table, pool_rows: np.ndarray, passed_start: np.ndarray, part: int) -> pa.Table:
    """A part's cleaned rows: slices of the pool, a run of consecutive rows at a time (no copy: what
    is written is copied once, when it is filtered)."""
    rows = pool_rows[passed_start[part] : passed_start[part + 1]]
    runs = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1) if rows.size else []
    return pa.concat_tables([table.slice(int(run[0]), run.size) for run in runs]) if runs else table.slice(0, 0)


def _extended_samples(
    earlier: Earlier, records: Records, samples: dict[int, dict], group_start: np.ndarray, positions: list[int]
) -> dict[int, dict]:
    """The samples of dropped documents ``positions``: this run's, else the earlier clean's, else
    made from the ingested text."""
    out = {p: samples[p] for p in positions if p in samples}
    known = _earlier_samples(earlier.folder)
    for p in positions:
        if p not in out and (records.reason[p], records.doc_id[p]) in known:
            out[p] = known[records.reason[p], records.doc_id[p]]
    rest = [p for p in positions if p not in out]
    for p, text in zip(rest, _raw_texts(earlier.docs, group_start, rest), strict=True):
        out[p] = {"reason": records.reason[p], "doc_id": records.doc_id[p], "chars": len(text), "text": text[:SAMPLE_CHARS]}
    return out


def _gather_signatures(
    cfg: DataConfig, earlier_path: Path, earlier_rows: np.ndarray, new: list[np.ndarray], src: np.ndarray, path: Path
) -> None:
    """Write the signatures of this corpus's passed documents, in order: rows ``earlier_rows`` of the
    earlier file, then the new ones; ``src`` says which of those each document is."""
    if not cfg.dedup.near:
        path.write_bytes(b"")
        return
    p = cfg.dedup.num_perm
    count = earlier_path.stat().st_size // (4 * p)
    old = np.memmap(earlier_path, dtype=np.uint32, mode="r", shape=(count, p)) if count else np.zeros((0, p), np.uint32)
    fresh = np.concatenate(new) if new else np.zeros((0, p), np.uint32)
    with open(path, "wb") as f:
        for lo in range(0, src.size, 65536):
            s = src[lo : lo + 65536]
            block = np.empty((s.size, p), dtype=np.uint32)
            from_old = s < earlier_rows.size
            block[from_old] = old[earlier_rows[s[from_old]]]
            block[~from_old] = fresh[s[~from_old] - earlier_rows.size]
            f.write(block.tobytes())
    del old


def _earlier_samples(folder: Path) -> dict[tuple[str, str], dict]:
    out = {}
    with open(folder / DROPPED, encoding="utf-8") as f:
        for line in f:
            item = json.loads(line)
            out[item["reason"], item["doc_id"]] = item
    return out


def _raw_texts(docs: Documents, group_start: np.ndarray, positions: list[int]) -> list[str]:
    """The ingested texts of documents ``positions``, reading only their row groups."""
    out = {}
    groups = np.searchsorted(group_start, positions, side="right") - 1
    for g in sorted(set(groups.tolist())):
        texts = docs.read_row_group(g, columns=["text"]).column(0)
        for p in (p for p, gg in zip(positions, groups, strict=True) if gg == g):
            out[p] = texts[p - int(group_start[g])].as_py()
    return [out[p] for p in positions]


@dataclass
class Duplicates:
    """What the duplicate search decided, per passed document in corpus order, and its counts."""

    keeper: np.ndarray  # int64 (passed,): the document kept in its place, or -1 if it is kept
    exact_keeper: np.ndarray  # int64 (passed,): the same for exact duplicates only
    near_keeper: np.ndarray  # int64 (passed,): the same for near duplicates only
    exact_dups: int
    exact_clusters: int
    near_dups: int
    near_clusters: int


def _keepers(records: Records, cfg: DataConfig, sig_path: Path) -> Duplicates:
    """Exact then near duplicates over the passed documents. In every cluster the first document in
    corpus order survives: the order of data.sources, then of the paths ingest lists (sorted), so a
    full clean and an extended one, which see the same order, keep the same copy, whatever order
    the parts are cleaned in."""
    n = len(records.exact)
    keeper = np.full(n, -1, dtype=np.int64)
    exact_dups = exact_clusters = 0
    if cfg.dedup.exact and n:
        _, first, inverse, counts = np.unique(records.exact, return_index=True, return_inverse=True, return_counts=True)
        keeper = np.where(first[inverse] != np.arange(n), first[inverse], -1)
        exact_dups = int((keeper >= 0).sum())
        exact_clusters = int((counts > 1).sum())
    exact_keeper = keeper
    near_keeper = np.full(n, -1, dtype=np.int64)
    near_clusters = 0
    if cfg.dedup.near and n:
        bands, rows = lsh_params(cfg.dedup.threshold, cfg.dedup.num_perm)
        sigs = np.memmap(sig_path, dtype=np.uint32, mode="r", shape=(n, cfg.dedup.num_perm))
        keys = np.concatenate([band_keys(np.asarray(sigs[lo : lo + 65536]), bands, rows) for lo in range(0, n, 65536)])
        near_keeper, near_clusters = near_duplicates(
            keys, records.has_shingles & (exact_keeper < 0), lambda i: np.asarray(sigs[i]), cfg.dedup.threshold
        )
        del sigs
    keeper = np.where(near_keeper >= 0, near_keeper, exact_keeper)
    return Duplicates(
        keeper, exact_keeper, near_keeper, exact_dups, exact_clusters, int((near_keeper >= 0).sum()), near_clusters
    )


@dataclass
class FilterSummary:
    """What the filters did over the whole corpus."""

    reasons: Counter  # documents dropped per reason, in order of first appearance
    counts: Counter  # what the filters counted in the documents (PII, control characters)
    hist_in: np.ndarray  # int64 (len(HIST_BINS) - 1,): ingested document lengths

    @classmethod
    def of(cls, records: Records) -> FilterSummary:
        counts: Counter = Counter()
        for c in records.counts:
            if c:
                counts.update(json.loads(c))
        return cls(
            Counter(r for r in records.reason if r is not None), counts, np.histogram(records.chars, bins=HIST_BINS)[0]
        )


@dataclass
class WrittenSplits:
    """What :func:`_write_splits` wrote."""

    docs: dict[str, int]  # documents per output file (TRAIN, VAL, DUPLICATES)
    bytes_out: int  # UTF-8 bytes of the kept documents' text
    hist_out: np.ndarray  # int64 (len(HIST_BINS) - 1,): kept document lengths
    snippets: dict[int, tuple[str, str]]  # passed document -> (doc_id, head of text), for the dedup sample


def _reduce(
    cfg: DataConfig,
    records: Records,
    passed_per_part: np.ndarray,
    texts: Texts,
    *,
    out_dir: Path,
    start: float | None,
    reuse: tuple[int, int],
) -> StageResult:
    """Dedup over all documents, split, write outputs, the index and metrics: the same for a full
    clean and an extended one."""
    start = time.perf_counter() if start is None else start
    out_dir = Path(out_dir)
    lsh = lsh_params(cfg.dedup.threshold, cfg.dedup.num_perm)
    filtered = FilterSummary.of(records)
    _write_dropped_samples(out_dir / DROPPED, records, filtered.reasons, texts, cfg.clean.dropped_samples)
    _check_some_passed(records, filtered.reasons, cfg)
    # Dedup over the whole corpus, then the split by content hash.
    is_val = _in_val(records.split, cfg.val_fraction)
    dups = _keepers(records, cfg, out_dir / SIGNATURES)
    pairs = _dedup_pairs(dups, out_dir / SIGNATURES, cfg.dedup.num_perm)
    written = _write_splits(out_dir, texts, passed_per_part, dups.keeper >= 0, is_val, pairs)
    _write_dedup_samples(out_dir / DEDUP_PAIRS, pairs, written.snippets)
    _write_index(out_dir / INDEX, records, dups.keeper < 0, cfg)
    pa.default_memory_pool().release_unused()  # the next stage may run in this process
    trim_heap()
    _check_training_left(records, dups, written, cfg)
    metrics = _metrics(records, filtered, dups, written, reuse, time.perf_counter() - start)
    _write_stats_and_figures(out_dir, cfg, lsh, metrics, filtered, dups, written)
    return _clean_result(out_dir, lsh, metrics)


def _in_val(split: np.ndarray, val_fraction: float) -> np.ndarray:
    """Which documents go to validation, by their split hash (:func:`split_hash`)."""
    return split.astype(np.float64) / 2.0**64 < val_fraction


def _write_dropped_samples(path: Path, records: Records, reasons: Counter, texts: Texts, per_reason: int) -> None:
    """``dropped_samples.jsonl``: the first ``per_reason`` documents the filters dropped for each reason."""
    first_dropped = [int(i) for reason in reasons for i in np.flatnonzero(records.reason == reason)[:per_reason]]
    sample_of = texts.samples(first_dropped)
    samples: dict[str, list[dict]] = {}
    for i in sorted(first_dropped):
        item = {k: v for k, v in sample_of[i].items() if k != "row"}
        samples.setdefault(item["reason"], []).append(item)
    _write_samples(path, samples)


def _check_some_passed(records: Records, reasons: Counter, cfg: DataConfig) -> None:
    """Fail, saying what to change, when there are no documents or the filters dropped them all."""
    docs_in = len(records.doc_id)
    if docs_in == 0:
        raise DataError("the documents file holds no documents")
    if int(records.passed.sum()) == 0:
        top = ", ".join(f"{r}: {c}" for r, c in reasons.most_common())
        hint = "" if cfg.clean.preset == "code" else " (for source code: data.clean.preset=code)"
        if reasons.most_common(1)[0][0] == "too_long":
            hint += (
                f" (one long text, e.g. a single input.txt: data.max_doc_chars={cfg.clean.max_chars} cuts it "
                "at line breaks into documents the length filter keeps)"
            )
        raise DataError(
            f"the clean filters removed all {docs_in} documents ({top}): check data.sources, or relax "
            f"the data.clean thresholds named there{hint}; {DROPPED} shows what was dropped."
        )


def _dedup_pairs(dups: Duplicates, sig_path: Path, num_perm: int) -> list[dict]:
    """A sample of (dropped, kept) pairs, near then exact, for a person to judge the dedup."""
    pairs: list[dict] = []
    if dups.near_dups:
        sigs = np.memmap(sig_path, dtype=np.uint32, mode="r", shape=(len(dups.keeper), num_perm))
        for i in np.flatnonzero(dups.near_keeper >= 0)[:DEDUP_SAMPLES]:
            j = int(dups.near_keeper[i])
            pairs.append(
                {"kind": "near", "dropped": int(i), "kept": j, "jaccard": float(np.mean(sigs[i] == sigs[j]))}
            )
        del sigs
    for i in np.flatnonzero(dups.exact_keeper >= 0)[:DEDUP_SAMPLES]:
        pairs.append({"kind": "exact", "dropped": int(i), "kept": int(dups.exact_keeper[i]), "jaccard": 1.0})
    return pairs


def _write_splits(
    out_dir: Path, texts: Texts, passed_per_part: np.ndarray, drop: np.ndarray, is_val: np.ndarray, pairs: list[dict]
) -> WrittenSplits:
    """Stream part by part into train/val (and the duplicates): one row group per part and split, as
    a full clean writes them. Keeps the texts of the documents in ``pairs`` on the way."""
    shown = {p["dropped"] for p in pairs} | {p["kept"] for p in pairs}
    outputs = {name: pq.ParquetWriter(out_dir / name, SCHEMA, compression="zstd") for name in (TRAIN, VAL, DUPLICATES)}
    written = WrittenSplits({TRAIN: 0, VAL: 0, DUPLICATES: 0}, 0, np.zeros(len(HIST_BINS) - 1, dtype=np.int64), {})
    offset = 0
    for part, k in enumerate(passed_per_part.tolist()):
        table = texts.part(part)
        keep = ~drop[offset : offset + k]
        val = is_val[offset : offset + k]
        for i in sorted(i for i in shown if offset <= i < offset + k):
            row = i - offset
            written.snippets[i] = (
                table.column("doc_id")[row].as_py(), table.column("text")[row].as_py()[:SAMPLE_CHARS]
            )
        offset += k
        for name, mask in ((TRAIN, keep & ~val), (VAL, keep & val), (DUPLICATES, ~keep)):
            rows_ = table.filter(pa.array(mask)).combine_chunks()
            if rows_.num_rows:
                outputs[name].write_table(rows_)
                written.docs[name] += rows_.num_rows
        kept_text = table.filter(pa.array(keep)).column("text")  # lengths in Arrow: no Python strings
        written.bytes_out += int(pc.sum(pc.binary_length(kept_text)).as_py() or 0)
        written.hist_out += np.histogram(pc.utf8_length(kept_text).to_numpy(), bins=HIST_BINS)[0]
        del table, kept_text
    for w in outputs.values():
        w.close()
    return written


def _write_dedup_samples(path: Path, pairs: list[dict], snippets: dict[int, tuple[str, str]]) -> None:
    """``dedup_samples.jsonl``: the sampled (dropped, kept) pairs with their ids and texts."""
    with open(path, "w", encoding="utf-8") as f:
        for p in pairs:
            (dropped_id, dropped_text), (kept_id, kept_text) = snippets[p["dropped"]], snippets[p["kept"]]
            item = {
                "kind": p["kind"],
                "jaccard_estimate": round(p["jaccard"], 3),
                "dropped_id": dropped_id,
                "kept_id": kept_id,
                "dropped_text": dropped_text,
                "kept_text": kept_text,
            }
            f.write(json.dumps(item, ensure_ascii=False) + "\n")


def _check_training_left(records: Records, dups: Duplicates, written: WrittenSplits, cfg: DataConfig) -> None:
    if written.docs[TRAIN] == 0:
        raise DataError(
            f"no training documents are left: {int(records.passed.sum())} passed the filters, {dups.exact_dups} "
            f"exact and {dups.near_dups} near duplicates removed, {written.docs[VAL]} went to validation "
            f"(data.val_fraction={cfg.val_fraction})"
        )


def _metrics(
    records: Records, filtered: FilterSummary, dups: Duplicates, written: WrittenSplits, reuse: tuple[int, int],
    elapsed: float,
) -> dict[str, float]:
    docs_in = len(records.doc_id)
    metrics: dict[str, float] = {
        "clean/docs_in": docs_in,
        "clean/docs_out": written.docs[TRAIN] + written.docs[VAL],
        "clean/bytes_in": int(records.bytes.sum()),
        "clean/bytes_out": written.bytes_out,
        "clean/docs_filtered": docs_in - int(records.passed.sum()),
        "clean/docs_reused": reuse[0],  # cleaned by the earlier run this one extends
        "clean/docs_new": reuse[1],  # new or changed: through the filters and MinHash in this run
        "dedup/exact_dups": dups.exact_dups,
        "dedup/exact_clusters": dups.exact_clusters,
        "dedup/near_dups": dups.near_dups,
        "dedup/clusters": dups.near_clusters,
        "clean/train_docs": written.docs[TRAIN],
        "clean/val_docs": written.docs[VAL],
        "clean/seconds": elapsed,
        "clean/mb_per_s": int(records.bytes.sum()) / 2**20 / max(elapsed, 1e-9),
    }
    for reason, count in filtered.reasons.items():
        metrics[f"clean/dropped/{reason}"] = count
    for kind, count in filtered.counts.items():
        metrics[kind if "/" in kind else f"clean/{kind}"] = count
    for kind in ("email", "phone", "ip"):
        metrics.setdefault(f"pii/{kind}", 0)
        metrics[f"clean/pii/{kind}"] = metrics.pop(f"pii/{kind}")
    return {k: float(v) for k, v in metrics.items()}


def _write_stats_and_figures(
    out_dir: Path, cfg: DataConfig, lsh: tuple[int, int], metrics: dict[str, float], filtered: FilterSummary,
    dups: Duplicates, written: WrittenSplits,
) -> None:
    """``stats.json``, the length histogram and the dropped-by-reason figure."""
    bands, rows = lsh
    stats = {
        "metrics": metrics,
        "dropped": dict(filtered.reasons.most_common()),
        "filters": cfg.clean.model_dump(),
        "dedup": {**cfg.dedup.model_dump(), "bands": bands, "rows": rows},
        "length_histogram": {
            "bins": HIST_BINS.tolist(),
            "in": filtered.hist_in.tolist(),
            "out": written.hist_out.tolist(),
        },
    }
    (out_dir / STATS).write_text(json.dumps(stats, indent=2))
    _plot_lengths(out_dir / HIST, filtered.hist_in, written.hist_out)
    _plot_dropped(
        out_dir / DROPPED_PLOT,
        {**filtered.reasons, "exact duplicate": dups.exact_dups, "near duplicate": dups.near_dups},
        kept=written.docs[TRAIN] + written.docs[VAL],
    )


def _clean_result(out_dir: Path, lsh: tuple[int, int], metrics: dict[str, float]) -> StageResult:
    bands, rows = lsh
    return StageResult(
        metrics=metrics,
        params={"dedup.bands": bands, "dedup.rows": rows},  # the thresholds in force are the run's config params
        artifacts=[STATS, DROPPED, HIST, DROPPED_PLOT, DEDUP_PAIRS],
        outputs={"train": TRAIN, "val": VAL, "index": INDEX, "signatures": SIGNATURES, "duplicates": DUPLICATES},
        datasets=[
            {
                "name": name.removesuffix(".parquet"),
                "path": name,
                "digest": file_sha256(out_dir / name),
                "source": "clean",
                "context": ctx,
            }
            for name, ctx in ((TRAIN, "training"), (VAL, "validation"))
        ],
    )


def _write_index(path: Path, records: Records, kept: np.ndarray, cfg: DataConfig) -> None:
    """``dedup_index.parquet``: per document, what this clean decided (see INDEX_SCHEMA)."""
    passed = records.passed
    n_docs = len(records.doc_id)

    def per_doc(values: np.ndarray, dtype) -> pa.Array:
        full = np.zeros(n_docs, dtype=dtype)
        full[passed] = values
        return pa.array(full, mask=~passed)

    table = pa.table(
        [
            pa.array(records.doc_id.tolist(), pa.string()),
            pa.array(records.digest, pa.uint64()),
            pa.array(records.reason.tolist(), pa.string()),
            pa.array(records.chars, pa.int64()),
            pa.array(records.bytes, pa.int64()),
            pa.array(records.counts.tolist(), pa.string()),
            per_doc(records.exact, np.uint64),
            per_doc(records.split, np.uint64),
            per_doc(records.has_shingles, bool),
            per_doc(kept, bool),
        ],
        schema=INDEX_SCHEMA.with_metadata({"lmforge.settings": _settings(cfg)}),
    )
    pq.write_table(table, path, compression="zstd")


def _write_samples(path: Path, samples: dict[str, list[dict]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for reason in sorted(samples):
            for item in samples[reason]:
                f.write(json.dumps(item, ensure_ascii=False) + "\n")


def _plot_lengths(path: Path, hist_in: np.ndarray, hist_out: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    # One step outline per histogram, not a bar per bin, and no minor ticks on the log axis: the
    # figure costs a fifth of the time (a retrain that cleans a few new files draws it too).
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.stairs(hist_in, HIST_BINS, fill=True, alpha=0.5, label="ingested")
    ax.stairs(hist_out, HIST_BINS, fill=True, alpha=0.7, label="kept (filtered, deduplicated)")
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("document length (characters)")
    ax.set_ylabel("documents")
    ax.set_title("Document lengths before and after cleaning")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_dropped(path: Path, dropped: dict[str, int], kept: int) -> None:
    """A horizontal bar per reason a document was dropped (filters, then deduplication), largest on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = sorted(((r, int(n)) for r, n in dropped.items() if n), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(7, 0.9 + 0.35 * max(len(items), 1)))
    if items:
        names, counts = zip(*items, strict=True)
        bars = ax.barh(names, counts, color="tab:red", alpha=0.7)
        ax.bar_label(bars, labels=[f"{c:,}" for c in counts], padding=3, fontsize=8)
        ax.set_xlim(0, max(counts) * 1.15)
    else:
        ax.text(0.5, 0.5, "no document was dropped", ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
    ax.set_xlabel("documents dropped")
    ax.set_title(f"Documents dropped, by reason ({sum(n for _, n in items):,} dropped, {kept:,} kept)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
