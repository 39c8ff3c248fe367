"""Instruction data as people download it: the formats (messages, prompt/response, alpaca, ShareGPT)
in every container (JSONL, JSON array, CSV, parquet, .gz, glob, folder, datasets save_to_disk),
mixing weighted sources, which turns are learned, and the team's own evaluation set."""

from __future__ import annotations

import gzip
import json
import logging
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from lm.config import SPECIAL_TOKENS, Config, load_config
from lm.data.conversations import read_conversations
from lm.data.instruct import build_instruct_data, normalised_key, read_records, read_split
from lm.errors import ConfigError, DataError
from lm.finetune import sft
from lm.text.chat import ChatFormat, tokenizer_config
from lm.text.tokenizer import byte_tokenizer

N = 12


def _prompt(i: int) -> tuple[str, str, str]:
    """(instruction, input, output) of example i: every third has an input."""
    return f"Say {i} in words.", ("" if i % 3 else f"Use capitals for {i}."), f"Number {i}."


def _single_turn(i: int) -> list[dict]:
    instruction, given, output = _prompt(i)
    prompt = f"{instruction}\n\n{given}" if given else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _chat(i: int) -> list[dict]:
    """Conversations with a system turn (odd i) and a second exchange (every fourth)."""
    conversation = _single_turn(i)
    if i % 2:
        conversation = [{"role": "system", "content": "Be brief."}, *conversation]
    if i % 4 == 0:
        conversation += [{"role": "user", "content": "And doubled?"}, {"role": "assistant", "content": f"{2 * i}."}]
    return conversation


SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt"}
RECORDS = {
    "messages": [{"messages": _chat(i), "id": i} for i in range(N)],
    "prompt_response": [{"prompt": _single_turn(i)[0]["content"], "response": _prompt(i)[2]} for i in range(N)],
    "alpaca": [dict(zip(("instruction", "input", "output"), _prompt(i), strict=True)) for i in range(N)],
    "sharegpt": [
        {"conversations": [{"from": SHAREGPT_FROM[m["role"]], "value": m["content"]} for m in _chat(i)]} for i in range(N)
    ],
}
EXPECTED = {
    "messages": [_chat(i) for i in range(N)],
    "prompt_response": [_single_turn(i) for i in range(N)],
    "alpaca": [_single_turn(i) for i in range(N)],
    "sharegpt": [_chat(i) for i in range(N)],
}


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def _frame(records: list[dict], cells_as_json: bool) -> pd.DataFrame:
    """A table of the records; in a CSV a list is a cell of JSON text."""
    frame = pd.DataFrame(records)
    for column in ("messages", "conversations"):
        if cells_as_json and column in frame:
            frame[column] = frame[column].map(json.dumps)
    return frame


def _save_to_disk(records: list[dict], folder: Path, splits: bool) -> Path:
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    if splits:
        half = len(records) // 2
        datasets.DatasetDict(
            {"train": datasets.Dataset.from_list(records[:half]), "test": datasets.Dataset.from_list(records[half:])}
        ).save_to_disk(str(folder))
    else:
        datasets.Dataset.from_list(records).save_to_disk(str(folder))
    return folder


def write_container(records: list[dict], container: str, tmp: Path) -> Path:
    """The records saved as ``container``; returns what finetune.data names."""
    half = len(records) // 2
    if container == "jsonl":
        (tmp / "data.jsonl").write_text(_jsonl(records))
        return tmp / "data.jsonl"
    if container == "json":
        (tmp / "data.json").write_text(json.dumps(records, indent=1))
        return tmp / "data.json"
    if container == "json-lines":  # JSON Lines under a .json name, as many downloads are
        (tmp / "data.json").write_text(_jsonl(records))
        return tmp / "data.json"
    if container == "csv":
        _frame(records, True).to_csv(tmp / "data.csv", index=False)
        return tmp / "data.csv"
    if container == "parquet":
        _frame(records, False).to_parquet(tmp / "data.parquet")
        return tmp / "data.parquet"
    if container in ("jsonl.gz", "json.gz", "csv.gz"):
        path = tmp / f"data.{container}"
        if container == "csv.gz":
            _frame(records, True).to_csv(path, index=False, compression="gzip")
        else:
            text = _jsonl(records) if container == "jsonl.gz" else json.dumps(records)
            path.write_bytes(gzip.compress(text.encode()))
        return path
    if container == "glob":
        (tmp / "part-0.jsonl").write_text(_jsonl(records[:half]))
        (tmp / "part-1.jsonl").write_text(_jsonl(records[half:]))
        (tmp / "notes.txt").write_text("not matched")
        return Path(str(tmp / "part-*.jsonl"))
    if container == "folder":  # a download: data files beside a README, which is passed over
        (tmp / "set").mkdir()
        (tmp / "set" / "README.md").write_text("# A dataset card\n")
        (tmp / "set" / "a.json").write_text(json.dumps(records[:half]))
        _frame(records[half:], False).to_parquet(tmp / "set" / "b.parquet")
        return tmp / "set"
    return _save_to_disk(records, tmp / "saved", splits=container == "save_to_disk-dict")


CONTAINERS = ["jsonl", "json", "json-lines", "csv", "parquet", "jsonl.gz", "json.gz", "csv.gz", "glob", "folder",
              "save_to_disk", "save_to_disk-dict"]


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("fmt", list(RECORDS))
def test_every_format_in_every_container_reads_to_the_same_conversations(tmp_path, fmt, container):
    spec = write_container(RECORDS[fmt], container, tmp_path)
    conversations, skipped, found_fmt, found = read_conversations(str(spec), Config().finetune.sft)
    assert found_fmt == fmt and found.startswith(f"{fmt} (detected): {N} records")  # auto picked it
    assert conversations == EXPECTED[fmt] and not skipped
    named = read_conversations(str(spec), Config().finetune.sft.model_copy(update={"format": fmt}))
    assert named[0] == EXPECTED[fmt] and not named[3].startswith(f"{fmt} (detected)")


def test_the_found_line_says_how_many_alpaca_records_have_an_input(tmp_path):
    spec = write_container(RECORDS["alpaca"], "json", tmp_path)
    *_, found = read_conversations(str(spec), Config().finetune.sft)
    assert found == f"alpaca (detected): {N} records, {N // 3} with input"


def test_read_records_keeps_its_signature_for_the_other_readers(tmp_path):
    records, columns = read_records(write_container(RECORDS["alpaca"], "jsonl", tmp_path))
    assert columns == ["instruction", "input", "output"] and records[1] == ("line 2", RECORDS["alpaca"][1])
    records, _ = read_records(write_container(RECORDS["alpaca"], "folder", tmp_path))
    assert records[0][0] == "a.json, record 1" and records[-1][0] == f"b.parquet, row {N - N // 2}"


def test_sharegpt_spellings_found_in_the_wild(tmp_path):
    record = {
        "system": "Answer in French.",
        "conversations": [
            {"from": "user", "value": "Hello?"},
            {"from": "chatgpt", "value": "Bonjour."},
            {"role": "user", "content": "Bye?"},  # role/content turns are read too
            {"from": "assistant", "value": "Au revoir."},
            {"from": "human", "value": "A question left unanswered"},
        ],
    }
    path = tmp_path / "chats.jsonl"
    path.write_text(_jsonl([record]))
    conversations, *_ = read_conversations(str(path), Config().finetune.sft)
    assert conversations == [[
        {"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello?"},
        {"role": "assistant", "content": "Bonjour."}, {"role": "user", "content": "Bye?"},
        {"role": "assistant", "content": "Au revoir."},
    ]]


@pytest.mark.parametrize(
    "fmt, records, container, message",
    [
        ("alpaca", RECORDS["sharegpt"], "json",
         r"data.json, record 1: the record has no 'instruction' or 'output', so it is not alpaca data \(its keys: "
         r"conversations\); set finetune.sft.format"),
        ("sharegpt", RECORDS["alpaca"][:3] + RECORDS["sharegpt"], "jsonl",
         r"data.jsonl, line 1: the record has no 'conversations', so it is not sharegpt data \(its keys: instruction, "
         r"input, output\)"),
        ("alpaca", RECORDS["alpaca"][:3] + RECORDS["messages"][:1], "jsonl", r"data.jsonl, line 4: the record has no"),
        ("auto", RECORDS["alpaca"][:6] + RECORDS["messages"][6:], "glob",
         r"part-\*.jsonl, part-1.jsonl, line 1: the record has no 'instruction' or 'output', so it is not alpaca data"),
        ("messages", RECORDS["alpaca"], "save_to_disk",
         r"saved, record 1: the record has no 'messages', so it is not messages data"),
        ("sharegpt", [{"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}], "json",
         r"record 1: turn 1 is from 'bot'; ShareGPT turns are from system, human, user, gpt"),
        ("auto", [{"question": "q", "answer": "a"}], "csv", r"data.csv has neither a 'messages' column .* nor alpaca"),
        ("auto", [1, 2], "json", r"data.json, record 1: a record must be a JSON object, not int"),
    ],
    ids=["alpaca-given-sharegpt", "sharegpt-given-alpaca", "first-bad-record", "glob-names-its-file",
         "dataset-given-alpaca", "unknown-sharegpt-role", "no-format", "not-objects"],
)
def test_data_that_is_not_what_the_format_says_is_named_with_its_first_bad_record(tmp_path, fmt, records, container, message):
    spec = write_container(records, container, tmp_path)
    sft_block = Config().finetune.sft.model_copy(update={"format": fmt})
    with pytest.raises(DataError, match=message):
        read_conversations(str(spec), sft_block)


def test_a_file_lmforge_cannot_read_is_refused_in_one_line(tmp_path):
    (tmp_path / "set.xlsx").write_bytes(b"PK")
    with pytest.raises(DataError, match=r"set.xlsx: not a kind of file lmforge reads records from: give .jsonl, .json"):
        read_records(tmp_path / "set.xlsx")
    (tmp_path / "set.parquet.gz").write_bytes(gzip.compress(b"x"))
    with pytest.raises(DataError, match="not a kind of file"):
        read_records(tmp_path / "set.parquet.gz")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "README.md").write_text("nothing")
    with pytest.raises(DataError, match=r"finetune.data='.*docs' holds no data file"):
        read_records(tmp_path / "docs")


# ---- the stage: mixing and the evaluation set ------------------------------------------------------


def _pairs(tag: str, n: int) -> list[dict]:
    return [{"prompt": f"{tag} question {i}?", "response": f"{tag} answer {i}."} for i in range(n)]


def _stage(tmp_path: Path, name: str, *overrides: str):
    cfg = load_config("tiny", ["finetune.task=sft", *overrides])
    out = tmp_path / name
    out.mkdir()
    return build_instruct_data(cfg, out_dir=out), out


def test_mixing_weights_repeat_and_subsample_the_training_split_deterministically(tmp_path, caplog):
    a, b, c = (tmp_path / f"{t}.jsonl" for t in "abc")
    for path, n in ((a, 40), (b, 60), (c, 30)):
        path.write_text(_jsonl(_pairs(path.stem, n)))
    mix = f"finetune.data=[{{path: {a}, weight: 3}}, {{path: {b}, weight: 0.5}}, {c}]"
    with caplog.at_level(logging.INFO, logger="lm"):
        result, out = _stage(tmp_path, "mix", mix)
    m = result.metrics
    train = {s: m[f"finetune_data/source{s}/train"] for s in (1, 2, 3)}
    assert m["finetune_data/source1/examples"] == 40 and m["finetune_data/source2/examples"] == 60
    assert m["finetune_data/source1/train_weighted"] == 3 * train[1]
    assert m["finetune_data/source2/train_weighted"] == int(0.5 * train[2] + 0.5)
    assert m["finetune_data/source3/train_weighted"] == train[3]
    rows = read_split(out, "train")
    assert len(rows) == m["finetune_data/train"] == sum(m[f"finetune_data/source{s}/train_weighted"] for s in (1, 2, 3))
    counts = Counter(r[0]["content"].split()[0] for r in rows)
    assert counts == {"a": 3 * train[1], "b": int(0.5 * train[2] + 0.5), "c": train[3]}
    assert set(Counter(json.dumps(r) for r in rows if r[0]["content"].startswith("a")).values()) == {3}
    held_out = read_split(out, "val") + read_split(out, "test")
    assert len(held_out) == len({json.dumps(r) for r in held_out}) == 130 - sum(train.values())  # once each
    assert "source 1, " in caplog.text and "(weight 3): 40 examples" in caplog.text and "after weighting" in caplog.text
    _, again = _stage(tmp_path, "again", mix)
    assert pq.read_table(again / "train.parquet").equals(pq.read_table(out / "train.parquet"))
    _, reseeded = _stage(tmp_path, "reseeded", mix, "finetune.seed=7")
    other = read_split(reseeded, "train")
    assert len(other) == len(rows) and {json.dumps(r) for r in other} != {json.dumps(r) for r in rows}


def test_a_single_source_at_weight_one_is_todays_data(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text(_jsonl(_pairs("a", 50)))
    one, out_one = _stage(tmp_path, "one", f"finetune.data={a}")
    listed, out_listed = _stage(tmp_path, "listed", f"finetune.data=[{a}]")
    for split in ("train", "val", "test"):
        assert pq.read_table(out_one / f"{split}.parquet").equals(pq.read_table(out_listed / f"{split}.parquet"))
    assert not any("source" in k for k in one.metrics)  # one path: the metrics of before


def test_the_evaluation_set_is_written_and_its_overlap_dropped_from_training(tmp_path, caplog):
    train_file, eval_file = tmp_path / "train.json", tmp_path / "eval.jsonl"
    rows = _pairs("t", 80)
    train_file.write_text(json.dumps([{"instruction": r["prompt"], "output": r["response"]} for r in rows]))
    # The team's questions: 20 new ones and the first 30 of the training file, spaced differently.
    own = _pairs("own", 20) + [{"prompt": f"  {r['prompt']}", "response": r["response"].replace(" ", "\n ")}
                               for r in rows[:30]]
    eval_file.write_text(_jsonl(own))
    before, out_before = _stage(tmp_path, "before", f"finetune.data={train_file}")
    assert not (out_before / "eval_set.parquet").exists() and "finetune_data/eval_set" not in before.metrics
    with caplog.at_level(logging.INFO, logger="lm"):
        after, out = _stage(tmp_path, "after", f"finetune.data={train_file}", f"evaluate.data={eval_file}")
    eval_set = read_split(out, "eval_set")
    assert sorted(map(normalised_key, eval_set)) == sorted(
        normalised_key([{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]) for r in own
    )
    overlap = {normalised_key(c) for c in eval_set}
    train_before, train_after = read_split(out_before, "train"), read_split(out, "train")
    in_train = [c for c in train_before if normalised_key(c) in overlap]
    assert in_train and not [c for c in train_after if normalised_key(c) in overlap]
    assert len(train_before) - len(train_after) == len(in_train) == after.metrics["finetune_data/eval_overlap_dropped"]
    assert after.metrics["finetune_data/eval_set"] == 50 and after.outputs["eval_set"] == "eval_set.parquet"
    for split in ("val", "test"):  # only training changes
        assert pq.read_table(out / f"{split}.parquet").equals(pq.read_table(out_before / f"{split}.parquet"))
    assert pq.read_table(out / "eval_set.parquet").schema.equals(pq.read_table(out / "test.parquet").schema)
    assert f"{len(in_train)} training examples that are also in it dropped" in caplog.text


def test_the_data_stage_key_sees_the_evaluation_set_and_its_content(tmp_path):
    from lm.pipeline.workspace import stage_keys
    from lm.stages import STAGES

    stage = [s for s in STAGES if s.name == "finetune_data"]
    data, own = tmp_path / "a.jsonl", tmp_path / "own.jsonl"
    data.write_text(_jsonl(_pairs("a", 5)))
    own.write_text(_jsonl(_pairs("own", 5)))

    def key(*overrides: str) -> str:
        cfg = load_config("tiny", ["finetune.task=sft", f"finetune.data={data}", *overrides])
        return stage_keys(cfg, stage)["finetune_data"]

    unset, with_own = key(), key(f"evaluate.data={own}")
    own.write_text(_jsonl(_pairs("own", 6)))
    assert len({unset, with_own, key(f"evaluate.data={own}")}) == 3
    assert key(f"finetune.data=[{{path: {data}, weight: 2}}]") != key(f"finetune.data=[{{path: {data}, weight: 3}}]")


def test_classification_refuses_a_mix_and_an_evaluation_set_in_one_line(tmp_path):
    """Refused when the config is read, before any stage runs (and named with the config's source)."""
    with pytest.raises(ConfigError, match=r"^finetune.data is a list of sources \(a mix\), which finetune.task=classify") as e:
        load_config("tiny", ["finetune.data=[a.csv, b.csv]"])
    assert "\n" not in str(e.value) and "tiny.yaml" in str(e.value)
    with pytest.raises(ConfigError, match=r"^evaluate.data .* is read by finetune.task=sft only"):
        load_config("tiny", ["evaluate.data=own.jsonl"])
    with pytest.raises(ConfigError, match=r"^align.data is a list of sources \(a mix\), which align.task=dpo"):
        load_config("tiny", ["finetune.task=sft", "align.task=dpo", "align.data=[a.jsonl, b.jsonl]"])
    load_config("tiny", ["finetune.task=sft", "finetune.data=[a.jsonl, b.jsonl]", "evaluate.data=own.jsonl"])


def test_a_bad_source_in_a_mix_is_named_by_its_place():
    with pytest.raises(ConfigError, match=r"key 'finetune.data' .*source 2 \(\{'path': 'b.json', 'weight': 0\}\): weight: "
                                          r"Input should be greater than 0"):
        load_config("tiny", ["finetune.data=[a.jsonl, {path: b.json, weight: 0}]"])


# ---- which turns are learned --------------------------------------------------------------------------

THREE_TURNS = [
    {"role": "user", "content": "One?"}, {"role": "assistant", "content": "1."},
    {"role": "user", "content": "Two?"}, {"role": "assistant", "content": "2."},
    {"role": "user", "content": "Three?"}, {"role": "assistant", "content": "3."},
]


@pytest.mark.parametrize("train_on", ["assistant", "last_assistant", "all"])
def test_train_on_masks_token_by_token(train_on):
    tok = byte_tokenizer(list(SPECIAL_TOKENS))
    fmt = ChatFormat(tok, tokenizer_config(tok, SPECIAL_TOKENS))
    pieces = [
        ("<|im_start|>user\nOne?<|im_end|>\n<|im_start|>assistant\n", False),
        ("1.<|im_end|>", train_on != "last_assistant"),
        ("\n<|im_start|>user\nTwo?<|im_end|>\n<|im_start|>assistant\n", False),
        ("2.<|im_end|>", train_on != "last_assistant"),
        ("\n<|im_start|>user\nThree?<|im_end|>\n<|im_start|>assistant\n", False),
        ("3.<|im_end|>", True),
        ("\n", False),
    ]
    expected = [(i, flag or train_on == "all") for text, flag in pieces for i in tok.encode(text, add_special_tokens=False).ids]
    ids, learned = fmt.encode(THREE_TURNS, learn=train_on)
    assert list(zip(ids, learned, strict=True)) == expected
    assert ids == fmt.encode(THREE_TURNS)[0]  # the tokens are the same; only what is learned differs
    (x, y), = sft.encode_examples(fmt, [THREE_TURNS], seq_len=200, train_on=train_on).items
    assert (y != -100).tolist() == [flag for _, flag in expected[1:]]
    assert y[y != -100].tolist() == [i for i, flag in expected[1:] if flag]


# ---- one command -----------------------------------------------------------------------------------------


@pytest.mark.slow  # ~45 s: the CLI starts Prefect's temporary server and a new MLflow store in a fresh process
def test_a_downloaded_alpaca_file_goes_through_lmforge_finetune_data_in_one_command(tmp_path):
    from test_cli import lmforge

    data = tmp_path / "alpaca_data.json"  # as downloaded: one JSON array of {instruction, input, output}
    data.write_text(json.dumps([dict(zip(("instruction", "input", "output"), _prompt(i), strict=True)) for i in range(90)]))
    proc = lmforge("finetune-data", f"finetune.data={data}", f"workdir={tmp_path / 'runs'}",
                   f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path, timeout=300,
                   PREFECT_HOME=str(tmp_path / "prefect-home"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "alpaca (detected)" in ln]
    assert len(said) == 1 and said[0].endswith("alpaca (detected): 90 records, 30 with input"), said
    out, = (tmp_path / "runs" / "finetune_data").iterdir()
    assert sum(len(read_split(out, s)) for s in ("train", "val", "test")) == 90
    assert read_split(out, "train")[0][0]["role"] == "user"


@pytest.mark.slow  # ~20 s: the stage through the real Prefect flow and a new MLflow store
def test_a_mix_and_an_evaluation_set_through_the_pipeline_flow_reach_mlflow(prefect_harness, tmp_path):
    from flows.pipeline import pipeline
    from lm.tracking.runs import run_tree

    alpaca = write_container(RECORDS["alpaca"] + [{"instruction": f"Q{i}", "output": f"A{i}"} for i in range(40)],
                             "json", tmp_path)
    (tmp_path / "chats").mkdir()
    sharegpt = write_container(RECORDS["sharegpt"], "save_to_disk", tmp_path / "chats")
    own = tmp_path / "own.jsonl"
    own.write_text(_jsonl([{"prompt": f"Q{i}", "response": f"A{i}"} for i in range(40)] + _pairs("own", 5)))
    cfg = load_config("tiny", [f"workdir={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                               "finetune.task=sft", f"finetune.data=[{{path: {alpaca}, weight: 2}}, {sharegpt}]",
                               f"evaluate.data={own}"])
    out = pipeline(config=cfg, targets=["finetune_data"])
    metrics = run_tree(out["tracking_uri"], out["mlflow_run_id"])["children"]["finetune_data"].data.metrics
    assert metrics["finetune_data/source1/train_weighted"] == 2 * metrics["finetune_data/source1/train"]
    # Three ShareGPT conversations (one turn, no system) are alpaca ones too: kept once, from the first source.
    assert metrics["finetune_data/source2/examples"] == N - 3 and metrics["finetune_data/skipped_duplicate"] == 3
    assert metrics["finetune_data/eval_set"] == 45
    assert metrics["finetune_data/eval_overlap_dropped"] > 0
    assert {normalised_key(c) for c in read_split(Path(out["finetune_data"]), "train")}.isdisjoint(
        normalised_key(c) for c in read_split(Path(out["finetune_data"]), "eval_set"))
