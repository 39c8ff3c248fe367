"""Instruction data for supervised fine-tuning (``finetune.task=sft``): conversations, split.

Every example becomes a list of chat messages ``[{role, content}, ...]`` (roles system, user,
assistant), whatever it came as:

- ``finetune.data=stdlib``: a task derived offline from the standard library's sources (the ones
  the corpus already holds): the prompt names a public function by its signature and asks what
  it does (one of :data:`QUESTIONS`), the response is the first sentence of its docstring, e.g.
  "What does `json.dumps(obj, *, skipkeys=False, ...)` do?" -> "Serialize ``obj`` to a JSON
  formatted ``str``." Short answers, so exact match is sometimes meaningful.
- a user's data: a file, folder, glob or ``datasets`` save_to_disk folder (:mod:`lm.data.records`)
  in one of the instruction formats people download, ``finetune.sft.format`` (chat messages,
  prompt/response, alpaca, ShareGPT, or auto: :mod:`lm.data.conversations`).
  ``finetune.sft.system_prompt`` is put before every conversation that has no system message.
- a list of sources with weights (a mix): each source's training split is repeated or subsampled
  to ``round(weight x its examples)`` (:func:`weigh`); val and test hold each example once.

A conversation is kept up to its last assistant turn (what follows has nothing to learn from).
Input a user must fix stops the stage with the file and the line or record (a message with an
unknown role, a record that is not of the format, missing columns); an example that merely
cannot teach anything is skipped and counted (``finetune_data/skipped_<reason>``). Splits are by
the hash of each conversation, like the classification data (``lm.data.labelled``): the same
example always lands in the same split, duplicates are dropped, and each split is written in a
fixed pseudo-random order, so its first rows are a fair sample.

``evaluate.data``, the team's own questions, is read the same way and written as a fourth split,
``eval_set.parquet``; a training example that is the same conversation (whitespace aside) is
dropped from the training split and counted (``finetune_data/eval_overlap_dropped``).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lm.config import Config, FinetuneConfig, SFTConfig
from lm.data.conversations import conversation_of, parse_messages, read_conversations  # noqa: F401 (read from here)
from lm.data.labelled import SPLIT_FILES, split_of, unit_hash
from lm.data.pydefs import stdlib_definitions
from lm.data.records import read_records  # noqa: F401 (the other data readers import it from here)
from lm.errors import DataError
from lm.fileio import file_sha256
from lm.pipeline.stage import StageResult
from lm.text.chat import Message

log = logging.getLogger(__name__)
MESSAGES = "messages"
EVAL_SET = "eval_set"  # evaluate.data: the team's own questions, scored beside the test split
EVAL_SET_FILE = f"{EVAL_SET}.parquet"
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


# ---- the sources, the mix, the evaluation set -----------------------------------------------------


@dataclass
class Source:
    """One source of ``finetune.data``, read into conversations."""

    path: str
    weight: float
    conversations: list[list[Message]]
    skipped: Counter
    fmt: str
    found: str  # one line on what it held: "alpaca (detected): 2,017 records, 812 with input"


def read_source(path: str, weight: float, sft: SFTConfig) -> Source:
    """The conversations of one source: the stdlib task, or a user's data (:mod:`lm.data.conversations`)."""
    if path == "stdlib":
        conversations = [
            conversation_of([{"role": "user", "content": p}, {"role": "assistant", "content": r}], sft.system_prompt)[0]
            for p, r in stdlib_instructions()
        ]
        return Source(path, weight, conversations, Counter(), "stdlib", f"stdlib: {len(conversations):,} instructions")
    conversations, skipped, fmt, found = read_conversations(path, sft, "finetune.data")
    return Source(path, weight, conversations, skipped, fmt, found)


def sources_of(ft: FinetuneConfig) -> list[tuple[str, float]]:
    """(path, weight) of each source of ``finetune.data`` (one path: itself at weight 1)."""
    return [(ft.data, 1.0)] if isinstance(ft.data, str) else [(s.path, s.weight) for s in ft.data]


def data_label(ft: FinetuneConfig) -> str:
    """``finetune.data`` in one line, for messages and dataset lineage."""
    if isinstance(ft.data, str):
        return ft.data
    return ", ".join(f"{s.path} (weight {s.weight:g})" for s in ft.data)


def normalised_key(conversation: list[Message]) -> str:
    """A conversation's identity when whitespace does not count: what the evaluation set is compared by."""
    return json.dumps([[m["role"], " ".join(m["content"].split())] for m in conversation], ensure_ascii=False)


def read_eval_set(cfg: Config) -> tuple[list[list[Message]], Counter] | None:
    """The conversations of ``evaluate.data`` (each once), read as ``finetune.data`` is; None if unset."""
    spec = cfg.evaluate.data
    if spec is None:
        return None
    conversations, skipped, seen = [], Counter(), set()
    for path in [spec] if isinstance(spec, str) else spec:
        found, skip, _, line = read_conversations(path, cfg.finetune.sft, "evaluate.data")
        log.info("evaluate.data %s: %s", path, line)
        skipped.update(skip)
        for conversation in found:
            key = json.dumps(conversation, sort_keys=True, ensure_ascii=False)
            if key in seen:
                skipped["duplicate"] += 1
                continue
            seen.add(key)
            conversations.append(conversation)
    if not conversations:
        raise DataError(
            f"evaluate.data={spec!r} holds no conversation with an assistant turn to score"
            + (f" (skipped: {dict(skipped)})" if skipped else "")
        )
    return conversations, skipped


Row = tuple[str, list[Message]]  # (the row's identity, which orders the split; the conversation)


def weigh(rows: list[Row], weight: float, seed: int) -> list[Row]:
    """``round(weight * len(rows))`` rows (halves up): every row ``floor`` of that over ``len(rows)``
    times, then the remainder drawn without repeats in the order of a seeded hash of each row. A
    copy's identity gets ``#k``, so that copies spread over the split."""
    target = math.floor(weight * len(rows) + 0.5)
    copies, extra = divmod(target, len(rows)) if rows else (0, 0)
    out = [(key if c == 0 else f"{key}#{c}", conversation) for c in range(copies) for key, conversation in rows]
    drawn = sorted(rows, key=lambda row: unit_hash(f"mix:{seed}:{row[0]}"))[:extra]
    return out + [(key if copies == 0 else f"{key}#{copies}", conversation) for key, conversation in drawn]


def split_sources(
    sources: list[Source], ft: FinetuneConfig, eval_keys: set[str]
) -> tuple[dict[str, list[Row]], list[dict[str, int]], Counter]:
    """The train/val/test rows of all sources, and per source its examples, its training split and
    that split weighted. Duplicates are dropped (the first source keeps its copy); a training
    example also in the evaluation set is dropped (``skipped["eval_overlap"]``); only the training
    split is weighted (val and test measure, each example once)."""
    splits: dict[str, list[Row]] = {s: [] for s in SPLIT_FILES}
    seen: set[str] = set()
    skipped: Counter = Counter()
    counts = []
    for source in sources:
        skipped.update(source.skipped)
        train: list[Row] = []
        examples = 0
        for conversation in source.conversations:
            key = json.dumps(conversation, sort_keys=True, ensure_ascii=False)
            if key in seen:
                skipped["duplicate"] += 1
                continue
            seen.add(key)
            examples += 1
            split = split_of(key, ft.val_fraction, ft.test_fraction)
            if split == "train" and eval_keys and normalised_key(conversation) in eval_keys:
                skipped["eval_overlap"] += 1
            else:
                (train if split == "train" else splits[split]).append((key, conversation))
        weighted = weigh(train, source.weight, ft.seed)
        splits["train"] += weighted
        counts.append({"examples": examples, "train": len(train), "train_weighted": len(weighted)})
    return splits, counts, skipped


def write_split(rows: list[Row], path: Path) -> None:
    """One split in a fixed pseudo-random order (its first rows are a fair sample)."""
    rows = sorted(rows, key=lambda row: unit_hash(f"order:{row[0]}"))
    pq.write_table(pa.table([[c for _, c in rows]], schema=SCHEMA), path)


# ---- the stage ------------------------------------------------------------------------------


def _mix_metrics(sources: list[Source], counts: list[dict[str, int]]) -> dict[str, float]:
    metrics = {}
    for n, (source, count) in enumerate(zip(sources, counts, strict=True), 1):
        log.info(
            "finetune.data source %d, %s (weight %g): %s examples, %s in the training split, %s after weighting",
            n, source.path, source.weight, f"{count['examples']:,}", f"{count['train']:,}", f"{count['train_weighted']:,}",
        )
        metrics.update({f"finetune_data/source{n}/{k}": float(v) for k, v in count.items()})
    return metrics


def _eval_set_result(
    eval_set: tuple[list[list[Message]], Counter], dropped: int, out_dir: Path
) -> tuple[dict[str, float], dict[str, Any]]:
    """Write eval_set.parquet: (its metrics, its dataset lineage)."""
    conversations, skipped = eval_set
    write_split([(json.dumps(c, sort_keys=True, ensure_ascii=False), c) for c in conversations], out_dir / EVAL_SET_FILE)
    log.info(
        "evaluate.data: %s conversations in %s; %s training examples that are also in it dropped",
        f"{len(conversations):,}", EVAL_SET_FILE, f"{dropped:,}",
    )
    metrics = {
        "finetune_data/eval_set": float(len(conversations)),
        "finetune_data/eval_set_skipped": float(sum(skipped.values())),
        "finetune_data/eval_overlap_dropped": float(dropped),
    }
    return metrics, {"name": "instructions_eval_set", "path": EVAL_SET_FILE, "digest": file_sha256(out_dir / EVAL_SET_FILE),
                     "context": "evaluation"}


def build_instruct_data(cfg: Config, *, out_dir: Path) -> StageResult:
    """Write train/val/test.parquet (one ``messages`` column) for instruction tuning, and
    eval_set.parquet when ``evaluate.data`` is set."""
    out_dir, ft = Path(out_dir), cfg.finetune
    sources = [read_source(path, weight, ft.sft) for path, weight in sources_of(ft)]
    for source in sources:
        log.info("finetune.data %s: %s", source.path, source.found)
    eval_set = read_eval_set(cfg)
    eval_keys = {normalised_key(c) for c in eval_set[0]} if eval_set else set()
    splits, counts, skipped = split_sources(sources, ft, eval_keys)
    for split, rows in splits.items():
        if not rows:
            raise DataError(
                f"the {split} split of finetune.data={data_label(ft)!r} is empty "
                f"({sum(c['examples'] for c in counts)} usable examples"
                + (f"; skipped: {dict(skipped)}" if skipped else "")
                + "); use more data or larger finetune.val_fraction/test_fraction"
            )
        write_split(rows, out_dir / SPLIT_FILES[split])
    metrics = {f"finetune_data/{s}": float(len(rows)) for s, rows in splits.items()}
    for reason in ("empty_prompt", "empty_response", "no_assistant_turn", "duplicate"):
        metrics[f"finetune_data/skipped_{reason}"] = float(skipped[reason])
    if not isinstance(ft.data, str):
        metrics.update(_mix_metrics(sources, counts))
    contexts = {"train": "training", "val": "validation", "test": "evaluation"}
    datasets = [
        {"name": f"instructions_{s}", "path": name, "digest": file_sha256(out_dir / name), "source": data_label(ft),
         "context": contexts[s]}
        for s, name in SPLIT_FILES.items()
    ]
    outputs = dict(SPLIT_FILES)
    if eval_set is not None:
        eval_metrics, lineage = _eval_set_result(eval_set, skipped["eval_overlap"], out_dir)
        metrics.update(eval_metrics)
        datasets.append({**lineage, "source": str(cfg.evaluate.data)})
        outputs[EVAL_SET] = EVAL_SET_FILE
    return StageResult(
        metrics=metrics,
        params={"format": ",".join(dict.fromkeys(s.fmt for s in sources))},
        outputs=outputs,
        datasets=datasets,
    )


SFT_FILES = {**SPLIT_FILES, EVAL_SET: EVAL_SET_FILE}


def split_path(data_dir: Path, split: str) -> Path:
    """Where a split (train, val, test or :data:`EVAL_SET`) of the finetune_data stage lives."""
    return Path(data_dir) / SFT_FILES[split]


def read_split(data_dir: Path, split: str) -> list[list[Message]]:
    """The conversations of one split written by :func:`build_instruct_data` (train, val, test,
    or :data:`EVAL_SET` when ``evaluate.data`` was set)."""
    path = split_path(data_dir, split)
    if split == EVAL_SET and not path.is_file():
        raise DataError(f"{path} does not exist: the finetune_data stage writes it when evaluate.data is set")
    if not path.is_file():
        raise DataError(f"{path} does not exist: give the finetune_data stage's output folder")
    table = pq.read_table(path)
    if MESSAGES not in table.column_names:
        raise DataError(
            f"{path} has no {MESSAGES!r} column (columns: {table.column_names}): it was not written for "
            "finetune.task=sft; rerun the finetune_data stage"
        )
    return table.column(MESSAGES).to_pylist()
