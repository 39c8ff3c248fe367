"""What a retrain is compared by: the config's digest, the data's digest, and the new data since a run.

The data digest covers the configured sources' files as ingest lists them (path and content
sha256, the same digest ingest writes per file in ``provenance.csv``), so two runs with the same
digest read the same bytes. New data is counted file by file against an earlier run's
``provenance.csv``: a file whose path is not there, or whose sha256 differs. Files that were
removed are not new data. Plain data: nothing here knows of Prefect or MLflow.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lm.config import Config, DataConfig, RetrainConfig
from lm.data import sources
from lm.fileio import atomic_write, file_sha256

MB = 2**20


def config_digest(cfg: Config) -> str:
    """sha256 of the resolved config (every key, as loaded): equal digests, equal configs."""
    blob = json.dumps(cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _source_files(spec: str, data: DataConfig) -> Iterator[Path]:
    if spec == sources.STDLIB:
        yield from (sf.path for sf in sources.stdlib_sources(data.stdlib_tests))
    else:
        yield from (sf.path for sf in sources.resolve(spec))


@dataclass(frozen=True)
class SourceFileDigest:
    size: int
    sha256: str


DIGEST_CACHE = "source_digests.json"
SETTLED_NS = 2 * 10**9  # a file modified this recently may change again within its timestamps' tick


def source_digests(data: DataConfig, cache: Path | None = None) -> dict[str, SourceFileDigest]:
    """Every file of ``data.sources`` (paths as ingest records them) -> size and content sha256.
    A Hugging Face dataset (``hf:``) has no files here: it is left out (its name is in the config).

    ``cache``: a JSON file of the digests computed before, by path with the file's size, inode,
    modification and change times (as git's index keeps them). A file whose four are unchanged is
    not read again, so a new-data check every minute does not read a large corpus every minute; a
    file written in place (a new change time, whatever its modification time says) is. A file
    changed less than 2 s before it was read is not cached: it could change again within the
    same timestamp. The cache is rewritten atomically; a lost or unreadable one costs a rehash."""
    known: dict = {}
    if cache is not None:
        with contextlib.suppress(OSError, ValueError):
            known = json.loads(Path(cache).read_text())
        if not isinstance(known, dict):
            known = {}
    now = time.time_ns()
    out: dict[str, SourceFileDigest] = {}
    keep: dict[str, list] = {}
    for spec in data.sources:
        if spec.startswith(sources.HF_PREFIX):
            continue
        for path in _source_files(spec, data):
            key = str(path)
            if key in out:
                continue
            st = path.stat()
            stamp = [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]
            entry = known.get(key)
            sha = entry[4] if isinstance(entry, list) and entry[:4] == stamp and len(entry) == 5 else file_sha256(path)
            out[key] = SourceFileDigest(st.st_size, sha)
            if now - max(st.st_mtime_ns, st.st_ctime_ns) > SETTLED_NS:
                keep[key] = [*stamp, sha]
    if cache is not None and keep != known:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, json.dumps(keep))
    return out


def digest_cache(cfg: Config) -> Path:
    """Where a config's source digests are cached: beside its stages' folders."""
    return Path(cfg.workdir).expanduser().resolve() / DIGEST_CACHE


def data_digest(files: Mapping[str, SourceFileDigest], data: DataConfig) -> str:
    """One sha256 over every source file's path and content (and the ``hf:`` sources' names)."""
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(f"{path}\0{files[path].sha256}\n".encode())
    for spec in data.sources:
        if spec.startswith(sources.HF_PREFIX):
            h.update(f"{spec}\n".encode())
    return h.hexdigest()


def read_provenance(path: Path) -> dict[str, str]:
    """path -> sha256 of the files an ingest read (its ``provenance.csv``)."""
    with open(path, newline="", encoding="utf-8") as f:
        return {row["path"]: row["sha256"] for row in csv.DictReader(f)}


@dataclass
class NewData:
    """Files new or changed since a run, and their size."""

    files: list[str] = field(default_factory=list)
    bytes: int = 0

    def enough(self, cfg: RetrainConfig) -> bool:
        """Both thresholds met (retrain.min_new_files and retrain.min_new_mb)."""
        return len(self.files) >= cfg.min_new_files and self.bytes >= cfg.min_new_mb * MB

    def describe(self) -> str:
        shown = ", ".join(Path(p).name for p in self.files[:3]) + (" ..." if len(self.files) > 3 else "")
        return f"{len(self.files)} new or changed files, {self.bytes / MB:.2f} MB" + (f" ({shown})" if shown else "")


def new_data(current: Mapping[str, SourceFileDigest], seen: Mapping[str, str]) -> NewData:
    """The files of ``current`` that ``seen`` (an earlier ingest's path -> sha256) lacks or holds with
    other contents. A file ingest passed over as binary has no sha256 there: it counts as seen."""
    out = NewData()
    for path in sorted(current):
        before = seen.get(path)
        if before is None or (before and before != current[path].sha256):
            out.files.append(path)
            out.bytes += current[path].size
    return out
