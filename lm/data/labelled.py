"""Labelled data for fine-tuning: a real classification task from the stdlib, or the user's file.

The stdlib task: given the docstring of a function or class, name the top-level stdlib package it
belongs to (``email``, ``asyncio``, ``tkinter`` ...). Docstrings carry the vocabulary of their
package (MIME headers, event loops, widgets), so a small model beats the majority class by a
wide margin, and nothing is downloaded. ``stdlib_definitions`` also yields each definition's
signature, which an instruction-tuning task (signature -> first docstring line) can reuse.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from lm.config import Config, FinetuneConfig
from lm.data.pydefs import stdlib_definitions
from lm.errors import DataError
from lm.pipeline.stage import StageResult

SPLIT_FILES = {"train": "train.parquet", "val": "val.parquet", "test": "test.parquet"}
LABELS = "labels.json"
MIN_DOCSTRING_CHARS = 40  # shorter ones ("Return self.") say nothing about their package
SCHEMA = pa.schema([("text", pa.string()), ("label", pa.int64())])


def unit_hash(text: str) -> float:
    """A number in [0, 1) that depends on ``text`` only: the same split for the same example on
    every machine and in every run, whatever else the data holds."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") / 2.0**64


def split_of(key: str, val_fraction: float, test_fraction: float) -> str:
    """``train``, ``val`` or ``test`` for the example whose identity is ``key`` (by its hash)."""
    u = unit_hash(key)
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


@functools.lru_cache(maxsize=1)
def _stdlib_docstrings() -> tuple[tuple[str, str], ...]:
    """(docstring, package) pairs, each docstring once (parsing the stdlib takes seconds: cached)."""
    seen: set[str] = set()
    records = []
    for d in stdlib_definitions():
        text = d.docstring.strip()
        if len(text) < MIN_DOCSTRING_CHARS or text in seen:
            continue
        seen.add(text)
        records.append((text, d.package))
    return tuple(records)


def stdlib_classification(num_classes: int) -> tuple[list[str], list[int], list[str]]:
    """(texts, labels, label names): docstrings of the ``num_classes`` most documented packages."""
    records = _stdlib_docstrings()
    counts = Counter(p for _, p in records)
    # Ties broken by name so that the label set is deterministic.
    names = [p for p, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:num_classes]]
    label_of = {p: i for i, p in enumerate(names)}
    texts = [t for t, p in records if p in label_of]
    labels = [label_of[p] for t, p in records if p in label_of]
    return texts, labels, names


def read_labelled_file(ft: FinetuneConfig) -> tuple[list[str], list[int], list[str]]:
    """(texts, labels, label names) from a .csv/.jsonl/.parquet file; labels sorted by name."""
    path, text_column, label_column = Path(ft.data), ft.classify.text_column, ft.classify.label_column
    if not path.is_file():
        raise DataError(f"finetune.data={ft.data!r} is neither 'stdlib' nor an existing file")
    suffix = "".join(path.suffixes[-2:]) if path.suffix in (".gz", ".zst") else path.suffix
    try:
        if suffix.startswith(".csv"):
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
        elif suffix.startswith(".jsonl"):
            df = pd.read_json(path, lines=True, dtype=False)
        elif suffix.startswith(".parquet"):
            df = pd.read_parquet(path)
        else:
            raise DataError(f"{path}: finetune data must be .csv, .jsonl or .parquet")
    except ValueError as e:
        raise DataError(f"{path} could not be read: {e}") from None
    for col in (text_column, label_column):
        if col not in df.columns:
            raise DataError(
                f"{path}: there is no column {col!r}; its columns are: {', '.join(map(str, df.columns))}. "
                "Set finetune.classify.text_column / finetune.classify.label_column."
            )
    df = df[[text_column, label_column]].dropna()
    texts = df[text_column].astype(str).tolist()
    raw = df[label_column].astype(str).tolist()
    names = sorted(set(raw))
    if len(names) < 2:
        raise DataError(
            f"{path}: column {label_column!r} has {len(names)} distinct label(s); need at least 2"
        )
    label_of = {n: i for i, n in enumerate(names)}
    return texts, [label_of[r] for r in raw], names


def build_finetune_data(cfg: Config, *, out_dir: Path) -> StageResult:
    """Write train/val/test parquet files (text, label) and labels.json for fine-tuning."""
    out_dir = Path(out_dir)
    ft = cfg.finetune
    if ft.data == "stdlib":
        texts, labels, names = stdlib_classification(ft.classify.num_classes)
    else:
        texts, labels, names = read_labelled_file(ft)
    if not texts:
        raise DataError(f"finetune.data={ft.data!r} yielded no labelled examples")
    splits: dict[str, tuple[list[str], list[int]]] = {s: ([], []) for s in SPLIT_FILES}
    for text, label in zip(texts, labels, strict=True):
        split = split_of(text, ft.val_fraction, ft.test_fraction)
        splits[split][0].append(text)
        splits[split][1].append(label)
    for split, (t, y) in splits.items():
        if not t:
            raise DataError(
                f"the {split} split of finetune.data={ft.data!r} is empty ({len(texts)} examples); "
                "use more data or larger finetune.val_fraction/test_fraction"
            )
        pq.write_table(pa.table([t, y], schema=SCHEMA), out_dir / SPLIT_FILES[split])
    (out_dir / LABELS).write_text(json.dumps(names, indent=2))
    train_counts = Counter(splits["train"][1])
    majority = max(train_counts.values()) / len(splits["train"][1])
    metrics = {f"finetune_data/{s}": float(len(splits[s][0])) for s in SPLIT_FILES}
    metrics["finetune_data/num_classes"] = float(len(names))
    metrics["finetune_data/majority_fraction"] = majority
    return StageResult(
        metrics=metrics,
        params={"finetune.data": ft.data, "labels": ",".join(names)},
        artifacts=[LABELS],
        outputs={**SPLIT_FILES, "labels": LABELS},
    )
