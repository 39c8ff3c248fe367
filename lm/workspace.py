"""Where each stage's outputs live: ``<workdir>/<stage>/<key>``, the key a hash of everything the
stage's result depends on (its config sections, the keys of the stages it reads, the source files'
sizes and mtimes, the lmforge version). Same inputs, same folder: that is what makes reruns skip
finished stages and lets a killed training run resume from its own checkpoints.
"""

from __future__ import annotations

import glob
import hashlib
import json
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lm import __version__
from lm.config import Config
from lm.errors import DataError

REMOTE_PREFIXES = ("hf:", "hf://", "s3://", "gs://", "http://", "https://")


def _hash(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def resolve_source_files(source: str) -> list[Path]:
    """The files one ``data.sources`` entry names; raises DataError when it names nothing."""
    if source == "stdlib" or source.startswith(REMOTE_PREFIXES):
        return []
    path = Path(source).expanduser()
    if any(ch in source for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"data source {source!r}: the pattern matches no file; check the path")
        return files
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"data source {source!r}: the folder holds no file")
        return files
    if path.is_file():
        return [path]
    raise DataError(
        f"data source {source!r} does not exist; fix data.sources (a path, a glob, a folder or 'stdlib')"
    )


def fingerprint_sources(sources: list[str]) -> str:
    """Cheap content fingerprint (path, size, mtime) of every file behind ``sources``."""
    if not sources:
        raise DataError("data.sources is empty: name at least one path, glob, folder or 'stdlib'")
    entries: list[Any] = []
    for src in sources:
        if src == "stdlib":
            entries.append(["stdlib", sys.version, sysconfig.get_paths()["stdlib"]])
            continue
        if src.startswith(REMOTE_PREFIXES):
            entries.append([src])
            continue
        for f in resolve_source_files(src):
            st = f.stat()
            entries.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return _hash(entries)


def _file_fingerprint(path: str | None) -> Any:
    if not path or path == "stdlib":
        return path
    p = Path(path).expanduser()
    if not p.exists():
        return str(p)  # the stage itself reports a clear error for the missing file
    st = p.stat()
    return [str(p.resolve()), st.st_size, st.st_mtime_ns]


@dataclass(frozen=True)
class StageDirs:
    ingest: Path
    clean: Path
    tokenize: Path
    finetune_data: Path
    pretrain: Path
    finetune: Path
    evaluate: Path
    export: Path

    def as_dict(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.__dict__.items()}


def stage_dirs(cfg: Config) -> StageDirs:
    """Derive every stage's output folder from the config and the source files."""
    d = cfg.model_dump(mode="json")
    # Ingest depends on every data key except those of later stages and those that only say where
    # the work runs (workers, Dask): the same documents come out wherever they are computed.
    later_or_where = ("clean", "dedup", "val_fraction", "seed", "workers", "dask_address")
    data = {k: v for k, v in d["data"].items() if k not in later_or_where}
    ingest = _hash(__version__, data, fingerprint_sources(cfg.data.sources))
    clean = _hash(ingest, d["data"]["clean"], d["data"]["dedup"], cfg.data.val_fraction, cfg.data.seed)
    tokenize = _hash(clean, d["tokenizer"], _file_fingerprint(cfg.tokenizer.path))
    ft = d["finetune"]
    ft_data_keys = (
        "task",
        "data",
        "text_column",
        "label_column",
        "num_classes",
        "val_fraction",
        "test_fraction",
    )
    finetune_data = _hash(__version__, {k: ft[k] for k in ft_data_keys}, _file_fingerprint(cfg.finetune.data))
    pre = {k: v for k, v in d["pretrain"].items() if k != "resume"}
    pretrain = _hash(tokenize, d["model"], pre, d["trainer"], _file_fingerprint(cfg.pretrain.init_from))
    finetune = _hash(pretrain, finetune_data, ft, d["trainer"])
    evaluate = _hash(finetune, d["evaluate"])
    export = _hash(finetune, tokenize)
    root = Path(cfg.workdir).expanduser().resolve()
    return StageDirs(
        ingest=root / "ingest" / ingest,
        clean=root / "clean" / clean,
        tokenize=root / "tokenize" / tokenize,
        finetune_data=root / "finetune_data" / finetune_data,
        pretrain=root / "pretrain" / pretrain,
        finetune=root / "finetune" / finetune,
        evaluate=root / "evaluate" / evaluate,
        export=root / "export" / export,
    )
