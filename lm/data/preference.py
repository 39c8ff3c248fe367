"""Preference data for preference tuning (``finetune.task=dpo``): (prompt, chosen, rejected), split.

Every record becomes a prompt (chat messages ending before the assistant's reply) and two
completions of it, the ``chosen`` and the ``rejected`` one (chat messages starting with an
assistant turn), whatever form it came in, from the containers :func:`lm.data.instruct.read_records`
reads (columns named by ``finetune.dpo.prompt_column``, ``chosen_column``, ``rejected_column``):

- prompt + chosen + rejected as text: a user message and two replies;
- chosen and rejected as messages, each the whole conversation (Anthropic HH and
  UltraFeedback-binarized ship them so, the latter with the prompt text beside them): the prompt
  is the messages the two share from the start, the completions what follows;
- a prompt (text or messages) with chosen and rejected messages holding the reply alone;
- chosen and rejected as Human/Assistant transcripts (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``,
  the original Anthropic HH text), read as messages.

``finetune.dpo.system_prompt`` is put before every prompt without a system message. Input a user
must fix stops the stage with the file and the record (a value that is neither text nor messages,
an unknown role, missing columns); a pair that cannot teach a preference is skipped and counted
(``finetune_data/skipped_<reason>``, :data:`SKIP_REASONS`). Pairs are split by the hash of their
prompt, so that no test prompt was seen in training, even one that comes with several pairs.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lm.config import Config, DPOConfig
from lm.data.conversations import parse_messages, text_value
from lm.data.instruct import SCHEMA as MESSAGES_SCHEMA
from lm.data.labelled import SPLIT_FILES, split_of, unit_hash
from lm.data.records import read_records
from lm.errors import DataError
from lm.fileio import file_sha256
from lm.pipeline.stage import StageResult
from lm.text.chat import Message

COLUMNS = ("prompt", "chosen", "rejected")
_MESSAGES = MESSAGES_SCHEMA.field("messages").type
SCHEMA = pa.schema([(c, _MESSAGES) for c in COLUMNS])
SKIP_REASONS = (
    "empty_prompt",  # no user message before the replies
    "different_prompts",  # chosen and rejected answer different conversations
    "empty_response",  # a reply is missing, or empty
    "not_a_reply",  # what follows the shared prompt does not start with an assistant turn
    "identical_responses",  # nothing to prefer
    "duplicate",
)
TRANSCRIPT_TURN = re.compile(r"\n\n(Human|Assistant): ?")  # Anthropic HH's text form
TRANSCRIPT_ROLES = {"Human": "user", "Assistant": "assistant"}


def transcript_messages(text: str) -> list[Message] | None:
    """A Human/Assistant transcript -> messages; None when ``text`` is not one."""
    parts = TRANSCRIPT_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    return [{"role": TRANSCRIPT_ROLES[who], "content": said.strip()} for who, said in zip(parts[1::2], parts[2::2], strict=True)]


def _messages_or_text(value: Any, path: Path, where: str, column: str) -> list[Message] | str:
    """A cell as messages (a list, or in a CSV a JSON list of objects) or as text."""
    if hasattr(value, "tolist"):  # parquet lists arrive as numpy arrays
        value = value.tolist()
    if isinstance(value, str) and value.lstrip().startswith("[{"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass  # text that happens to start like JSON
    if isinstance(value, list):
        return parse_messages(value, path, where, column)
    return text_value(value, path, where, column)


def _as_prompt(value: list[Message] | str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}] if value.strip() else []
    return value


def _conversations(
    record: dict[str, Any], dpo: DPOConfig, path: Path, where: str
) -> tuple[list[Message], list[Message]]:
    """(chosen, rejected) of a record as whole conversations: the prompt, then the reply."""
    cells = {c: getattr(dpo, f"{c}_column") for c in COLUMNS}
    chosen, rejected = (_messages_or_text(record.get(cells[c]), path, where, cells[c]) for c in ("chosen", "rejected"))
    prompt = _as_prompt(_messages_or_text(record.get(cells["prompt"]), path, where, cells["prompt"]))
    if isinstance(chosen, str) and isinstance(rejected, str) and not prompt:
        chosen, rejected = transcript_messages(chosen) or chosen, transcript_messages(rejected) or rejected
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise DataError(
            f"{path}, {where}: {cells['chosen']!r} and {cells['rejected']!r} must both be text or both be chat messages"
        )
    if isinstance(chosen, str):
        return [*prompt, {"role": "assistant", "content": chosen}], [*prompt, {"role": "assistant", "content": rejected}]

    def whole(reply: list[Message]) -> list[Message]:  # UltraFeedback: the conversation, prompt included
        return reply if reply[: len(prompt)] == prompt else [*prompt, *reply]

    return whole(chosen), whole(rejected)


def preference_pair(
    chosen: list[Message], rejected: list[Message], system_prompt: str | None
) -> tuple[tuple[list[Message], list[Message], list[Message]] | None, str | None]:
    """((prompt, chosen reply, rejected reply), None) or (None, the reason the pair teaches nothing).
    The prompt is what the two conversations share from the start; a reply runs from there to its
    last assistant turn."""
    if chosen == rejected:
        return None, "identical_responses"
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    prompt = chosen[:shared]
    replies = []
    for conversation in (chosen, rejected):
        last = max((i for i, m in enumerate(conversation) if m["role"] == "assistant"), default=-1)
        replies.append(conversation[shared : last + 1])
    if not any(m["role"] == "user" and m["content"].strip() for m in prompt):
        asked = all(any(m["role"] == "user" and m["content"].strip() for m in c) for c in (chosen, rejected))
        return None, "different_prompts" if asked else "empty_prompt"
    if not all(replies) or any(not m["content"].strip() for r in replies for m in r if m["role"] == "assistant"):
        return None, "empty_response"
    if any(r[0]["role"] != "assistant" for r in replies):
        return None, "not_a_reply"
    if system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    return (prompt, replies[0], replies[1]), None


def read_preferences(path: Path, dpo: DPOConfig) -> tuple[list[tuple[list[Message], ...]], Counter, str]:
    """(pairs, skipped pairs per reason, the file's form) of a preference file."""
    records, columns = read_records(path)  # a file, folder, glob or save_to_disk folder
    missing = [c for c in (dpo.chosen_column, dpo.rejected_column) if c not in columns]
    if missing:
        raise DataError(
            f"{path} has no {' and no '.join(map(repr, missing))} column; its columns are: "
            f"{', '.join(columns) or '(none)'}. Set finetune.dpo.chosen_column and finetune.dpo.rejected_column"
        )
    form = "prompt_chosen_rejected" if dpo.prompt_column in columns else "conversations"
    pairs, skipped = [], Counter()
    for where, record in records:
        pair, reason = preference_pair(*_conversations(record, dpo, path, where), dpo.system_prompt)
        if reason:
            skipped[reason] += 1
        else:
            pairs.append(pair)
    return pairs, skipped, form


def build_preference_data(cfg: Config, *, out_dir: Path) -> StageResult:
    """Write train/val/test.parquet (columns prompt, chosen, rejected: chat messages) for preference tuning."""
    out_dir, ft = Path(out_dir), cfg.finetune
    if ft.data == "stdlib":
        raise DataError(
            "finetune.task=dpo needs preference pairs: set finetune.data to a .jsonl/.csv/.parquet file with "
            f"{ft.dpo.chosen_column!r} and {ft.dpo.rejected_column!r} columns (see README, Preference tuning)"
        )
    pairs, skipped, form = read_preferences(Path(ft.data), ft.dpo)
    splits: dict[str, list[tuple[str, tuple]]] = {s: [] for s in SPLIT_FILES}
    seen: set[str] = set()
    for pair in pairs:
        key = json.dumps(pair, sort_keys=True, ensure_ascii=False)
        if key in seen:
            skipped["duplicate"] += 1
            continue
        seen.add(key)
        prompt_key = json.dumps(pair[0], sort_keys=True, ensure_ascii=False)
        splits[split_of(prompt_key, ft.val_fraction, ft.test_fraction)].append((key, pair))
    for split, rows in splits.items():
        if not rows:
            raise DataError(
                f"the {split} split of finetune.data={ft.data!r} is empty ({len(seen)} usable pairs"
                + (f"; skipped: {dict(skipped)}" if skipped else "")
                + "); use more data or larger finetune.val_fraction/test_fraction"
            )
        rows.sort(key=lambda kv: unit_hash(f"order:{kv[0]}"))
        columns = [[pair[i] for _, pair in rows] for i in range(len(COLUMNS))]
        pq.write_table(pa.table(columns, schema=SCHEMA), out_dir / SPLIT_FILES[split])
    metrics = {f"finetune_data/{s}": float(len(rows)) for s, rows in splits.items()}
    metrics.update({f"finetune_data/skipped_{reason}": float(skipped[reason]) for reason in SKIP_REASONS})
    contexts = {"train": "training", "val": "validation", "test": "evaluation"}
    return StageResult(
        metrics=metrics,
        params={"format": form},
        outputs=dict(SPLIT_FILES),
        datasets=[
            {"name": f"preferences_{s}", "path": name, "digest": file_sha256(out_dir / name), "source": ft.data,
             "context": contexts[s]}
            for s, name in SPLIT_FILES.items()
        ],
    )


def read_preference_split(data_dir: Path, split: str) -> list[tuple[list[Message], list[Message], list[Message]]]:
    """The (prompt, chosen, rejected) pairs of one split written by :func:`build_preference_data`."""
    path = Path(data_dir) / SPLIT_FILES[split]
    if not path.is_file():
        raise DataError(f"{path} does not exist: give the finetune_data stage's output folder")
    table = pq.read_table(path)
    if not set(COLUMNS) <= set(table.column_names):
        raise DataError(
            f"{path} has no {', '.join(COLUMNS)} columns (columns: {table.column_names}): it was not written for "
            "finetune.task=dpo; rerun the finetune_data stage"
        )
    return list(zip(*(table.column(c).to_pylist() for c in COLUMNS), strict=True))
