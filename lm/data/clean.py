"""Clean: filters -> exact + near dedup -> deterministic train/val split.

Work is split into parts (row groups of ``documents.parquet``). Each part is cleaned by
:func:`clean_part`, in a process pool over every core, or (``data.dask_address``) as Prefect
tasks on a Dask cluster through Prefect's DaskTaskRunner (``tasks/cluster.py``): it runs the
filters, writes its surviving documents to a part file and returns small arrays (dedup hashes, MinHash signatures, split hashes) and counts. The driver
then finds exact and near duplicates over the whole corpus, BEFORE the split, so no near copy of
a validation document is trained on, and streams the part files into ``train.parquet`` and
``val.parquet``. Memory holds one part's text per worker plus ~(bands * 8 + 20) bytes per
document; signatures go to a scratch file that is memory-mapped for verification.

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
from lm.data.ingest import SCHEMA
from lm.errors import DataError
from lm.fileio import file_sha256
from lm.memory import trim_heap
from lm.stage import StageResult

TRAIN, VAL = "train.parquet", "val.parquet"
STATS, DROPPED, HIST = "stats.json", "dropped_samples.jsonl", "length_hist.png"
DEDUP_PAIRS = "dedup_samples.jsonl"  # (dropped, kept) duplicate pairs, to judge the threshold
DROPPED_PLOT = "dropped_by_reason.png"
DEDUP_SAMPLES = 10  # pairs of each kind (exact, near)
SAMPLE_CHARS = 2000  # characters of each dropped document kept for a person to judge the filter
MINHASH_CHARS = 1_000_000
HIST_BINS = np.logspace(0, 7, 71)  # document length in characters, 1 .. 10M, 10 bins per decade


@dataclass
class PartTask:
    """One unit of work: some row groups of documents.parquet, cleaned into ``out_path``."""

    index: int
    documents: str
    row_groups: list[int]
    out_path: str


@dataclass
class PartResult:
    index: int
    docs_in: int = 0
    bytes_in: int = 0
    docs_kept: int = 0
    bytes_kept: int = 0
    reasons: Counter = field(default_factory=Counter)
    counts: Counter = field(default_factory=Counter)
    samples: dict[str, list[dict]] = field(default_factory=dict)
    hist_in: np.ndarray | None = None
    exact: np.ndarray | None = None  # uint64 (kept,)
    signatures: np.ndarray | None = None  # uint32 (kept, num_perm)
    has_shingles: np.ndarray | None = None  # bool (kept,)
    split_hash: np.ndarray | None = None  # uint64 (kept,)
    seconds: float = 0.0


def plan_parts(documents: Path, scratch: Path) -> list[PartTask]:
    """One part per row group of ``documents``: ingest bounds a row group's size (data.row_group_mb),
    so a worker's memory does not grow with the corpus."""
    n = pq.ParquetFile(documents).metadata.num_row_groups
    return [PartTask(i, str(documents), [i], str(scratch / f"part_{i:05d}.parquet")) for i in range(n)]


def split_hash(text: str, seed: int) -> int:
    """Deterministic per-text value in [0, 2^64): the split depends on content, not on order."""
    h = hashlib.blake2b(
        text.encode("utf-8", errors="surrogatepass"), digest_size=8, key=seed.to_bytes(8, "little")
    )
    return int.from_bytes(h.digest(), "little")


def clean_part(task: PartTask, cfg: DataConfig) -> PartResult:
    """Filter one part, write its kept documents, return dedup/split hashes and counts."""
    start = time.perf_counter()
    filters = build_filters(cfg.clean)
    res = PartResult(task.index)
    table = pq.ParquetFile(task.documents).read_row_groups(task.row_groups)
    ids, srcs, texts = (table.column(c).to_pylist() for c in ("doc_id", "source", "text"))
    del table
    kept_ids, kept_srcs, kept_texts = [], [], []
    lengths = []
    for doc_id, src, text in zip(ids, srcs, texts, strict=True):
        res.docs_in += 1
        res.bytes_in += len(text.encode("utf-8", errors="surrogatepass"))
        lengths.append(len(text))
        doc = Document(doc_id, text)
        reason = run_filters(filters, doc)
        res.counts.update(doc.counts)
        if reason is not None:
            res.reasons[reason] += 1
            bucket = res.samples.setdefault(reason, [])
            if len(bucket) < cfg.clean.dropped_samples:
                bucket.append(
                    {"reason": reason, "doc_id": doc_id, "chars": len(text), "text": text[:SAMPLE_CHARS]}
                )
            continue
        kept_ids.append(doc_id)
        kept_srcs.append(src)
        kept_texts.append(doc.text)
    res.hist_in = np.histogram(lengths, bins=HIST_BINS)[0]
    pq.write_table(
        pa.table([kept_ids, kept_srcs, kept_texts], schema=SCHEMA), task.out_path, compression="zstd"
    )
    res.docs_kept = len(kept_texts)
    res.bytes_kept = sum(len(t.encode("utf-8", errors="surrogatepass")) for t in kept_texts)
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
    del ids, srcs, texts, kept_ids, kept_srcs, kept_texts
    trim_heap()  # a worker cleans many parts: without this its memory creeps up part by part
    res.seconds = time.perf_counter() - start
    return res


def _map_parts(tasks: list[PartTask], cfg: DataConfig, workers: int) -> Iterable[PartResult]:
    """Results in task order: in this process or a process pool over this machine's cores.
    (On a Dask cluster, ``tasks/cluster.py`` maps :func:`clean_part` with Prefect's DaskTaskRunner.)"""
    if workers <= 1 or len(tasks) == 1:
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


def clean(
    cfg: DataConfig, documents: Path, *, out_dir: Path, map_parts: MapParts | None = None
) -> StageResult:
    """Clean, deduplicate and split ``documents.parquet`` into ``train.parquet`` and ``val.parquet``.

    ``map_parts(parts, cfg)`` runs :func:`clean_part` over the parts and yields the results in part
    order; by default a process pool over ``data.workers`` cores (the Prefect task passes one that
    runs them on a Dask cluster)."""
    out_dir = Path(out_dir)
    start = time.perf_counter()
    if map_parts is None:
        workers = cfg.workers or os.cpu_count() or 1
        map_parts = partial(_map_parts, workers=workers)
    scratch = out_dir / "_parts"
    scratch.mkdir(parents=True, exist_ok=True)
    tasks = plan_parts(Path(documents), scratch)
    try:
        return finish_clean(cfg, tasks, map_parts(tasks, cfg), out_dir=out_dir, start=start)
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
    """The reduce step: dedup over all parts, split, write outputs and metrics."""
    from tqdm import tqdm

    start = time.perf_counter() if start is None else start
    out_dir = Path(out_dir)
    agg = PartResult(-1, hist_in=np.zeros(len(HIST_BINS) - 1, dtype=np.int64))
    exact, split_h, has, keys, kept_per_part = [], [], [], [], []
    bands, rows = lsh_params(cfg.dedup.threshold, cfg.dedup.num_perm)
    sig_path = out_dir / "_signatures.u32"
    sig_file = open(sig_path, "wb")
    for res in tqdm(
        results, total=len(tasks), desc="clean", unit="part", file=sys.stderr, disable=None, leave=False
    ):
        agg.docs_in += res.docs_in
        agg.bytes_in += res.bytes_in
        agg.docs_kept += res.docs_kept
        agg.reasons.update(res.reasons)
        agg.counts.update(res.counts)
        agg.hist_in += res.hist_in
        for reason, items in res.samples.items():
            bucket = agg.samples.setdefault(reason, [])
            bucket.extend(items[: cfg.clean.dropped_samples - len(bucket)])
        exact.append(res.exact)
        split_h.append(res.split_hash)
        kept_per_part.append(res.docs_kept)
        if res.signatures is not None:
            has.append(res.has_shingles)
            keys.append(band_keys(res.signatures, bands, rows))
            sig_file.write(np.ascontiguousarray(res.signatures).tobytes())
    sig_file.close()
    _write_samples(out_dir / DROPPED, agg.samples)
    if agg.docs_in == 0:
        raise DataError("the documents file holds no documents")
    if agg.docs_kept == 0:
        top = ", ".join(f"{r}: {n}" for r, n in agg.reasons.most_common())
        hint = "" if cfg.clean.preset == "code" else " (for source code: data.clean.preset=code)"
        if agg.reasons.most_common(1)[0][0] == "too_long":
            hint += (
                f" (one long text, e.g. a single input.txt: data.max_doc_chars={cfg.clean.max_chars} cuts it "
                "at line breaks into documents the length filter keeps)"
            )
        raise DataError(
            f"the clean filters removed all {agg.docs_in} documents ({top}): check data.sources, or relax "
            f"the data.clean thresholds named there{hint}; {DROPPED} shows what was dropped."
        )

    # Dedup over the whole corpus, in document order: the first copy survives.
    n = agg.docs_kept
    exact_all = np.concatenate(exact)
    keeper = np.full(n, -1, dtype=np.int64)  # the kept copy of each dropped duplicate
    exact_dups = exact_clusters = 0
    if cfg.dedup.exact:
        _, first, inverse, counts = np.unique(
            exact_all, return_index=True, return_inverse=True, return_counts=True
        )
        keeper = np.where(first[inverse] != np.arange(n), first[inverse], -1)
        exact_dups = int((keeper >= 0).sum())
        exact_clusters = int((counts > 1).sum())
    exact_keeper = keeper.copy()
    near_dups = near_clusters = 0
    pairs: list[dict] = []  # a sample of (dropped, kept) pairs for a person to judge the dedup
    if cfg.dedup.near and n:
        sigs = np.memmap(sig_path, dtype=np.uint32, mode="r", shape=(n, cfg.dedup.num_perm))
        near_keeper, near_clusters = near_duplicates(
            np.concatenate(keys),
            np.concatenate(has) & (keeper < 0),
            lambda i: np.asarray(sigs[i]),
            cfg.dedup.threshold,
        )
        near_dups = int((near_keeper >= 0).sum())
        for i in np.flatnonzero(near_keeper >= 0)[:DEDUP_SAMPLES]:
            j = int(near_keeper[i])
            pairs.append(
                {"kind": "near", "dropped": int(i), "kept": j, "jaccard": float(np.mean(sigs[i] == sigs[j]))}
            )
        keeper = np.where(near_keeper >= 0, near_keeper, keeper)
        del sigs
    sig_path.unlink()
    drop = keeper >= 0
    for i in np.flatnonzero(exact_keeper >= 0)[:DEDUP_SAMPLES]:
        pairs.append({"kind": "exact", "dropped": int(i), "kept": int(exact_keeper[i]), "jaccard": 1.0})
    wanted = sorted({p["dropped"] for p in pairs} | {p["kept"] for p in pairs})
    snippets: dict[int, tuple[str, str]] = {}

    # Split by content hash, streaming the part files into train/val.
    is_val = np.concatenate(split_h).astype(np.float64) / 2.0**64 < cfg.val_fraction
    writers = {name: pq.ParquetWriter(out_dir / name, SCHEMA, compression="zstd") for name in (TRAIN, VAL)}
    docs = {TRAIN: 0, VAL: 0}
    bytes_out = 0
    hist_out = np.zeros(len(HIST_BINS) - 1, dtype=np.int64)
    offset = 0
    for task, k in zip(tasks, kept_per_part, strict=True):
        table = pq.read_table(task.out_path)
        keep = ~drop[offset : offset + k]
        val = is_val[offset : offset + k]
        here = [i - offset for i in wanted if offset <= i < offset + k]
        if here:
            picked = table.take(here)
            for local, doc_id, text in zip(
                here, picked.column("doc_id").to_pylist(), picked.column("text").to_pylist(), strict=True
            ):
                snippets[offset + local] = (doc_id, text[:SAMPLE_CHARS])
        offset += k
        for name, mask in ((TRAIN, keep & ~val), (VAL, keep & val)):
            part = table.filter(pa.array(mask))
            if part.num_rows:
                writers[name].write_table(part)
                docs[name] += part.num_rows
        kept_text = table.filter(pa.array(keep)).column("text")  # lengths in Arrow: no Python strings
        bytes_out += int(pc.sum(pc.binary_length(kept_text)).as_py() or 0)
        hist_out += np.histogram(pc.utf8_length(kept_text).to_numpy(), bins=HIST_BINS)[0]
        del table, kept_text
        Path(task.out_path).unlink()
    for w in writers.values():
        w.close()
    with open(out_dir / DEDUP_PAIRS, "w", encoding="utf-8") as f:
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
    pa.default_memory_pool().release_unused()  # the next stage may run in this process
    trim_heap()
    if docs[TRAIN] == 0:
        raise DataError(
            f"no training documents are left: {n} passed the filters, {exact_dups} exact and {near_dups} "
            f"near duplicates removed, {docs[VAL]} went to validation (data.val_fraction={cfg.val_fraction})"
        )
    elapsed = time.perf_counter() - start

    metrics: dict[str, float] = {
        "clean/docs_in": agg.docs_in,
        "clean/docs_out": docs[TRAIN] + docs[VAL],
        "clean/bytes_in": agg.bytes_in,
        "clean/bytes_out": bytes_out,
        "clean/docs_filtered": agg.docs_in - n,
        "dedup/exact_dups": exact_dups,
        "dedup/exact_clusters": exact_clusters,
        "dedup/near_dups": near_dups,
        "dedup/clusters": near_clusters,
        "clean/train_docs": docs[TRAIN],
        "clean/val_docs": docs[VAL],
        "clean/seconds": elapsed,
        "clean/mb_per_s": agg.bytes_in / 2**20 / max(elapsed, 1e-9),
    }
    for reason, count in agg.reasons.items():
        metrics[f"clean/dropped/{reason}"] = count
    for kind, count in agg.counts.items():
        metrics[kind if "/" in kind else f"clean/{kind}"] = count
    for kind in ("email", "phone", "ip"):
        metrics.setdefault(f"pii/{kind}", 0)
        metrics[f"clean/pii/{kind}"] = metrics.pop(f"pii/{kind}")
    metrics = {k: float(v) for k, v in metrics.items()}
    settings = cfg.clean.model_dump()
    stats = {
        "metrics": metrics,
        "dropped": dict(agg.reasons.most_common()),
        "filters": settings,
        "dedup": {**cfg.dedup.model_dump(), "bands": bands, "rows": rows},
        "length_histogram": {
            "bins": HIST_BINS.tolist(),
            "in": agg.hist_in.tolist(),
            "out": hist_out.tolist(),
        },
    }
    (out_dir / STATS).write_text(json.dumps(stats, indent=2))
    _plot_lengths(out_dir / HIST, agg.hist_in, hist_out)
    _plot_dropped(
        out_dir / DROPPED_PLOT,
        {**agg.reasons, "exact duplicate": exact_dups, "near duplicate": near_dups},
        kept=docs[TRAIN] + docs[VAL],
    )
    return StageResult(
        metrics=metrics,
        params={"dedup.bands": bands, "dedup.rows": rows},  # the thresholds in force are the run's config params
        artifacts=[STATS, DROPPED, HIST, DROPPED_PLOT, DEDUP_PAIRS],
        outputs={"train": TRAIN, "val": VAL},
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


def _write_samples(path: Path, samples: dict[str, list[dict]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for reason in sorted(samples):
            for item in samples[reason]:
                f.write(json.dumps(item, ensure_ascii=False) + "\n")


def _plot_lengths(path: Path, hist_in: np.ndarray, hist_out: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    widths = np.diff(HIST_BINS)
    ax.bar(HIST_BINS[:-1], hist_in, width=widths, align="edge", alpha=0.5, label="ingested")
    ax.bar(
        HIST_BINS[:-1], hist_out, width=widths, align="edge", alpha=0.7, label="kept (filtered, deduplicated)"
    )
    ax.set_xscale("log")
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
        names, counts = zip(*items)
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
