"""Instruction data for supervised fine-tuning (``finetune.task=sft``): conversations, split.

Every example becomes a list of chat messages ``[{role, content}, ...]`` (roles system, user,
assistant), whatever it came as:

- ``finetune.data=stdlib``: a task derived offline from the standard library's sources (the ones
  the corpus already holds): the prompt names a public function by its signature and asks what
  it does (one of :data:`QUESTIONS`), the response is the first sentence of its docstring, e.g.
  "What does `json.dumps(obj, *, skipkeys=False, ...)` do?" -> "Serialize ``obj`` to a JSON
  formatted ``str``." Short answers, so exact match is sometimes meaningful.
- a .jsonl / .csv / .parquet file (optionally .gz) with a ``finetune.sft.messages_column`` of chat
  messages (a list, or a JSON string of one in a CSV), else ``finetune.sft.prompt_column`` and
  ``finetune.sft.response_column``. ``finetune.sft.system_prompt`` is put before every conversation
  that has no system message.

A conversation is kept up to its last assistant turn (what follows has nothing to learn from).
Input a user must fix stops the stage with the file and the line or row (a message with an
unknown role, a record that is not a conversation, missing columns); an example that merely
cannot teach anything is skipped and counted (``finetune_data/skipped_<reason>``). Splits are by
the hash of each conversation, like the classification data (``lm.data.labelled``): the same
example always lands in the same split, duplicates are dropped, and each split is written in a
fixed pseudo-random order, so its first rows are a fair sample.
"""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lm.config import Config, FinetuneConfig
from lm.data.labelled import SPLIT_FILES, split_of, unit_hash
from lm.data.pydefs import stdlib_definitions
from lm.errors import DataError
from lm.fileio import file_sha256
from lm.pipeline.stage import StageResult
from lm.text.chat import ROLES, Message

MESSAGES = "messages"
SCHEMA = pa.schema([(MESSAGES, pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))])
QUESTIONS = (
    "What does `{call}` do?",
    "Explain in one sentence what `{call}` does.",
    "Summarise the purpose of `{call}`.",
    "In one line: what is `{call}` for?",
)
MIN_SUMMARY_CHARS, MAX_SUMMARY_CHARS = 12, 160  # summaries outside say too little or are not one line
MAX_ARGS_CHARS = 60  # a longer argument list is cut at an argument and ends in ", ..."


# ---- the stdlib task ----------------------------------------------------------------------------


def summary_sentence(docstring: str) -> str:
    """The first sentence of a docstring's summary paragraph, on one line."""
    paragraph = []
    for line in docstring.strip().splitlines():
        if not line.strip():
            break
        paragraph.append(line.strip())
    text = " ".join(paragraph)
    m = re.match(r"(.+?[.!?])(\s|$)", text)
    return m.group(1) if m else text


def short_arguments(arguments: str) -> str:
    """``(self, a, b=1, ...)`` -> ``(a, b=1, ...)``: no self/cls, at most MAX_ARGS_CHARS."""
    inner = re.sub(r"^(self|cls)(, )?", "", arguments)
    if len(inner) > MAX_ARGS_CHARS:
        cut = inner.rfind(", ", 0, MAX_ARGS_CHARS)
        inner = (inner[:cut] if cut > 0 else inner[:MAX_ARGS_CHARS]) + ", ..."
    return f"({inner})"


def stdlib_instructions(packages: set[str] | None = None) -> list[tuple[str, str]]:
    """(prompt, response) pairs: each public, documented stdlib function or method with a
    one-sentence summary, asked about in one of QUESTIONS (chosen by the hash of its name)."""
    pairs, seen = [], set()
    for d in stdlib_definitions(packages):
        if not d.signature.startswith(("def ", "async def ")):
            continue
        if any(part.startswith("_") for part in d.name.split(".")):
            continue  # private helpers and dunder methods
        answer = summary_sentence(d.docstring)
        leaf = d.name.rsplit(".", 1)[-1]
        if not (MIN_SUMMARY_CHARS <= len(answer) <= MAX_SUMMARY_CHARS) or answer.startswith(f"{leaf}("):
            continue  # too short or long to be an answer, or a C-style "name(args) -> x" line
        arguments = d.signature[d.signature.index("(") + 1 : -1]
        call = f"{d.module}.{d.name}{short_arguments(arguments)}"
        question = QUESTIONS[int(unit_hash(f"question:{d.module}.{d.name}") * len(QUESTIONS))]
        prompt = question.format(call=call)
        if prompt not in seen:
            seen.add(prompt)
            pairs.append((prompt, answer))
    return pairs


# ---- a user's file --------------------------------------------------------------------------


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _jsonl_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with _open_text(path) as f:
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{path}, line {n}: not valid JSON ({e.msg} at column {e.colno}): fix or remove the line"
                    ) from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}, line {n}: a record must be a JSON object, not {type(record).__name__}")
                yield f"line {n}", record
        except UnicodeDecodeError:
            raise DataError(f"{path} is not UTF-8 text: save it as UTF-8") from None


def read_records(path: Path) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """(where, record) of every example of a .jsonl/.csv/.parquet file (optionally .gz), and its columns."""
    import pandas as pd

    name = path.name.removesuffix(".gz")
    if name.endswith(".jsonl"):
        records = list(_jsonl_records(path))
        columns = list(dict.fromkeys(k for _, r in records for k in r))
        return records, columns
    try:
        if name.endswith(".csv"):
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        elif name.endswith(".parquet") and path.suffix != ".gz":
            frame = pd.read_parquet(path)
        else:
            raise DataError(f"{path}: instruction data must be .jsonl, .csv or .parquet (.jsonl and .csv may be .gz)")
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path} could not be read: {e}") from None
    columns = [str(c) for c in frame.columns]
    return [(f"row {i + 1}", r) for i, r in enumerate(frame.to_dict("records"))], columns


def _text(value: Any, path: Path | str, where: str, what: str) -> str:
    if value is None or (isinstance(value, float) and value != value):  # missing, or NaN in a table
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float | bool):
        return str(value)
    raise DataError(f"{path}, {where}: {what} must be text, not {type(value).__name__}")


def parse_messages(value: Any, path: Path | str, where: str, column: str) -> list[Message]:
    """A record's messages value -> validated messages (see the module docstring)."""
    if isinstance(value, str):  # a CSV cell holds the list as JSON
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, {where}: column {column!r} is not a JSON list of messages ({e.msg})") from None
    if value is None:
        value = []
    if hasattr(value, "tolist"):  # parquet lists arrive as numpy arrays
        value = value.tolist()
    if not isinstance(value, list):
        raise DataError(
            f"{path}, {where}: column {column!r} must be a list of messages "
            f"[{{\"role\": ..., \"content\": ...}}], not {type(value).__name__}"
        )
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{path}, {where}: message {j} must be an object with a role and a content, got {m!r:.80}")
        role = m["role"]
        if role not in ROLES:
            raise DataError(
                f"{path}, {where}: message {j} has the role {role!r}; the allowed roles are {', '.join(ROLES)}"
            )
        out.append({"role": role, "content": _text(m["content"], path, f"{where} message {j}", "content")})
    return out


def conversation_of(
    messages: list[Message], system_prompt: str | None
) -> tuple[list[Message] | None, str | None]:
    """(the conversation to train on, None) or (None, the reason it teaches nothing)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return None, "no_assistant_turn"
    messages = messages[: last + 1]
    if any(m["role"] == "assistant" and not m["content"].strip() for m in messages):
        return None, "empty_response"
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages, None


def read_conversations(ft: FinetuneConfig) -> tuple[list[list[Message]], Counter, str]:
    """(conversations, skipped examples per reason, the file's format) of ``finetune.data``."""
    path, sft = Path(ft.data), ft.sft
    if not path.is_file():
        raise DataError(f"finetune.data={ft.data!r} is neither 'stdlib' nor an existing file")
    records, columns = read_records(path)
    if sft.messages_column in columns:
        fmt = "messages"
    elif sft.prompt_column in columns and sft.response_column in columns:
        fmt = "prompt_response"
    else:
        raise DataError(
            f"{path} has neither a {sft.messages_column!r} column of chat messages nor {sft.prompt_column!r} and "
            f"{sft.response_column!r} columns; its columns are: {', '.join(columns) or '(none)'}. Set "
            "finetune.sft.messages_column, or finetune.sft.prompt_column and finetune.sft.response_column"
        )
    conversations, skipped = [], Counter()
    for where, record in records:
        if fmt == "messages":
            messages = parse_messages(record.get(sft.messages_column), path, where, sft.messages_column)
        else:
            prompt = _text(record.get(sft.prompt_column), path, where, sft.prompt_column)
            if not prompt.strip():
                skipped["empty_prompt"] += 1
                continue
            response = _text(record.get(sft.response_column), path, where, sft.response_column)
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        conversation, reason = conversation_of(messages, sft.system_prompt)
        if reason:
            skipped[reason] += 1
        else:
            conversations.append(conversation)
    return conversations, skipped, fmt


# ---- the stage ------------------------------------------------------------------------------


def build_instruct_data(cfg: Config, *, out_dir: Path) -> StageResult:
    """Write train/val/test.parquet (one ``messages`` column) for instruction tuning."""
    out_dir, ft = Path(out_dir), cfg.finetune
    if ft.data == "stdlib":
        conversations, skipped, fmt = [], Counter(), "stdlib"
        for prompt, response in stdlib_instructions():
            conversation, _ = conversation_of(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], ft.sft.system_prompt
            )
            conversations.append(conversation)
    else:
        conversations, skipped, fmt = read_conversations(ft)
    splits: dict[str, list[tuple[str, list[Message]]]] = {s: [] for s in SPLIT_FILES}
    seen: set[str] = set()
    for conversation in conversations:
        key = json.dumps(conversation, sort_keys=True, ensure_ascii=False)
        if key in seen:
            skipped["duplicate"] += 1
            continue
        seen.add(key)
        splits[split_of(key, ft.val_fraction, ft.test_fraction)].append((key, conversation))
    for split, rows in splits.items():
        if not rows:
            raise DataError(
                f"the {split} split of finetune.data={ft.data!r} is empty ({len(seen)} usable examples"
                + (f"; skipped: {dict(skipped)}" if skipped else "")
                + "); use more data or larger finetune.val_fraction/test_fraction"
            )
        rows.sort(key=lambda kv: unit_hash(f"order:{kv[0]}"))
        pq.write_table(pa.table([[c for _, c in rows]], schema=SCHEMA), out_dir / SPLIT_FILES[split])
    metrics = {f"finetune_data/{s}": float(len(rows)) for s, rows in splits.items()}
    for reason in ("empty_prompt", "empty_response", "no_assistant_turn", "duplicate"):
        metrics[f"finetune_data/skipped_{reason}"] = float(skipped[reason])
    contexts = {"train": "training", "val": "validation", "test": "evaluation"}
    return StageResult(
        metrics=metrics,
        params={"format": fmt},
        outputs=dict(SPLIT_FILES),
        datasets=[
            {
                "name": f"instructions_{s}",
                "path": name,
                "digest": file_sha256(out_dir / name),
                "source": ft.data,
                "context": contexts[s],
            }
            for s, name in SPLIT_FILES.items()
        ],
    )


EVAL_SET = "eval_set"  # the team's own evaluation set (evaluate.data), written beside the splits
SFT_FILES = {**SPLIT_FILES, EVAL_SET: f"{EVAL_SET}.parquet"}


def split_path(data_dir: Path, split: str) -> Path:
    """Where a split (train, val, test or :data:`EVAL_SET`) of the finetune_data stage lives."""
    return Path(data_dir) / SFT_FILES[split]


def read_split(data_dir: Path, split: str) -> list[list[Message]]:
    """The conversations of one split written by :func:`build_instruct_data` (or :data:`EVAL_SET`)."""
    path = split_path(data_dir, split)
    if not path.is_file():
        raise DataError(f"{path} does not exist: give the finetune_data stage's output folder")
    table = pq.read_table(path)
    if MESSAGES not in table.column_names:
        raise DataError(
            f"{path} has no {MESSAGES!r} column (columns: {table.column_names}): it was not written for "
            "finetune.task=sft; rerun the finetune_data stage"
        )
    return table.column(MESSAGES).to_pylist()
