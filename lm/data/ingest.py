"""Ingest: every configured source -> one ``documents.parquet`` (doc_id, source, text) + provenance.

Documents are written in row groups of about ``data.row_group_mb`` as they are read, so memory
stays bounded by one row group whatever the corpus size; the row groups are also the unit of
parallel work for the clean stage.
"""

from __future__ import annotations

import csv
import hashlib
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lm.config import DataConfig
from lm.data import sources
from lm.data.sources import FileReport, SourceFile
from lm.errors import DataError
from lm.stage import StageResult

DOCUMENTS = "documents.parquet"
PROVENANCE = "provenance.csv"
SCHEMA = pa.schema([("doc_id", pa.string()), ("source", pa.string()), ("text", pa.string())])


class DocumentWriter:
    """Streams (doc_id, source, text) rows into a parquet file, one row group per ~``group_bytes``."""

    def __init__(self, path: Path, group_bytes: int):
        self.writer = pq.ParquetWriter(path, SCHEMA, compression="zstd")
        self.group_bytes = group_bytes
        self.cols: tuple[list[str], list[str], list[str]] = ([], [], [])
        self.pending = 0
        self.documents = 0
        self.bytes = 0

    def add(self, doc_id: str, source: str, text: str) -> None:
        n = len(text.encode("utf-8", errors="surrogatepass"))
        self.cols[0].append(doc_id)
        self.cols[1].append(source)
        self.cols[2].append(text)
        self.pending += n
        self.bytes += n
        self.documents += 1
        if self.pending >= self.group_bytes:
            self.flush()

    def flush(self) -> None:
        if self.cols[0]:
            self.writer.write_table(
                pa.table(list(self.cols), schema=SCHEMA), row_group_size=len(self.cols[0])
            )
            self.cols = ([], [], [])
            self.pending = 0

    def close(self) -> None:
        self.flush()
        self.writer.close()


def _source_files(spec: str, cfg: DataConfig) -> list[SourceFile] | None:
    if spec == sources.STDLIB:
        return sources.stdlib_sources(cfg.stdlib_tests)
    if spec.startswith(sources.HF_PREFIX):
        return None
    return sources.resolve(spec)


def _check_bad_fraction(report: FileReport, max_bad_fraction: float) -> None:
    if report.lines and report.bad_lines / report.lines > max_bad_fraction:
        raise DataError(
            f"{report.path}: {report.bad_lines} of {report.lines} records are malformed or have no text "
            f"(first at lines {', '.join(map(str, report.first_bad_lines))}), more than "
            f"data.max_bad_fraction={max_bad_fraction}. Fix the file or raise the limit."
        )


def _progress(total: int | None, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="file", file=sys.stderr, disable=None, leave=False)


def ingest(cfg: DataConfig, *, out_dir: Path) -> StageResult:
    """Read every source in ``cfg.sources`` into ``documents.parquet`` and ``provenance.csv``."""
    out_dir = Path(out_dir)
    start = time.perf_counter()
    # Resolve every source first so that a missing path fails before any work is done.
    plan: list[tuple[str, list[SourceFile] | None]] = [(s, _source_files(s, cfg)) for s in cfg.sources]
    if not plan:
        raise DataError("data.sources is empty: give at least one file, directory, glob or 'stdlib'")
    writer = DocumentWriter(out_dir / DOCUMENTS, int(cfg.row_group_mb * 2**20))
    reports: list[FileReport] = []
    seen: set[str] = set()  # doc ids must be unique; a file listed by two sources is read once
    total_files = sum(len(f) if f is not None else 1 for _, f in plan)
    limit = cfg.max_docs
    bar = _progress(total_files, "ingest")
    try:
        for spec, files in plan:
            if files is None:
                report = FileReport(source=spec, path=spec)
                reports.append(report)
                for doc_id, text in sources.read_hf(spec, report, cfg.text_field, limit):
                    writer.add(doc_id, spec, text)
                    report.documents += 1
                    if limit is not None and writer.documents >= limit:
                        break
                bar.update(1)
                _check_bad_fraction(report, cfg.max_bad_fraction)
                continue
            for sf in files:
                if limit is not None and writer.documents >= limit:
                    break
                key = str(sf.path.resolve())
                if key in seen:
                    continue
                seen.add(key)
                report = FileReport(source=spec, path=str(sf.path))
                reports.append(report)
                for doc_id, text in sources.read_source_file(sf, report, cfg.text_field):
                    writer.add(doc_id, spec, text)
                    report.documents += 1
                    if limit is not None and writer.documents >= limit:
                        break
                _check_bad_fraction(report, cfg.max_bad_fraction)
                bar.update(1)
    finally:
        bar.close()
        writer.close()
    elapsed = time.perf_counter() - start

    _write_provenance(out_dir / PROVENANCE, reports)
    totals = {
        k: sum(getattr(r, k) for r in reports)
        for k in ("invalid_utf8", "bad_lines", "binary_skipped", "size")
    }
    if writer.documents == 0:
        raise DataError(
            f"no documents were read from data.sources={cfg.sources}: {len(reports)} files, "
            f"{totals['binary_skipped']} binary files skipped, {totals['bad_lines']} malformed records. "
            f"See the sources' contents or add text files."
        )
    digest = hashlib.sha256()
    for r in reports:
        digest.update(f"{r.path}\0{r.sha256}\0{r.documents}\n".encode())
    digest.update(f"text_field={cfg.text_field};max_docs={cfg.max_docs}".encode())
    metrics = {
        "ingest/documents": writer.documents,
        "ingest/bytes": writer.bytes,
        "ingest/files": len(reports),
        "ingest/file_bytes": totals["size"],
        "ingest/invalid_utf8": totals["invalid_utf8"],
        "ingest/bad_jsonl_lines": totals["bad_lines"],
        "ingest/binary_skipped": totals["binary_skipped"],
        "ingest/seconds": elapsed,
        "ingest/mb_per_s": writer.bytes / 2**20 / max(elapsed, 1e-9),
    }
    return StageResult(
        metrics={k: float(v) for k, v in metrics.items()},
        params={
            "sources": ",".join(cfg.sources),
            "text_field": cfg.text_field,
            "max_docs": cfg.max_docs,
            # Where the skipped records are, for a person to look (full list in provenance.csv).
            "bad_lines_first": "; ".join(
                f"{Path(r.path).name}: lines {' '.join(map(str, r.first_bad_lines))}"
                for r in reports
                if r.bad_lines
            )[:500],
        },
        artifacts=[PROVENANCE],
        outputs={"documents": DOCUMENTS, "provenance": PROVENANCE},
        datasets=[
            {
                "name": "documents",
                "path": DOCUMENTS,
                "digest": digest.hexdigest(),
                "source": ",".join(cfg.sources),
                "context": "ingest",
            }
        ],
    )


def _write_provenance(path: Path, reports: list[FileReport]) -> None:
    fields = [
        "source",
        "path",
        "size",
        "sha256",
        "documents",
        "invalid_utf8",
        "bad_lines",
        "lines",
        "binary_skipped",
        "first_bad_lines",
    ]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in reports:
            row = asdict(r)
            row["first_bad_lines"] = " ".join(map(str, r.first_bad_lines))
            w.writerow(row)
