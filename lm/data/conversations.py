"""The instruction formats people download, read into chat conversations (``finetune.sft.format``).

A conversation is a list of messages ``{"role": "system" | "user" | "assistant", "content": str}``.
The records of a source (any container :mod:`lm.data.records` reads) are in one of four formats:

- ``messages``: OpenAI's chat messages, a list of ``{role, content}`` in the column
  ``finetune.sft.messages_column`` (a JSON string of the list in a CSV);
- ``prompt_response``: one prompt and one response, in the columns ``finetune.sft.prompt_column``
  and ``finetune.sft.response_column``;
- ``alpaca`` (Taori et al. 2023, Stanford Alpaca): ``instruction``, an optional ``input`` and
  ``output``. The user's turn is the instruction, then a blank line, then the input when there is
  one (``"Translate to French.\\n\\nGood morning."``); an optional ``system`` becomes the system turn;
- ``sharegpt``: ``conversations``, a list of turns ``{from, value}`` whose ``from`` is ``human``
  or ``gpt`` (also ``user``, ``assistant``, ``chatgpt``, ``model``) or ``system``; turns spelled
  ``{role, content}`` are read too, and a record's ``system`` becomes the system turn.

``auto`` picks the first format, in that order, whose keys the first record has. A record with none of
its format's keys is not of that format: the reader stops, naming the file, the record and what
is missing. A record of the format that merely cannot teach (an empty prompt, no or an empty
assistant turn) is skipped and counted by reason.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from lm.config import SFTConfig
from lm.data.records import read_records
from lm.errors import DataError
from lm.text.chat import ROLES, Message

FORMATS = ("messages", "prompt_response", "sharegpt", "alpaca")  # the order auto tries them in
SHAREGPT = "conversations"
INSTRUCTION, INPUT, OUTPUT, SYSTEM = "instruction", "input", "output", "system"
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
}


def text_value(value: Any, path: Path | str, where: str, what: str) -> str:
    if value is None or (isinstance(value, float) and value != value):  # missing, or NaN in a table
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float | bool):
        return str(value)
    raise DataError(f"{path}, {where}: {what} must be text, not {type(value).__name__}")


def _turns(value: Any, path: Path | str, where: str, column: str, shape: str) -> list:
    """A record's list of turns: a list, or (a CSV cell) the JSON text of one."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, {where}: column {column!r} is not a JSON list of messages ({e.msg})") from None
    if value is None:
        value = []
    if hasattr(value, "tolist"):  # lists in a pandas table arrive as numpy arrays
        value = value.tolist()
    if not isinstance(value, list):
        raise DataError(f"{path}, {where}: column {column!r} must be a list of messages [{shape}], not {type(value).__name__}")
    return value


def parse_messages(value: Any, path: Path | str, where: str, column: str) -> list[Message]:
    """A record's chat messages value -> validated messages (``messages`` format)."""
    out = []
    for j, m in enumerate(_turns(value, path, where, column, '{"role": ..., "content": ...}')):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{path}, {where}: message {j} must be an object with a role and a content, got {m!r:.80}")
        role = m["role"]
        if role not in ROLES:
            raise DataError(
                f"{path}, {where}: message {j} has the role {role!r}; the allowed roles are {', '.join(ROLES)}"
            )
        out.append({"role": role, "content": text_value(m["content"], path, f"{where} message {j}", "content")})
    return out


def parse_sharegpt(value: Any, path: Path | str, where: str) -> list[Message]:
    """A record's ShareGPT ``conversations`` -> validated messages."""
    out = []
    for j, turn in enumerate(_turns(value, path, where, SHAREGPT, '{"from": ..., "value": ...}')):
        keys = ("from", "value") if isinstance(turn, dict) and "from" in turn else ("role", "content")
        if not isinstance(turn, dict) or any(k not in turn for k in keys):
            raise DataError(f"{path}, {where}: turn {j} must be an object with a from and a value, got {turn!r:.80}")
        role = SHAREGPT_ROLES.get(turn[keys[0]]) if isinstance(turn[keys[0]], str) else None
        if role is None:
            raise DataError(
                f"{path}, {where}: turn {j} is from {turn[keys[0]]!r}; ShareGPT turns are from "
                f"{', '.join(SHAREGPT_ROLES)}"
            )
        out.append({"role": role, "content": text_value(turn[keys[1]], path, f"{where} turn {j}", keys[1])})
    return out


def _with_system(record: dict[str, Any], messages: list[Message], path: Path | str, where: str) -> list[Message]:
    system = text_value(record.get(SYSTEM), path, where, SYSTEM)
    if system.strip() and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": system}, *messages]
    return messages


def format_keys(fmt: str, sft: SFTConfig) -> tuple[str, ...]:
    """The keys a record of format ``fmt`` has."""
    return {
        "messages": (sft.messages_column,),
        "prompt_response": (sft.prompt_column, sft.response_column),
        "sharegpt": (SHAREGPT,),
        "alpaca": (INSTRUCTION, OUTPUT),
    }[fmt]


def detect_format(first: list[str], columns: list[str], sft: SFTConfig, path: Path | str) -> str:
    """The first of :data:`FORMATS` whose keys the first record has (else all records together:
    ``columns``), so that a record of another format later is named as such."""
    for keys in (first, columns):
        for fmt in FORMATS:
            if all(k in keys for k in format_keys(fmt, sft)):
                return fmt
    raise DataError(
        f"{path} has neither a {sft.messages_column!r} column of chat messages nor {sft.prompt_column!r} and "
        f"{sft.response_column!r} columns, nor ShareGPT {SHAREGPT!r}, nor alpaca {INSTRUCTION!r} and {OUTPUT!r}; "
        f"its columns are: {', '.join(columns) or '(none)'}. Set finetune.sft.messages_column, or "
        "finetune.sft.prompt_column and finetune.sft.response_column"
    )


def record_messages(fmt: str, record: dict[str, Any], path: Path | str, where: str, sft: SFTConfig) -> list[Message] | None:
    """The messages of one record of format ``fmt``; None when its prompt is empty."""
    keys = format_keys(fmt, sft)
    if not any(k in record for k in keys):
        raise DataError(
            f"{path}, {where}: the record has no {' or '.join(map(repr, keys))}, so it is not {fmt} data (its "
            f"keys: {', '.join(record) or 'none'}); set finetune.sft.format to the data's format, or to auto"
        )
    if fmt == "messages":
        return parse_messages(record.get(keys[0]), path, where, keys[0])
    if fmt == "sharegpt":
        return _with_system(record, parse_sharegpt(record.get(SHAREGPT), path, where), path, where)
    if fmt == "prompt_response":
        prompt = text_value(record.get(keys[0]), path, where, keys[0])
        response = text_value(record.get(keys[1]), path, where, keys[1])
    else:
        parts = [text_value(record.get(k), path, where, k) for k in (INSTRUCTION, INPUT)]
        prompt = "\n\n".join(p for p in parts if p.strip())
        response = text_value(record.get(OUTPUT), path, where, OUTPUT)
    if not prompt.strip():
        return None
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return _with_system(record, messages, path, where) if fmt == "alpaca" else messages


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


def _found(fmt: str, detected: bool, records: list[tuple[str, dict]], conversations: list[list[Message]]) -> str:
    """One line on what a source held: ``alpaca (detected): 2,017 records, 812 with input``."""
    line = f"{fmt}{' (detected)' if detected else ''}: {len(records):,} records"
    if fmt == "alpaca":
        with_input = sum(1 for _, r in records if isinstance(r.get(INPUT), str) and r[INPUT].strip())
        return f"{line}, {with_input:,} with input"
    if fmt in ("messages", "sharegpt"):
        several = sum(1 for c in conversations if sum(m["role"] == "assistant" for m in c) > 1)
        return f"{line}, {several:,} with several assistant turns"
    return line


def read_conversations(
    spec: str, sft: SFTConfig, key: str = "finetune.data"
) -> tuple[list[list[Message]], Counter, str, str]:
    """(conversations, skipped examples per reason, the format, one line on what was found) of one
    source (a path, folder or glob: :func:`lm.data.records.read_records`)."""
    records, columns = read_records(spec, key)
    first = list(records[0][1]) if records else []
    fmt = detect_format(first, columns, sft, spec) if sft.format == "auto" else sft.format
    conversations, skipped = [], Counter()
    for where, record in records:
        messages = record_messages(fmt, record, spec, where, sft)
        if messages is None:
            skipped["empty_prompt"] += 1
            continue
        conversation, reason = conversation_of(messages, sft.system_prompt)
        if reason:
            skipped[reason] += 1
        else:
            conversations.append(conversation)
    return conversations, skipped, fmt, _found(fmt, sft.format == "auto", records, conversations)
