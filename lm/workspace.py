"""Where each stage's outputs live: ``<workdir>/<stage>/<key>``, the key a hash of everything the
stage's result depends on (its config sections, the keys of the stages it reads, the source files'
sizes and mtimes, the lmforge version). Same inputs, same folder: that is what makes reruns skip
finished stages and lets a killed training run resume from its own checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lm import __version__
from lm.config import Config
from lm.data import sources
from lm.errors import DataError

REMOTE_PREFIXES = ("hf:", "hf://", "s3://", "gs://", "http://", "https://")


def _hash(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fingerprint_sources(specs: list[str]) -> str:
    """Cheap content fingerprint (path, size, mtime) of every file ingest will read behind ``specs``
    (the same walk as ingest's, ``lm.data.sources.resolve``); a missing path raises DataError."""
    if not specs:
        raise DataError("data.sources is empty: name at least one path, glob, folder or 'stdlib'")
    h = hashlib.sha256()
    for spec in specs:
        if spec == sources.STDLIB:
            h.update(f"stdlib\0{sys.version}\0{sysconfig.get_paths()['stdlib']}\n".encode())
            continue
        if spec.startswith(REMOTE_PREFIXES):
            h.update(f"{spec}\n".encode())
            continue
        for sf in sources.resolve(spec):
            st = sf.path.stat()
            h.update(f"{sf.path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


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
