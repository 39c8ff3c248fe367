"""Document readers: one generator per kind of source file, and the built-in stdlib corpus.

Every reader yields ``(doc_id, text)`` pairs and fills a :class:`FileReport` with what it saw
(documents, invalid UTF-8, malformed lines), so bad input is counted and reported instead of
silently dropped or crashing the stage. Readers stream: a JSONL/CSV/Parquet file of any size is
read record by record or batch by batch, never whole.
"""

from __future__ import annotations

import codecs
import errno
import glob
import gzip
import hashlib
import io
import json
import os
import socket
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lm.errors import DataError
from lm.fileio import file_sha256

COMPRESSIONS = (".gz", ".zst")
TABLE_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}
# Directories never walked: VCS metadata and bytecode caches are not documents.
SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__", ".ipynb_checkpoints"}
BINARY_SNIFF = 8192  # bytes inspected for a NUL byte, the mark of a binary file (as git does)
READ_CHUNK = 1 << 20  # bytes read at a time from a text file
FIRST_BAD_LINES = 5  # line numbers of malformed records reported per file
STDLIB = "stdlib"
HF_PREFIX = "hf:"


@dataclass
class FileReport:
    """One row of provenance.csv."""

    source: str
    path: str
    size: int = 0
    sha256: str = ""
    documents: int = 0
    invalid_utf8: int = 0  # documents that held invalid UTF-8 (decoded with U+FFFD)
    split: int = 0  # documents longer than data.max_doc_chars, cut into pieces
    bad_lines: int = 0  # malformed JSONL lines or records without usable text
    lines: int = 0  # records seen (JSONL/CSV/Parquet)
    binary_skipped: int = 0
    first_bad_lines: list[int] = field(default_factory=list)

    def bad_line(self, lineno: int) -> None:
        self.bad_lines += 1
        if len(self.first_bad_lines) < FIRST_BAD_LINES:
            self.first_bad_lines.append(lineno)


@dataclass
class SourceFile:
    """A file to read: its path, the config source it came from and its id prefix."""

    source: str
    path: Path
    name: str  # doc_id prefix: path relative to the source's root, or stdlib:<relpath>


def kind_of(path: Path) -> str:
    """``jsonl``, ``csv``, ``parquet`` or ``text`` from the suffix (after .gz/.zst)."""
    name = path.name.lower()
    for comp in COMPRESSIONS:
        if name.endswith(comp):
            name = name[: -len(comp)]
    return TABLE_KINDS.get(os.path.splitext(name)[1], "text")


def open_binary(path: Path) -> io.BufferedIOBase:
    """Open a file for reading bytes, decompressing .gz and .zst on the fly."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(
            zstandard.ZstdDecompressor().stream_reader(
                open(path, "rb"), read_across_frames=True, closefd=True
            )
        )
    return open(path, "rb")


def decode(raw: bytes, report: FileReport) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        report.invalid_utf8 += 1
        return raw.decode("utf-8", errors="replace")


def _has_glob(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def _walk(root: Path, key: str | None, skip: frozenset[str] | set[str] = SKIP_DIRS) -> Iterator[Path]:
    """Regular files under ``root`` in sorted order, directory by directory (never the whole list at
    once). Symbolic links to folders are not followed (a link back up would loop); links that loop or
    point nowhere, sockets and pipes hold no document and are passed over. A folder that cannot be
    listed is an error naming the config ``key`` (None: passed over, as for the stdlib)."""

    def unreadable(e: OSError) -> None:
        if key is not None:
            raise DataError(f"{key}: folder {e.filename} cannot be read ({e.strerror}): make it readable or leave it out")

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for f in sorted(filenames):
            p = Path(dirpath) / f
            if p.is_file():
                yield p


def resolve(spec: str, key: str = "data.sources") -> Iterator[SourceFile]:
    """Files of one path/glob/directory source, sorted so that ingest is deterministic.

    A generator: a directory of a million files is walked, not listed. The errors (a missing path,
    an empty directory, a glob that matches nothing), naming the config ``key`` that gave ``spec``,
    are raised at the first ``next()``."""
    if _has_glob(spec):
        # glob's own order is the file system's: sort (as strings, 10x smaller than Paths).
        paths = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
        found = False
        # "**" follows links to folders, and one that points back up repeats the same files some 40
        # levels deep: each file is read once, under the first name that reaches it.
        seen: set[str] = set()
        for name in paths:
            p = Path(name)
            if p.is_file() and not (set(p.parts) & SKIP_DIRS):
                real = os.path.realpath(name)
                if real in seen:
                    continue
                seen.add(real)
                found = True
                yield SourceFile(spec, p, name)
        if not found:
            raise DataError(f"{key}: {spec!r}: the glob matches no files")
        return
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        found = False
        for p in _walk(path, key):
            found = True
            yield SourceFile(spec, p, str(p.relative_to(path)))
        if not found:
            raise DataError(f"{key}: {spec!r}: the directory holds no files")
        return
    if path.is_file():
        yield SourceFile(spec, path, str(path))
        return
    if path.is_symlink():
        raise DataError(f"{key}: {spec!r} is a symbolic link that loops or points to nothing")
    if key == "data.sources":
        raise DataError(
            f"data source {spec!r} does not exist: give a file, directory, glob, 'stdlib' or 'hf:<dataset>' "
            "in data.sources"
        )
    raise DataError(f"{key}={spec!r} does not exist")


def file_specs(value: Any) -> list[str | None]:
    """The sources a config value names: a path, a list of paths, or a list of {path, weight}."""
    return [v["path"] if isinstance(v, dict) else v for v in (value if isinstance(value, list) else [value])]


def piece_id(doc_id: str, i: int) -> str:
    """The id of piece ``i`` of a document cut by :func:`split_document`: the first keeps the id."""
    return doc_id if i == 0 else f"{doc_id}#{i}"


def _cut(text: str, start: int, max_chars: int) -> int:
    """End of the piece of ``text`` that begins at ``start``: after the last line break in the second
    half of the next ``max_chars`` characters, else after exactly ``max_chars`` of them."""
    end = start + max_chars
    return text.rfind("\n", start + max_chars // 2, end) + 1 or end


def split_document(doc_id: str, text: str, max_chars: int, report: FileReport) -> Iterator[tuple[str, str]]:
    """``text`` whole, or (longer than ``max_chars``) cut at line breaks into consecutive pieces that
    join back into it exactly; counted in ``report.split``."""
    if len(text) <= max_chars:
        yield doc_id, text
        return
    report.split += 1
    start, i = 0, 0
    while len(text) - start > max_chars:
        end = _cut(text, start, max_chars)
        yield piece_id(doc_id, i), text[start:end]
        start, i = end, i + 1
    yield piece_id(doc_id, i), text[start:]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_test_path(rel: Path) -> bool:
    return any(p in ("test", "tests", "idle_test") for p in rel.parts[:-1])


def stdlib_files(include_tests: bool = True) -> list[Path]:
    """The standard library's own .py files, sorted, without site-packages (installed packages)."""
    root = stdlib_root()
    out = []
    # Installed packages are not walked at all (tens of thousands of files in a training venv).
    for p in _walk(root, None, SKIP_DIRS | {"site-packages", "dist-packages"}):
        rel = p.relative_to(root)
        if p.suffix != ".py" or "site-packages" in rel.parts or "dist-packages" in rel.parts:
            continue
        if not include_tests and _is_test_path(rel):
            continue
        if rel.parts == ("pydoc_data", "topics.py"):  # read topic by topic, see stdlib_sources
            continue
        out.append(p)
    return out


def stdlib_sources(include_tests: bool = True) -> list[SourceFile]:
    root = stdlib_root()
    files = [SourceFile(STDLIB, p, f"stdlib:{p.relative_to(root)}") for p in stdlib_files(include_tests)]
    # The pydoc topics (the language reference as help() shows it) are prose, one doc per topic.
    import pydoc_data.topics

    files.append(SourceFile(STDLIB, Path(pydoc_data.topics.__file__), "stdlib:pydoc_data/topics"))
    return files


def read_pydoc_topics(sf: SourceFile, report: FileReport) -> Iterator[tuple[str, str]]:
    import pydoc_data.topics

    report.size = sf.path.stat().st_size
    report.sha256 = file_sha256(sf.path)
    for topic in sorted(pydoc_data.topics.topics):
        report.lines += 1
        yield f"{sf.name}/{topic}", pydoc_data.topics.topics[topic]


def read_text_file(sf: SourceFile, report: FileReport, max_chars: int) -> Iterator[tuple[str, str]]:
    """One document per file, read in chunks; a file of more than ``max_chars`` characters becomes
    several documents cut at line breaks (:func:`split_document`), so memory never holds more than
    about ``max_chars`` of it. Binary files (a NUL byte in the first 8 KiB) are skipped and counted
    after reading only that much (a directory may hold gigabytes of shared libraries)."""
    report.size = sf.path.stat().st_size
    compressed = sf.path.name.lower().endswith(COMPRESSIONS)
    h = hashlib.sha256()
    with open_binary(sf.path) as f:
        chunk = f.read(BINARY_SNIFF)
        if b"\x00" in chunk:
            report.binary_skipped += 1
            return
        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        buf, pieces = "", 0
        while True:
            h.update(chunk)
            final = not chunk
            try:
                buf += decoder.decode(chunk, final)
            except UnicodeDecodeError:
                # From here on invalid bytes become U+FFFD; the bytes the strict decoder held back
                # (a sequence split across chunks) are decoded again with the chunk.
                report.invalid_utf8 += 1
                held = decoder.getstate()[0]
                decoder = codecs.getincrementaldecoder("utf-8")("replace")
                buf += decoder.decode(held + chunk, final)
            while len(buf) > max_chars:
                end = _cut(buf, 0, max_chars)
                yield piece_id(sf.name, pieces), buf[:end]
                buf, pieces = buf[end:], pieces + 1
            if final:
                break
            chunk = f.read(READ_CHUNK)
    report.sha256 = file_sha256(sf.path) if compressed else h.hexdigest()
    if pieces:
        report.split += 1
    if buf or not pieces:
        yield piece_id(sf.name, pieces), buf


def _record_text(rec: object, field_name: str, where: str) -> str | None:
    if not isinstance(rec, dict):
        return None
    if field_name not in rec:
        keys = ", ".join(sorted(map(str, rec))) or "(none)"
        raise DataError(
            f"{where}: the record has no field {field_name!r}; its fields are: {keys}. "
            "Set data.text_field to the field that holds the text."
        )
    value = rec[field_name]
    if value is None or isinstance(value, (dict, list)):
        return None
    return value if isinstance(value, str) else str(value)


def read_jsonl(sf: SourceFile, report: FileReport, text_field: str) -> Iterator[tuple[str, str]]:
    """One document per line; malformed lines are skipped and counted with their line numbers."""
    report.size = sf.path.stat().st_size
    report.sha256 = file_sha256(sf.path)
    with open_binary(sf.path) as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            report.lines += 1
            line = decode(raw, report)
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                report.bad_line(lineno)
                continue
            text = _record_text(rec, text_field, f"{sf.path}, line {lineno}")
            if text is None:
                report.bad_line(lineno)
                continue
            yield f"{sf.name}:{lineno}", text


def _missing_column(path: Path, column: str, columns: list[str]) -> DataError:
    return DataError(
        f"{path}: there is no column {column!r}; its columns are: {', '.join(map(str, columns)) or '(none)'}. "
        "Set data.text_field to the column that holds the text."
    )


def read_csv(sf: SourceFile, report: FileReport, text_field: str) -> Iterator[tuple[str, str]]:
    import pandas as pd

    report.size = sf.path.stat().st_size
    report.sha256 = file_sha256(sf.path)
    with open_binary(sf.path) as f:
        text_stream = io.TextIOWrapper(f, encoding="utf-8", errors="replace", newline="")
        chunks = pd.read_csv(text_stream, dtype=str, keep_default_na=False, chunksize=10_000)
        row = 0
        for chunk in chunks:
            if text_field not in chunk.columns:
                raise _missing_column(sf.path, text_field, list(chunk.columns))
            for text in chunk[text_field].tolist():
                row += 1
                report.lines += 1
                if not text:
                    report.bad_line(row + 1)  # +1: the header is line 1
                    continue
                if "\ufffd" in text:
                    report.invalid_utf8 += 1
                yield f"{sf.name}:{row + 1}", text


def read_parquet(sf: SourceFile, report: FileReport, text_field: str) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq

    report.size = sf.path.stat().st_size
    report.sha256 = file_sha256(sf.path)
    if sf.path.name.lower().endswith(COMPRESSIONS):
        with open_binary(sf.path) as f:  # parquet needs random access: decompress to memory
            pf = pq.ParquetFile(io.BytesIO(f.read()))
    else:
        pf = pq.ParquetFile(sf.path)
    names = pf.schema_arrow.names
    if text_field not in names:
        raise _missing_column(sf.path, text_field, names)
    row = 0
    for batch in pf.iter_batches(batch_size=4096, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            row += 1
            report.lines += 1
            if text is None or text == "":
                report.bad_line(row)
                continue
            if isinstance(text, bytes):
                text = decode(text, report)
            yield f"{sf.name}:{row}", str(text)


def unreadable_file(path: Path, e: Exception) -> DataError:
    """The error for a source file that cannot be read to its end: what happened, what to do."""
    if isinstance(e, PermissionError):
        return DataError(f"{path} cannot be read (permission denied): make it readable or remove it from data.sources")
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EIO):
        return DataError(f"{path} cannot be read ({e.strerror})")
    packed = next((c for c in COMPRESSIONS if path.name.lower().endswith(c)), "")
    # Decompression failed (gzip: EOFError, BadGzipFile, zlib.error; zstd: ZstdError), or the content.
    unpacking = isinstance(e, EOFError | gzip.BadGzipFile | zlib.error) or type(e).__module__.startswith("zstandard")
    what = f"a {packed} file" if packed and unpacking else f"a {kind_of(path)} file"
    return DataError(
        f"{path} is damaged or is not {what} ({type(e).__name__}: {str(e)[:200]}): re-create it, or remove it "
        "from data.sources"
    )


def read_source_file(
    sf: SourceFile, report: FileReport, text_field: str, max_chars: int
) -> Iterator[tuple[str, str]]:
    """The documents of one file; a text file is cut into pieces of at most ``max_chars`` as it is
    read, records are cut by the caller (:func:`split_document`)."""
    if sf.source == STDLIB and sf.name == "stdlib:pydoc_data/topics":
        return read_pydoc_topics(sf, report)
    kind = kind_of(sf.path)
    if kind == "jsonl":
        return read_jsonl(sf, report, text_field)
    if kind == "csv":
        return read_csv(sf, report, text_field)
    if kind == "parquet":
        return read_parquet(sf, report, text_field)
    return read_text_file(sf, report, max_chars)


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get(
        "HF_DATASETS_OFFLINE", "0"
    ) not in ("", "0"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    host, _, port = endpoint.partition(":")
    try:
        with socket.create_connection((host, int(port or 443)), timeout=timeout):
            return True
    except OSError:
        return False


def read_hf(
    spec: str, report: FileReport, text_field: str, max_docs: int | None
) -> Iterator[tuple[str, str]]:
    """``hf:NAME[:CONFIG][@SPLIT]``: a Hugging Face dataset, streamed; a quick clear error offline."""
    body = spec[len(HF_PREFIX) :]
    body, _, split = body.partition("@")
    name, _, config = body.partition(":")
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"data source {spec!r} needs the Hugging Face `datasets` package: pip install datasets"
        ) from None
    if not _hub_reachable():
        raise DataError(
            f"data source {spec!r}: the Hugging Face Hub cannot be reached (offline, or HF_HUB_OFFLINE is set). "
            "Download the dataset elsewhere and give its .jsonl/.parquet files in data.sources instead."
        )
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
    except Exception as e:  # the hub's errors are many and version-dependent; name the source
        raise DataError(f"data source {spec!r}: loading the dataset failed: {e}") from None
    h = hashlib.sha256()
    for i, rec in enumerate(ds):
        if max_docs is not None and i >= max_docs:
            break
        report.lines += 1
        text = _record_text(rec, text_field, f"{spec}, record {i}")
        if text is None:
            report.bad_line(i)
            continue
        data = text.encode("utf-8")
        report.size += len(data)
        h.update(data)
        report.sha256 = h.hexdigest()
        yield f"{spec}:{i}", text
