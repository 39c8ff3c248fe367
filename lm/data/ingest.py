"""Ingest: every configured source -> ``documents/`` (doc_id, source, text in parquet parts) + provenance.

Documents are written in row groups of about ``data.row_group_mb`` as they are read, and no
document is longer than ``data.max_doc_chars`` (longer ones are cut at line breaks), so memory
stays bounded whatever the corpus size; the row groups are also the unit of parallel work for
the clean stage. The row groups are kept in part files (``documents/part-00000.parquet`` ...); a
part ends after a file chosen by the hash of its name (:func:`ends_part`, about one in
:data:`PART_FILES`) or once it holds :data:`PART_GROUPS` row groups' worth of text. :class:`Documents`
reads the parts as one sequence.

A retrain extends an earlier ingest (``previous``) instead of reading everything again: a file
whose path, size and modification time are those the earlier ingest read is not read, its
documents are copied from the earlier documents (as Arrow data, never as Python strings), and a
part made only of unchanged files that the earlier ingest also put in one part is that part's
file, hard-linked: nothing of it is read or written. Only new and changed files are read, and
removed files' documents are left out. What is written is what a full ingest of the same files
writes, byte for byte: the same documents in the same order, cut into the same row groups and
parts (part boundaries depend on file names, and on sizes only within a part). ``ingest_index.json``
(per file: its stat, the rows and bytes of its documents, its provenance row) and
``doc_digests.npy`` (per document: a digest of its source and text, which the clean stage matches
its own earlier work by) make that possible.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lm.config import DataConfig
from lm.data import sources
from lm.data.sources import FileReport, SourceFile
from lm.errors import DataError
from lm.pipeline.stage import StageResult

DOCUMENTS = "documents"  # a folder of parquet parts (PART), read as one sequence by Documents
PART = "part-{:05d}.parquet"
PART_FILES = 64  # a part ends after a file whose name's hash says so (1 file in PART_FILES) ...
PART_GROUPS = 16  # ... or once it holds this many row groups' worth of text
PROVENANCE = "provenance.csv"
INDEX = "ingest_index.json"  # per source file: stat, rows of its documents, provenance row
DIGESTS = "doc_digests.npy"  # uint64 per document: document_digest(source, text)
SCHEMA = pa.schema([("doc_id", pa.string()), ("source", pa.string()), ("text", pa.string())])
INDEX_VERSION = 2


def document_digest(source: str, text: str) -> int:
    """64-bit digest of a document's source and text: what tells the clean stage a document it
    cleaned before from a new or changed one (with its id)."""
    h = hashlib.blake2b(source.encode("utf-8", errors="surrogatepass"), digest_size=8)
    h.update(b"\0")
    h.update(text.encode("utf-8", errors="surrogatepass"))
    return int.from_bytes(h.digest(), "little")


def ends_part(name: str) -> bool:
    """Whether a part of the documents ends after this file: decided by its name alone (its path
    relative to its source's root, ``SourceFile.name``: the same wherever the corpus lies), so a
    change in one file moves no part boundary but its own part's (parts are cut where the content
    says, not every so many files), and a retrain finds the unchanged parts again."""
    h = hashlib.blake2b(name.encode("utf-8", errors="surrogatepass"), digest_size=8)
    return int.from_bytes(h.digest(), "little") % PART_FILES == 0


class Documents:
    """The documents of an ingest as one sequence of row groups: the part files of its
    :data:`DOCUMENTS` folder in order, or a single parquet file given instead."""

    def __init__(self, path: Path):
        path = Path(path)
        self.files = sorted(path.glob("part-*.parquet")) if path.is_dir() else [path]
        # Footers only: a file is opened when it is read, one at a time (a large corpus has more
        # parts than a process may keep open).
        meta = [pq.read_metadata(f) for f in self.files]
        # Per row group: (file, row group in that file).
        self.groups = [(i, g) for i, m in enumerate(meta) for g in range(m.num_row_groups)]
        self.group_rows = np.array([meta[i].row_group(g).num_rows for i, g in self.groups], dtype=np.int64)
        self.file_rows = np.array([m.num_rows for m in meta], dtype=np.int64)
        self._current: tuple[int, pq.ParquetFile] | None = None

    def _file(self, i: int) -> pq.ParquetFile:
        if self._current is None or self._current[0] != i:
            if self._current is not None:
                self._current[1].close()
            self._current = (i, pq.ParquetFile(self.files[i]))
        return self._current[1]

    @property
    def num_row_groups(self) -> int:
        return len(self.groups)

    @property
    def num_rows(self) -> int:
        return int(self.file_rows.sum())

    def read_row_group(self, group: int, columns: list[str] | None = None) -> pa.Table:
        i, g = self.groups[group]
        return self._file(i).read_row_group(g, columns=columns)

    def locate(self, group: int) -> tuple[str, int]:
        """(file, row group in it) of row group ``group``: what a worker opens by itself."""
        i, g = self.groups[group]
        return str(self.files[i]), g

    def column(self, name: str) -> list:
        return [v for i in range(len(self.files)) for v in self._file(i).read(columns=[name]).column(0).to_pylist()]

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """Every document at once (tests, small corpora): memory grows with the corpus."""
        tables = [self._file(i).read(columns=columns) for i in range(len(self.files))]
        return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


class DocumentWriter:
    """Streams (doc_id, source, text) rows into the part files of a folder (:meth:`end_part` ends
    one), one row group per ~``group_bytes``: a group ends after the document that brings it to
    ``group_bytes``, whether the documents came one by one (:meth:`add`) or as rows of an earlier
    ingest (:meth:`copy`), so both write the same files. A part made only of an earlier part's rows
    is that part's file, linked rather than written again."""

    def __init__(self, folder: Path, group_bytes: int):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob("part-*.parquet"):  # an earlier ingest into the same folder
            stale.unlink()
        self.parts = 0  # part files made
        self.writer: pq.ParquetWriter | None = None  # the current part's, once it has rows
        self.part_start = 0  # bytes before the current part
        self.linked = 0  # parts linked from an earlier ingest
        self.group_bytes = group_bytes
        self.cols: tuple[list[str], list[str], list[str]] = ([], [], [])
        self.tables: list[pa.Table] = []  # pending rows, in order (the Python rows last)
        self.pending = 0
        self.documents = 0
        self.bytes = 0
        self.digests: list[np.ndarray] = []
        self.new_digests: list[int] = []
        # A range of earlier rows not yet added (earlier, first row, rows, their text's bytes): they
        # are read only when the part they are in turns out not to be an earlier part as a whole.
        self.copying: tuple[Earlier, int, int, int] | None = None

    def copy(self, earlier: Earlier, first: int, count: int, nbytes: int) -> None:
        """Rows ``first .. first + count`` of an earlier ingest's documents (``nbytes`` of text);
        consecutive ranges are copied as one (a file at a time would cost a fraction of a
        millisecond each)."""
        if self.copying is not None and self.copying[1] + self.copying[2] == first:
            self.copying = (earlier, self.copying[1], self.copying[2] + count, self.copying[3] + nbytes)
        else:
            self._copy_pending()
            self.copying = (earlier, first, count, nbytes)
        self.documents += count
        self.bytes += nbytes

    def _copy_pending(self) -> None:
        if self.copying is not None:
            earlier, first, count, nbytes = self.copying
            self.copying = None
            self.documents -= count
            self.bytes -= nbytes
            self.add_table(*earlier.rows(first, count))

    def add(self, doc_id: str, source: str, text: str) -> None:
        self._copy_pending()
        n = len(text.encode("utf-8", errors="surrogatepass"))
        self.cols[0].append(doc_id)
        self.cols[1].append(source)
        self.cols[2].append(text)
        self.new_digests.append(document_digest(source, text))
        self.pending += n
        self.bytes += n
        self.documents += 1
        if self.pending >= self.group_bytes:
            self.flush()

    def add_table(self, table: pa.Table, digests: np.ndarray) -> None:
        """Rows of an earlier documents.parquet (and their digests), cut into row groups as
        :meth:`add` would have cut them."""
        self._python_rows_to_table()
        sizes = pc.binary_length(table.column("text")).to_numpy(zero_copy_only=False).astype(np.int64)
        start = 0
        while start < table.num_rows:
            total = self.pending + np.cumsum(sizes[start:])
            end = int(np.searchsorted(total, self.group_bytes, side="left"))  # this row fills the group
            if end >= total.size:
                self.tables.append(table.slice(start))
                self.pending = int(total[-1])
                break
            self.tables.append(table.slice(start, end + 1))
            self.pending = int(total[end])
            self.flush()
            start += end + 1
        self.digests.append(np.asarray(digests, dtype=np.uint64))
        self.documents += table.num_rows
        self.bytes += int(sizes.sum())

    def _python_rows_to_table(self) -> None:
        if self.cols[0]:
            self.tables.append(pa.table(list(self.cols), schema=SCHEMA))
            self.digests.append(np.array(self.new_digests, dtype=np.uint64))
            self.cols, self.new_digests = ([], [], []), []

    def flush(self) -> None:
        self._python_rows_to_table()
        if self.tables:
            # One contiguous chunk: Parquet pages (and so the file's bytes) then do not depend on
            # where the rows came from.
            table = pa.concat_tables(self.tables).combine_chunks()
            if self.writer is None:
                self.writer = pq.ParquetWriter(self.folder / PART.format(self.parts), SCHEMA, compression="zstd")
            self.writer.write_table(table, row_group_size=table.num_rows)
            self.tables = []
            self.pending = 0

    @property
    def part_bytes(self) -> int:
        return self.bytes - self.part_start

    def end_part(self) -> None:
        """End the current part: its last row group is written and its file closed; or, if the part
        is exactly the rows of one earlier part, that part's file is linked (nothing is read)."""
        linked = self._link()
        if not linked:
            self._copy_pending()
            self.flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            self.parts += 1
        elif linked:
            self.parts += 1
        self.part_start = self.bytes

    def _link(self) -> bool:
        if self.copying is None or self.writer is not None or self.tables or self.cols[0]:
            return False
        earlier, first, count, _ = self.copying
        part = earlier.part_at(first, count)
        if part is None:
            return False
        target = self.folder / PART.format(self.parts)
        try:
            os.link(part, target)
        except OSError:  # another file system, or one without hard links
            shutil.copyfile(part, target)
        self.copying = None
        self.digests.append(earlier.digest_rows(first, count))
        self.linked += 1
        return True

    def close(self) -> None:
        self.end_part()

    def abort(self) -> None:
        """Close the current part's file as it is (the folder is being abandoned)."""
        if self.writer is not None:
            self.writer.close()

    def all_digests(self) -> np.ndarray:
        self._python_rows_to_table()
        return np.concatenate(self.digests) if self.digests else np.zeros(0, np.uint64)


@dataclass
class Earlier:
    """An earlier ingest that this one extends: its documents and, per file, what it read."""

    folder: Path
    files: dict[tuple[str, str], dict]  # (source, path as the source lists it) -> its index entry
    docs: Documents | None = None  # opened when the first file is reused
    digests: np.ndarray | None = None
    starts: np.ndarray | None = None  # first row of each of its row groups (and the row count last)
    part_starts: np.ndarray | None = None  # first row of each of its parts (and the row count last)
    cached: dict[int, pa.Table] = field(default_factory=dict)  # the row groups last read

    @classmethod
    def open(cls, folder: Path, cfg: DataConfig) -> Earlier | None:
        """The earlier ingest in ``folder`` if its documents can be reused with ``cfg``: it has an
        index and was cut with the same settings."""
        try:
            index = json.loads((folder / INDEX).read_text())
        except (OSError, ValueError):
            return None
        if index.get("version") != INDEX_VERSION or index.get("settings") != _reuse_settings(cfg):
            return None
        return cls(folder, {(f["source"], f["path"]): f for f in index["files"]})

    def reusable(self, spec: str, sf: SourceFile, stat: os.stat_result) -> dict | None:
        """The earlier entry of this file if it is unchanged (same name, size and modification time)."""
        entry = self.files.get((spec, str(sf.path)))
        if entry is None or (entry["name"], entry["size"], entry["mtime_ns"]) != (sf.name, stat.st_size, stat.st_mtime_ns):
            return None
        return entry

    def rows(self, first: int, count: int) -> tuple[pa.Table, np.ndarray]:
        """Rows ``first .. first + count`` of the earlier documents. Files are reused in about the
        order they were written, so only the row groups holding the last rows asked for are kept
        in memory (memory does not grow with the corpus)."""
        self._open_documents()
        if count == 0:  # a binary file: skipped, no documents
            return SCHEMA.empty_table(), self.digests[:0]
        lo = int(np.searchsorted(self.starts, first, side="right")) - 1
        hi = int(np.searchsorted(self.starts, first + count, side="left"))
        groups = range(lo, max(hi, lo + 1))
        self.cached = {g: self.cached[g] if g in self.cached else self.docs.read_row_group(g) for g in groups}
        table = pa.concat_tables([self.cached[g] for g in groups])
        return table.slice(first - int(self.starts[lo]), count), self.digests[first : first + count]

    def _open_documents(self) -> None:
        if self.docs is None:
            self.docs = Documents(self.folder / DOCUMENTS)
            self.digests = np.load(self.folder / DIGESTS)
            self.starts = np.concatenate(([0], np.cumsum(self.docs.group_rows))).astype(np.int64)
            self.part_starts = np.concatenate(([0], np.cumsum(self.docs.file_rows))).astype(np.int64)

    def part_at(self, first: int, count: int) -> Path | None:
        """The earlier part file that holds exactly rows ``first .. first + count``, if one does."""
        self._open_documents()
        i = int(np.searchsorted(self.part_starts, first, side="left"))
        if count and i < len(self.docs.files) and self.part_starts[i] == first and self.part_starts[i + 1] == first + count:
            return self.docs.files[i]
        return None

    def digest_rows(self, first: int, count: int) -> np.ndarray:
        self._open_documents()
        return self.digests[first : first + count]


def _reuse_settings(cfg: DataConfig) -> dict:
    """What decides the documents of a file and how they are cut into row groups: an earlier
    ingest with other values is not extended."""
    return {"text_field": cfg.text_field, "max_doc_chars": cfg.max_doc_chars, "row_group_mb": cfg.row_group_mb}


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
        row = dict(vars(r))  # (dataclasses.asdict deep-copies: 10x slower, a file at a time)
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


@dataclass
class IngestRun:
    """What an ingest writes to, and what it has done so far."""

    writer: DocumentWriter
    provenance: Provenance
    earlier: Earlier | None  # an earlier ingest whose unchanged files are copied, not read
    limit: int | None  # data.max_docs
    seen: set[tuple[int, int]] | None  # (device, inode) of the files read, with several sources
    index_files: list[dict] = field(default_factory=list)  # per file, its entry of INDEX
    files_read: int = 0
    files_reused: int = 0

    @property
    def full(self) -> bool:
        """Whether data.max_docs documents are written."""
        return self.limit is not None and self.writer.documents >= self.limit


def ingest(cfg: DataConfig, *, out_dir: Path, previous: Path | None = None) -> StageResult:
    """Read every source in ``cfg.sources`` into ``documents.parquet`` and ``provenance.csv``.

    Memory holds one row group of documents, one document of at most ``data.max_doc_chars``, and per
    file its index entry, so it does not grow with the corpus. ``previous``: an earlier ingest's
    folder whose unchanged files are copied instead of read (see the module docstring); it is only
    read. With ``data.max_docs`` (a cap that cuts the corpus anywhere) everything is read."""
    out_dir = Path(out_dir)
    start = time.perf_counter()
    earlier = Earlier.open(Path(previous), cfg) if previous is not None and cfg.max_docs is None else None
    if not cfg.sources:
        raise DataError("data.sources is empty: give at least one file, directory, glob or 'stdlib'")
    total_files, listed = _walk_sources(cfg)
    run = IngestRun(
        DocumentWriter(out_dir / DOCUMENTS, int(cfg.row_group_mb * 2**20)),
        Provenance(out_dir / PROVENANCE),
        earlier,
        cfg.max_docs,
        # Doc ids must be unique, so a file listed by two sources (by the same path, a link or a
        # symlink: the same device and inode) is read once. One source never lists a file twice: the
        # set is needed (and grows, a pair of ints a file) only with several.
        set() if len(cfg.sources) > 1 else None,
    )
    _read_sources(cfg, run, listed, total_files)
    run.writer.close()
    run.provenance.close()
    _write_index_and_digests(out_dir, cfg, run)
    elapsed = time.perf_counter() - start
    _check_documents(cfg, run.provenance, run.writer)
    return _ingest_result(cfg, run, elapsed)


def _walk_sources(cfg: DataConfig) -> tuple[int, dict[str, list[SourceFile]]]:
    """Walk every source once (counting its files, keeping none) so that a missing path fails before
    any work is done. Returns the number of files, and the stdlib's files (a list already, walked once)."""
    total_files = 0
    listed: dict[str, list[SourceFile]] = {}
    for spec in cfg.sources:
        files = _source_files(spec, cfg)
        if isinstance(files, list):
            listed[spec] = files
        total_files += 1 if files is None else sum(1 for _ in files)
    return total_files, listed


def _read_sources(cfg: DataConfig, run: IngestRun, listed: dict[str, list[SourceFile]], total_files: int) -> None:
    """Every source's files, in order, into the run's documents, provenance and index."""
    bar = _progress(total_files, "ingest")
    try:
        for spec in cfg.sources:
            files = listed[spec] if spec in listed else _source_files(spec, cfg)
            if files is None:
                _ingest_hf(cfg, run, spec, bar)
                continue
            for sf in files:
                if run.full:
                    break
                _ingest_file(cfg, run, spec, sf, bar)
    except BaseException:
        # The files are abandoned (the stage's folder is not published): closing them must not hide
        # why (a full disk fails the close as well, with a less useful message).
        with contextlib.suppress(Exception):
            run.writer.abort()
        with contextlib.suppress(Exception):
            run.provenance.close()
        raise
    finally:
        bar.close()


def _ingest_hf(cfg: DataConfig, run: IngestRun, spec: str, bar) -> None:
    """A Hugging Face dataset: one provenance row, and a part of its own."""
    report = FileReport(source=spec, path=spec)
    for doc_id, text in sources.read_hf(spec, report, cfg.text_field, run.limit):
        if not _add_document(cfg, run, doc_id, spec, text, report):
            break
    bar.update(1)
    run.files_read += 1
    _check_bad_fraction(report, cfg.max_bad_fraction)
    run.provenance.add(report)
    run.writer.end_part()


def _ingest_file(cfg: DataConfig, run: IngestRun, spec: str, sf: SourceFile, bar) -> None:
    """One source file (skipped if another source listed it already): its documents, provenance row
    and index entry; the part ends after it if its name or the part's size says so."""
    stat = sf.path.stat()
    if run.seen is not None:
        if (stat.st_dev, stat.st_ino) in run.seen:
            return
        run.seen.add((stat.st_dev, stat.st_ino))
    writer = run.writer
    first, first_bytes = writer.documents, writer.bytes
    report = _copy_or_read(cfg, run, spec, sf, stat)
    _check_bad_fraction(report, cfg.max_bad_fraction)
    run.provenance.add(report)
    run.index_files.append({
        "source": spec, "path": str(sf.path), "name": sf.name, "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns, "first": first, "count": writer.documents - first,
        "bytes": writer.bytes - first_bytes,
        "report": {**vars(report), "first_bad_lines": list(report.first_bad_lines)},
    })
    bar.update(1)
    if ends_part(sf.name) or writer.part_bytes >= PART_GROUPS * writer.group_bytes:
        writer.end_part()


def _copy_or_read(cfg: DataConfig, run: IngestRun, spec: str, sf: SourceFile, stat: os.stat_result) -> FileReport:
    """A file's documents into the writer: copied if the earlier ingest read it unchanged, else read."""
    entry = None if run.earlier is None else run.earlier.reusable(spec, sf, stat)
    if entry is not None:
        run.writer.copy(run.earlier, entry["first"], entry["count"], entry["bytes"])
        run.files_reused += 1
        return FileReport(**entry["report"])
    report = FileReport(source=spec, path=str(sf.path))
    for doc_id, text in _read(sf, report, cfg):
        if not _add_document(cfg, run, doc_id, spec, text, report):
            break
    run.files_read += 1
    return report


def _add_document(cfg: DataConfig, run: IngestRun, doc_id: str, spec: str, text: str, report: FileReport) -> bool:
    """Write a document (cut into pieces if it is too long); False once max_docs is reached."""
    for piece_id, piece in sources.split_document(doc_id, text, cfg.max_doc_chars, report):
        run.writer.add(piece_id, spec, piece)
        report.documents += 1
        if run.full:
            return False
    return True


def _write_index_and_digests(out_dir: Path, cfg: DataConfig, run: IngestRun) -> None:
    """What a retrain extends this ingest by: the documents' digests and the per-file index."""
    np.save(out_dir / DIGESTS, run.writer.all_digests())
    (out_dir / INDEX).write_text(
        json.dumps({"version": INDEX_VERSION, "settings": _reuse_settings(cfg), "files": run.index_files})
    )


def _check_documents(cfg: DataConfig, provenance: Provenance, writer: DocumentWriter) -> None:
    """Fail, saying what to do, when most files are not UTF-8 or no document was read."""
    if provenance.files and provenance.not_utf8 / provenance.files > cfg.max_invalid_utf8_fraction:
        raise DataError(
            f"{provenance.not_utf8} of {provenance.files} source files are not UTF-8 text (first: "
            f"{', '.join(provenance.not_utf8_first)}): they were probably written in another encoding. "
            "Convert them (iconv -f latin1 -t utf-8 FILE), or raise data.max_invalid_utf8_fraction "
            f"(now {cfg.max_invalid_utf8_fraction}) to read them with replacement characters."
        )
    if writer.documents == 0:
        totals = provenance.totals
        raise DataError(
            f"no documents were read from data.sources={cfg.sources}: {provenance.files} files, "
            f"{totals['binary_skipped']} binary files skipped, {totals['bad_lines']} malformed records. "
            f"See the sources' contents or add text files."
        )


def _ingest_metrics(run: IngestRun, elapsed: float) -> dict[str, float]:
    writer, provenance, totals = run.writer, run.provenance, run.provenance.totals
    metrics = {
        "ingest/documents": writer.documents,
        "ingest/bytes": writer.bytes,
        "ingest/files": provenance.files,
        "ingest/files_read": run.files_read,  # read and parsed by this run
        "ingest/files_reused": run.files_reused,  # unchanged since the earlier ingest: copied from it
        "ingest/parts": writer.parts,  # part files of documents/
        "ingest/parts_linked": writer.linked,  # parts of the earlier ingest taken as they were
        "ingest/file_bytes": totals["size"],
        "ingest/invalid_utf8": totals["invalid_utf8"],
        "ingest/split_documents": totals["split"],
        "ingest/bad_jsonl_lines": totals["bad_lines"],
        "ingest/binary_skipped": totals["binary_skipped"],
        "ingest/seconds": elapsed,
        "ingest/mb_per_s": writer.bytes / 2**20 / max(elapsed, 1e-9),
    }
    return {k: float(v) for k, v in metrics.items()}


def _ingest_result(cfg: DataConfig, run: IngestRun, elapsed: float) -> StageResult:
    digest = run.provenance.digest
    digest.update(
        f"text_field={cfg.text_field};max_docs={cfg.max_docs};max_doc_chars={cfg.max_doc_chars}".encode()
    )
    return StageResult(
        metrics=_ingest_metrics(run, elapsed),
        params={
            "sources": ",".join(cfg.sources),
            "text_field": cfg.text_field,
            "max_docs": cfg.max_docs,
            "max_doc_chars": cfg.max_doc_chars,
            # Where the skipped records are, for a person to look (full list in provenance.csv).
            "bad_lines_first": run.provenance.bad_lines_first[:BAD_LINES_PARAM_CHARS],
        },
        artifacts=[PROVENANCE],
        outputs={"documents": DOCUMENTS, "provenance": PROVENANCE, "index": INDEX, "digests": DIGESTS},
        tags={"lmforge.extends": str(run.earlier.folder)} if run.files_reused else {},
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
