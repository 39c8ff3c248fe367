"""Ingest: every configured source -> one ``documents.parquet`` (doc_id, source, text) + provenance.

Documents are written in row groups of about ``data.row_group_mb`` as they are read, and no
document is longer than ``data.max_doc_chars`` (longer ones are cut at line breaks), so memory
stays bounded whatever the corpus size; the row groups are also the unit of parallel work for
the clean stage.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import sys
import time
from collections.abc import Iterable
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


def _source_files(spec: str, cfg: DataConfig) -> Iterable[SourceFile] | None:
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


def _read_errors() -> tuple[type[Exception], ...]:
    """What the readers raise for a file they cannot read to its end (gzip's EOFError and BadGzipFile,
    zlib, zstd, Arrow, pandas' CSV parser, the OS)."""
    import zlib

    import pandas as pd
    import zstandard

    return (OSError, EOFError, zlib.error, zstandard.ZstdError, pa.ArrowException, pd.errors.ParserError)


READ_ERRORS = _read_errors()


def _read(sf: SourceFile, report: FileReport, cfg: DataConfig) -> Iterable[tuple[str, str]]:
    """The documents of one file; a file that cannot be read to its end (a truncated .gz, a file that
    is not what its name says, one we may not read) is an error naming it. Only reading is guarded
    here: an error writing our own outputs (a full disk) is the stage's, not the file's."""
    docs = sources.read_source_file(sf, report, cfg.text_field, cfg.max_doc_chars)
    while True:
        try:
            doc = next(docs)
        except StopIteration:
            return
        except READ_ERRORS as e:
            raise sources.unreadable_file(sf.path, e) from None
        yield doc


PROVENANCE_FIELDS = [
    "source",
    "path",
    "size",
    "sha256",
    "documents",
    "invalid_utf8",
    "split",
    "bad_lines",
    "lines",
    "binary_skipped",
    "first_bad_lines",
]
TOTALS = ("invalid_utf8", "split", "bad_lines", "binary_skipped", "size")
BAD_LINES_PARAM_CHARS = 500


class Provenance:
    """``provenance.csv`` written a row per file as ingest goes, with running totals and digest: its
    memory does not grow with the number of files."""

    def __init__(self, path: Path):
        self._f = open(path, "w", newline="", encoding="utf-8")
        self._csv = csv.DictWriter(self._f, fieldnames=PROVENANCE_FIELDS)
        self._csv.writeheader()
        self.files = 0
        self.totals = dict.fromkeys(TOTALS, 0)
        self.digest = hashlib.sha256()
        self.bad_lines_first = ""  # where skipped records are, for a person to look (params)
        self.not_utf8 = 0  # files with bytes that are not UTF-8
        self.not_utf8_first: list[str] = []

    def add(self, r: FileReport) -> None:
        row = asdict(r)
        row["first_bad_lines"] = " ".join(map(str, r.first_bad_lines))
        self._csv.writerow(row)
        self.files += 1
        for k in TOTALS:
            self.totals[k] += getattr(r, k)
        self.digest.update(f"{r.path}\0{r.sha256}\0{r.documents}\n".encode())
        if r.invalid_utf8:
            self.not_utf8 += 1
            if len(self.not_utf8_first) < 5:
                self.not_utf8_first.append(r.path)
        if r.bad_lines and len(self.bad_lines_first) < BAD_LINES_PARAM_CHARS:
            note = f"{Path(r.path).name}: lines {' '.join(map(str, r.first_bad_lines))}"
            self.bad_lines_first = f"{self.bad_lines_first}; {note}" if self.bad_lines_first else note

    def close(self) -> None:
        self._f.close()


def ingest(cfg: DataConfig, *, out_dir: Path) -> StageResult:
    """Read every source in ``cfg.sources`` into ``documents.parquet`` and ``provenance.csv``.

    Memory holds one row group of documents, one document of at most ``data.max_doc_chars``, and per
    file nothing (its provenance row is written at once), so it does not grow with the corpus."""
    out_dir = Path(out_dir)
    start = time.perf_counter()
    if not cfg.sources:
        raise DataError("data.sources is empty: give at least one file, directory, glob or 'stdlib'")
    # Walk every source once first (counting its files, keeping none) so that a missing path fails
    # before any work is done.
    total_files = 0
    for spec in cfg.sources:
        files = _source_files(spec, cfg)
        total_files += 1 if files is None else sum(1 for _ in files)
    writer = DocumentWriter(out_dir / DOCUMENTS, int(cfg.row_group_mb * 2**20))
    provenance = Provenance(out_dir / PROVENANCE)
    # Doc ids must be unique, so a file listed by two sources is read once. One source never lists
    # a file twice: the set is needed (and grows, 8 bytes a file) only with several.
    seen: set[bytes] | None = set() if len(cfg.sources) > 1 else None
    limit = cfg.max_docs
    bar = _progress(total_files, "ingest")

    def add(doc_id: str, spec: str, text: str, report: FileReport) -> bool:
        """Write a document (cut into pieces if it is too long); False once max_docs is reached."""
        for piece_id, piece in sources.split_document(doc_id, text, cfg.max_doc_chars, report):
            writer.add(piece_id, spec, piece)
            report.documents += 1
            if limit is not None and writer.documents >= limit:
                return False
        return True

    try:
        for spec in cfg.sources:
            files = _source_files(spec, cfg)
            if files is None:
                report = FileReport(source=spec, path=spec)
                for doc_id, text in sources.read_hf(spec, report, cfg.text_field, limit):
                    if not add(doc_id, spec, text, report):
                        break
                bar.update(1)
                _check_bad_fraction(report, cfg.max_bad_fraction)
                provenance.add(report)
                continue
            for sf in files:
                if limit is not None and writer.documents >= limit:
                    break
                if seen is not None:
                    key = hashlib.blake2b(str(sf.path.resolve()).encode(), digest_size=8).digest()
                    if key in seen:
                        continue
                    seen.add(key)
                report = FileReport(source=spec, path=str(sf.path))
                for doc_id, text in _read(sf, report, cfg):
                    if not add(doc_id, spec, text, report):
                        break
                _check_bad_fraction(report, cfg.max_bad_fraction)
                provenance.add(report)
                bar.update(1)
    except BaseException:
        # The files are abandoned (the stage's folder is not published): closing them must not hide
        # why (a full disk fails the close as well, with a less useful message).
        with contextlib.suppress(Exception):
            writer.close()
        with contextlib.suppress(Exception):
            provenance.close()
        raise
    finally:
        bar.close()
    writer.close()
    provenance.close()
    elapsed = time.perf_counter() - start

    totals = provenance.totals
    if provenance.files and provenance.not_utf8 / provenance.files > cfg.max_invalid_utf8_fraction:
        raise DataError(
            f"{provenance.not_utf8} of {provenance.files} source files are not UTF-8 text (first: "
            f"{', '.join(provenance.not_utf8_first)}): they were probably written in another encoding. "
            "Convert them (iconv -f latin1 -t utf-8 FILE), or raise data.max_invalid_utf8_fraction "
            f"(now {cfg.max_invalid_utf8_fraction}) to read them with replacement characters."
        )
    if writer.documents == 0:
        raise DataError(
            f"no documents were read from data.sources={cfg.sources}: {provenance.files} files, "
            f"{totals['binary_skipped']} binary files skipped, {totals['bad_lines']} malformed records. "
            f"See the sources' contents or add text files."
        )
    digest = provenance.digest
    digest.update(
        f"text_field={cfg.text_field};max_docs={cfg.max_docs};max_doc_chars={cfg.max_doc_chars}".encode()
    )
    metrics = {
        "ingest/documents": writer.documents,
        "ingest/bytes": writer.bytes,
        "ingest/files": provenance.files,
        "ingest/file_bytes": totals["size"],
        "ingest/invalid_utf8": totals["invalid_utf8"],
        "ingest/split_documents": totals["split"],
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
            "max_doc_chars": cfg.max_doc_chars,
            # Where the skipped records are, for a person to look (full list in provenance.csv).
            "bad_lines_first": provenance.bad_lines_first[:BAD_LINES_PARAM_CHARS],
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
