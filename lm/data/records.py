"""Records of a user's data file, whatever it was saved as: the one entry point
(:func:`read_records`) through which the fine-tuning data readers see a ``finetune.data``.

A source is a file, a folder or a glob:

- ``.jsonl`` / ``.ndjson`` (a JSON object a line), ``.json`` (a JSON array of objects, or JSON
  Lines under a .json name, as many downloads are), ``.csv`` (every value read as text),
  ``.parquet``; all but parquet may be ``.gz``;
- a folder written by Hugging Face ``datasets``' ``save_to_disk``, read with
  ``datasets.load_from_disk``: a Dataset, or a DatasetDict, whose splits are read one after the
  other in its own order (give ``folder/train`` for one split);
- any other folder: every data file under it in name order (other files, a README, are passed over);
- a glob: every file it matches, in name order (each must be a data file).

Each record comes with where it is, for error messages: ``line 3`` (JSON Lines), ``record 3`` (a
JSON array, a dataset), ``row 3`` (CSV, parquet); inside a folder or glob, the file's name first
(``part-2.jsonl, line 3``). A record is a dict of Python values (lists and dicts as such; a CSV
cell is a string).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lm.data import sources
from lm.errors import DataError

Record = dict[str, Any]
KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
READABLE = ".jsonl, .json, .csv, .parquet (all but .parquet may be .gz)"
DATASET_FILES = ("dataset_dict.json", "state.json")  # what save_to_disk leaves in its folder


def kind_of(path: Path) -> str | None:
    """``jsonl``, ``json``, ``csv`` or ``parquet`` from the name (after .gz), None if none of them."""
    name = path.name.lower()
    gz = name.endswith(".gz")
    kind = KINDS.get(Path(name.removesuffix(".gz")).suffix)
    return None if kind == "parquet" and gz else kind


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return path.is_dir() and any((path / f).is_file() for f in DATASET_FILES)


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else open(path, encoding="utf-8")


def _object(record: Any, path: Path, where: str) -> Record:
    if not isinstance(record, dict):
        raise DataError(f"{path}, {where}: a record must be a JSON object, not {type(record).__name__}")
    return record


def _jsonl(path: Path, f) -> Iterator[tuple[str, Record]]:
    for n, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}, line {n}: not valid JSON ({e.msg} at column {e.colno}): fix or remove the line"
            ) from None
        yield f"line {n}", _object(record, path, f"line {n}")


def _json(path: Path) -> Iterator[tuple[str, Record]]:
    """A JSON array of objects, or JSON Lines saved under a .json name."""
    try:
        with _open_text(path) as f:
            head = f.read(4096).lstrip()
            f.seek(0)
            if not head.startswith("["):
                yield from _jsonl(path, f)
                return
            try:
                array = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}): a .json file must "
                    "hold an array of records [{...}, ...] or one record a line"
                ) from None
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text: save it as UTF-8") from None
    for n, record in enumerate(array, 1):
        yield f"record {n}", _object(record, path, f"record {n}")


def _table(path: Path, kind: str) -> Iterator[tuple[str, Record]]:
    import pandas as pd  # start-up time: pandas only when a table is read
    import pyarrow.parquet as pq

    try:
        if kind == "csv":
            rows = pd.read_csv(path, dtype=str, keep_default_na=False).to_dict("records")
        else:  # parquet: lists and structs come back as Python lists and dicts
            rows = pq.read_table(path).to_pylist()
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path} could not be read: {e}") from None
    for n, record in enumerate(rows, 1):
        yield f"row {n}", {str(k): v for k, v in record.items()}


def _file(path: Path) -> Iterator[tuple[str, Record]]:
    kind = kind_of(path)
    if kind is None:
        raise DataError(f"{path}: not a kind of file lmforge reads records from: give {READABLE}, a folder or a glob")
    if kind == "json":
        yield from _json(path)
    elif kind == "jsonl":
        try:
            with _open_text(path) as f:
                yield from _jsonl(path, f)
        except UnicodeDecodeError:
            raise DataError(f"{path} is not UTF-8 text: save it as UTF-8") from None
    else:
        yield from _table(path, kind)


def _saved_dataset(path: Path) -> Iterator[tuple[str, Record]]:
    """The records of a ``save_to_disk`` folder, through ``datasets`` itself."""
    import datasets  # start-up time: only for a saved dataset

    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError, FileNotFoundError) as e:
        raise DataError(f"{path} looks like a datasets save_to_disk folder but could not be read: {e}") from None
    splits = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    for split, dataset in splits:
        for n, record in enumerate(dataset, 1):
            yield (f"split {split}, record {n}" if split else f"record {n}"), record


def _name_in(sf: sources.SourceFile, spec: Path) -> str:
    """A file's name within its folder, or within the folder its glob starts from."""
    if spec.is_dir():
        return sf.name
    root = next((p for p in spec.parents if not any(c in str(p) for c in "*?[")), None)
    return str(sf.path.relative_to(root)) if root is not None and sf.path.is_relative_to(root) else sf.name


def iter_records(spec: str | Path, key: str = "finetune.data") -> Iterator[tuple[str, Record]]:
    """(where, record) of every record of a file, folder, glob or saved dataset (see the module
    docstring); errors name ``key``, the config key that gave ``spec``."""
    path = Path(spec).expanduser()
    if is_saved_dataset(path):
        yield from _saved_dataset(path)
        return
    files = list(sources.resolve(str(spec), key))
    if len(files) == 1 and files[0].path == path:  # one file, named as such
        yield from _file(path)
        return
    readable = [sf for sf in files if kind_of(sf.path) is not None or not path.is_dir()]
    if not readable:
        raise DataError(f"{key}={str(spec)!r} holds no data file: it reads {READABLE}")
    for sf in readable:
        for where, record in _file(sf.path):
            yield f"{_name_in(sf, path)}, {where}", record


def read_records(path: str | Path, key: str = "finetune.data") -> tuple[list[tuple[str, Record]], list[str]]:
    """(where, record) of every record of ``path`` (a file, folder, glob or saved dataset) and the
    keys the records have, in the order they first appear."""
    records = list(iter_records(path, key))
    columns = list(dict.fromkeys(k for _, r in records for k in r))
    return records, columns
