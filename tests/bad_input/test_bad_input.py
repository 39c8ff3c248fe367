"""Bad input, table-driven: each case is refused with one clear line that names the problem (the
CLI prints it without a traceback, tests/test_cli.py), or is skipped and counted. Nothing here
needs a GPU, a server or the network.

Config cases load the config (and run the checks made before the first stage); data cases run the
stages that meet the file (ingest, then clean, or the fine-tuning data step) on real files.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lm.config import load_config
from lm.errors import LmforgeError
from lm.stages import STAGES

HERE = Path(__file__).resolve().parent


@dataclass
class Case:
    name: str
    overrides: list[str] = field(default_factory=list)  # {tmp} is the case's temporary folder
    expect: str = ""  # a piece of the one-line error
    setup: Callable[[Path], None] | None = None  # makes files in the temporary folder
    config: str = "tiny"


def _write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


CONFIG_CASES = [
    Case(
        "unknown key in a file",
        config="{tmp}/bad.yaml",
        expect="unknown key 'model.n_layers'",
        setup=lambda t: _write(t / "bad.yaml", "model:\n  n_layers: 4\n"),
    ),
    Case("unknown key on the command line", ["pretrain.maxsteps=3"], "unknown key 'pretrain.maxsteps'"),
    Case("wrong type", ["pretrain.lr=fast"], "key 'pretrain.lr'"),
    Case("zero batch", ["pretrain.batch_size=0"], "key 'pretrain.batch_size'"),
    Case("negative sequence length", ["model.seq_len=-1"], "key 'model.seq_len'"),
    Case("seed beyond what seed_everything takes", ["pretrain.seed=-1"], "key 'pretrain.seed'"),
    Case(
        "heads not dividing the width",
        ["model.n_head=3"],
        "model.d_model=64 must be divisible by model.n_head=3",
    ),
    Case("kv heads not dividing heads", ["model.n_kv_head=3"], "multiple of model.n_kv_head=3"),
    Case("odd head dimension", ["model.d_model=60", "model.n_head=4"], "must be even for RoPE"),
    Case("unknown model size", ["model.preset=huge"], "model.preset='huge' is unknown"),
    Case("FSDP on a CPU", ["trainer.strategy=fsdp"], "fsdp needs GPUs"),
    Case("validation fraction above 1", ["data.val_fraction=1.5"], "key 'data.val_fraction'"),
    Case("vocabulary too small for BPE", ["tokenizer.vocab_size=10"], "too small for byte-level BPE"),
    Case("unknown tokenizer kind", ["tokenizer.kind=wordpiece"], "key 'tokenizer.kind'"),
    Case(
        "tokenizer file without a path", ["tokenizer.kind=file"], "tokenizer.kind=file needs tokenizer.path"
    ),
    Case(
        "fine-tuning method that does not exist",
        ["finetune.task=kto"],
        "finetune.task='kto' is not available",
    ),
    Case(
        "nothing left to fine-tune on",
        ["finetune.val_fraction=0.5", "finetune.test_fraction=0.5"],
        "leaves nothing to train on",
    ),
    Case("unknown promotion direction", ["deploy.promote_mode=best"], "key 'deploy.promote_mode'"),
    Case(
        "promotion metric evaluation does not report",
        ["deploy.promote_metric=eval/f1"],
        "deploy.promote_metric='eval/f1' is not a metric the evaluate stage reports",
    ),
    Case(
        "promotion in the wrong direction",
        ["deploy.promote_metric=eval/loss"],
        "eval/loss is better when lower: set deploy.promote_mode=min",
    ),
    Case("no sources", ["data.sources=[]"], "key 'data.sources'"),
    Case("override without a value", ["pretrain.max_steps"], "is not of the form section.key=value"),
    Case("override of a value as a section", ["pretrain.lr.x=1"], "pretrain.lr"),
    Case(
        "binary config file",
        config="{tmp}/model.bin",
        expect="model.bin is not a text file",
        setup=lambda t: _write(t / "model.bin", bytes(range(256))),
    ),
    Case("config file that does not exist", config="{tmp}/nope.yaml", expect="nope.yaml does not exist"),
    Case(
        "config that is a list",
        config="{tmp}/list.yaml",
        expect="must hold a mapping of sections",
        setup=lambda t: _write(t / "list.yaml", "- a\n- b\n"),
    ),
    Case(
        "config that is not YAML",
        config="{tmp}/broken.yaml",
        expect="broken.yaml is not valid YAML",
        setup=lambda t: _write(t / "broken.yaml", "model: [unclosed\n"),
    ),
    Case("document limit below what a file holds", ["data.max_doc_chars=10"], "key 'data.max_doc_chars'"),
    # Checked before the first stage starts (lm.stages.preflight, flows.pipeline.check):
    Case(
        "work folder that is a file",
        ["workdir={tmp}/afile"],
        "is a file, not a folder",
        setup=lambda t: _write(t / "afile", "x"),
    ),
    Case("source that does not exist", ["data.sources=[{tmp}/missing]"], "does not exist"),
    Case("glob that matches nothing", ["data.sources=[{tmp}/*.nothing]"], "the glob matches no files"),
    Case(
        "empty source folder",
        ["data.sources=[{tmp}/empty]"],
        "the directory holds no files",
        setup=lambda t: (t / "empty").mkdir(),
    ),
    Case(
        "source that is a looping link",
        ["data.sources=[{tmp}/loop]"],
        "symbolic link that loops",
        setup=lambda t: os.symlink(t / "loop", t / "loop"),
    ),
    Case(
        "fine-tuning file that does not exist",
        ["finetune.data={tmp}/labels.csv"],
        "finetune.data='{tmp}/labels.csv' does not exist",
    ),
    Case(
        "tokenizer file that does not exist",
        ["tokenizer.kind=file", "tokenizer.path={tmp}/tok.json"],
        "tokenizer.path='{tmp}/tok.json' does not exist",
    ),
    Case(
        "checkpoint to start from that does not exist",
        ["model.init_from={tmp}/model"],
        "model.init_from='{tmp}/model' does not exist",
    ),
    Case("tracking store of an unknown kind", ["tracking.uri=foo://bar"], "unknown scheme"),
    Case(
        "tracking store in plain files", ["tracking.uri=file:./mlruns"], "no longer accepts plain file stores"
    ),
    Case(
        "tracking store in a missing folder", ["tracking.uri=sqlite:///{tmp}/no/such/m.db"], "does not exist"
    ),
    Case(
        "tracking file that is not a database",
        ["tracking.uri=sqlite:///{tmp}/notes.db"],
        "is not an SQLite database",
        setup=lambda t: _write(t / "notes.db", "my notes"),
    ),
    Case(
        "tracking file that is a folder",
        ["tracking.uri=sqlite:///{tmp}/m.db"],
        "is a folder",
        setup=lambda t: (t / "m.db").mkdir(),
    ),
    Case(
        "tracking URI with a password",
        ["tracking.uri=postgresql://bob:s3cret@db/mlflow"],
        "tracking.uri holds a password",
    ),
    Case(
        "registry name that could break a query",
        ["deploy.model_name=a' or '1'='1"],
        "key 'deploy.model_name'",
    ),
]


def _fill(text: str, tmp: Path) -> str:
    return text.replace("{tmp}", str(tmp))


@pytest.mark.parametrize("case", CONFIG_CASES, ids=lambda c: c.name)
def test_a_bad_config_is_refused_in_one_line_before_anything_runs(case: Case, tmp_path):
    from flows.pipeline import check

    if case.setup:
        case.setup(tmp_path)
    overrides = [_fill(o, tmp_path) for o in case.overrides]
    if not any(o.startswith("workdir=") for o in overrides):
        overrides.append(f"workdir={tmp_path / 'w'}")
    if not any(o.startswith("tracking.uri=") for o in overrides):
        overrides.append(f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(LmforgeError) as e:
        check(load_config(_fill(case.config, tmp_path), overrides), STAGES)
    message = str(e.value)
    assert _fill(case.expect, tmp_path) in message, message
    assert "\n" not in message and "Traceback" not in message
    assert "s3cret" not in message  # a password is never echoed back


# ---- data files -------------------------------------------------------------------------------


def _ingest_and_clean(tmp: Path, *overrides: str):
    """The ingest and clean stages on the case's ``src`` folder, as the pipeline runs them."""
    from lm.pipeline.stage import StageContext, execute, stage_by_name

    cfg = load_config(
        "tiny",
        [
            f"data.sources=[{tmp / 'src'}]",
            "data.max_docs=null",
            "data.workers=1",
            "data.clean.preset=prose",
            *overrides,
        ],
    )
    ingest = execute(stage_by_name(STAGES, "ingest"), StageContext(cfg, {}, tmp / "ingest"))
    clean = execute(
        stage_by_name(STAGES, "clean"), StageContext(cfg, {"ingest": tmp / "ingest"}, tmp / "clean")
    )
    return {**ingest.metrics, **clean.metrics}


WORDS = (
    "weather train bread river garden window market letter summer winter morning evening table chair "
    "city village story music paper stone bridge forest school doctor"
).split()


def _prose(i: int) -> str:
    """A paragraph of plain words that passes the prose filters, different for every ``i``."""
    rng = __import__("random").Random(i)
    return " ".join(rng.choice(WORDS) for _ in range(120)) + "."


def _good_files(src: Path, n: int = 6) -> None:
    for i in range(n):
        _write(src / f"doc{i}.txt", _prose(i))


@dataclass
class DataCase:
    name: str
    setup: Callable[[Path], None]
    expect: str = ""  # a piece of the error; empty: the run succeeds and ``counted`` holds
    counted: dict[str, float] = field(default_factory=dict)  # metric -> value after the run
    overrides: tuple[str, ...] = ()


def _exactly(text: str, n: int) -> str:
    return (text * (n // len(text) + 1))[:n]


def _truncated_gz(src: Path) -> None:
    _good_files(src)
    data = gzip.compress("\n".join(json.dumps({"text": _prose(i)}) for i in range(50)).encode())
    _write(src / "records.jsonl.gz", data[: len(data) // 2])


def _jsonl(src: Path, good: int, bad: int) -> None:
    lines = [json.dumps({"text": _prose(i)}) for i in range(good)] + ["{not json"] * bad
    _write(src / "records.jsonl", "\n".join(lines))


def _latin1(src: Path, n_bad: int, n_good: int) -> None:
    for i in range(n_bad):
        _write(
            src / f"latin{i}.txt", ("Café crème, déjà vu, naïve façade. " * 20 + _prose(i)).encode("latin-1")
        )
    for i in range(n_good):
        _write(src / f"utf8_{i}.txt", _prose(100 + i))


def _glob_loop(src: Path) -> None:
    _good_files(src / "docs", 5)
    os.symlink(src / "docs", src / "docs" / "again")  # a link back up: docs/again/again/...


DATA_CASES = [
    DataCase(
        "empty files only",
        lambda s: [_write(s / "a.txt", ""), _write(s / "b.md", "\n\n")],
        "the clean filters removed all",
    ),
    DataCase(
        "binary file among text",
        lambda s: [_good_files(s), _write(s / "lib.so", b"\x7fELF\x00\x01" * 100)],
        counted={"ingest/binary_skipped": 1, "ingest/files": 7},
    ),
    DataCase("one file not UTF-8", lambda s: _latin1(s, 1, 6), counted={"ingest/invalid_utf8": 1}),
    DataCase("most files not UTF-8", lambda s: _latin1(s, 5, 1), "5 of 6 source files are not UTF-8 text"),
    DataCase(
        "a few malformed JSONL lines",
        lambda s: [_good_files(s), _jsonl(s, 200, 1)],
        counted={"ingest/bad_jsonl_lines": 1},
    ),
    DataCase("many malformed JSONL lines", lambda s: _jsonl(s, 10, 5), "5 of 15 records are malformed"),
    DataCase(
        "JSONL without the text field",
        lambda s: _write(s / "r.jsonl", '{"body": "x"}\n'),
        "the record has no field 'text'; its fields are: body",
    ),
    DataCase(
        "CSV without the text column",
        lambda s: _write(s / "t.csv", "title,body\na,b\n"),
        "there is no column 'text'; its columns are: title, body",
    ),
    DataCase(
        "truncated .jsonl.gz", _truncated_gz, "records.jsonl.gz is damaged or is not a .gz file (EOFError"
    ),
    DataCase(
        "a .gz that is not gzip",
        lambda s: _write(s / "r.jsonl.gz", b"plain text"),
        "r.jsonl.gz is damaged or is not a .gz file (BadGzipFile",
    ),
    DataCase(
        "a .zst that is not zstd",
        lambda s: _write(s / "r.txt.zst", b"plain text" * 20),
        "r.txt.zst is damaged or is not a .zst file",
    ),
    DataCase(
        "corrupt parquet", lambda s: _write(s / "t.parquet", b"PAR1 not really"), "t.parquet is damaged"
    ),
    DataCase(
        "one 5 MB line",
        lambda s: _write(s / "line.txt", _exactly(_prose(7) + " ", 5_000_000)),
        counted={"ingest/split_documents": 1, "ingest/documents": 50},
        overrides=("data.max_doc_chars=100000",),
    ),
    DataCase(
        "a glob through a link that loops",
        _glob_loop,
        counted={"ingest/files": 5},
        overrides=("data.sources=[{tmp}/src/docs/**]",),
    ),
]


@pytest.mark.parametrize("case", DATA_CASES, ids=lambda c: c.name)
def test_a_bad_data_file_is_named_or_skipped_and_counted(case: DataCase, tmp_path):
    case.setup(tmp_path / "src")
    overrides = [_fill(o, tmp_path) for o in case.overrides]
    if case.expect:
        with pytest.raises(LmforgeError) as e:
            _ingest_and_clean(tmp_path, *overrides)
        assert case.expect in str(e.value), str(e.value)
        assert "Traceback" not in str(e.value)
        assert (
            not (tmp_path / "ingest").exists() or not (tmp_path / "clean").exists()
        )  # nothing half-done published
    else:
        metrics = _ingest_and_clean(tmp_path, *overrides)
        for key, value in case.counted.items():
            assert metrics[key] == value, (key, metrics[key])


FINETUNE_CASES = [
    (
        "labels of one class",
        "t.jsonl",
        [{"text": f"text {i}", "label": "a"} for i in range(50)],
        "need at least 2",
    ),
    ("no label column", "t.jsonl", [{"text": "x", "kind": "a"}], "there is no column 'label'"),
    (
        "too few examples to split",
        "t.jsonl",
        [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(3)],
        "split of",
    ),
    ("not a table", "t.txt", None, "finetune data must be .csv, .jsonl or .parquet"),
]


@pytest.mark.parametrize("name,filename,rows,expect", FINETUNE_CASES, ids=[c[0] for c in FINETUNE_CASES])
def test_bad_fine_tuning_data_is_named(name, filename, rows, expect, tmp_path):
    from lm.pipeline.stage import StageContext, execute, stage_by_name

    path = tmp_path / filename
    _write(path, "\n".join(json.dumps(r) for r in rows) if rows is not None else "some text")
    cfg = load_config("tiny", [f"finetune.data={path}"])
    with pytest.raises(LmforgeError, match=expect):
        execute(stage_by_name(STAGES, "finetune_data"), StageContext(cfg, {}, tmp_path / "ft"))


SFT_CASES = [
    (
        "a chat message with an unknown role",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]}],
        "line 1: message 1 has the role 'bot'; the allowed roles are",
    ),
    ("neither messages nor prompt/response", [{"question": "q", "answer": "a"}], "has neither a 'messages' column"),
    ("a line that is not JSON", None, "line 2: not valid JSON"),
]


@pytest.mark.parametrize("name,rows,expect", SFT_CASES, ids=[c[0] for c in SFT_CASES])
def test_bad_instruction_data_is_named_with_its_line(name, rows, expect, tmp_path):
    from lm.pipeline.stage import StageContext, execute, stage_by_name

    path = tmp_path / "chat.jsonl"
    _write(path, "\n".join(json.dumps(r) for r in rows) if rows is not None else '{"prompt": "a", "response": "b"}\n{oops')
    cfg = load_config("tiny", ["finetune.task=sft", f"finetune.data={path}"])
    with pytest.raises(LmforgeError, match=expect):
        execute(stage_by_name(STAGES, "finetune_data"), StageContext(cfg, {}, tmp_path / "ft"))


def test_empty_responses_and_prompts_are_skipped_and_counted(tmp_path):
    from lm.pipeline.stage import StageContext, execute, stage_by_name

    rows = [{"prompt": f"What is {i}?", "response": f"It is the number {i}."} for i in range(60)]
    rows += [{"prompt": "Empty?", "response": "  "}, {"prompt": "", "response": "no question"}]
    path = tmp_path / "pairs.jsonl"
    _write(path, "\n".join(json.dumps(r) for r in rows))
    cfg = load_config("tiny", ["finetune.task=sft", f"finetune.data={path}"])
    result = execute(stage_by_name(STAGES, "finetune_data"), StageContext(cfg, {}, tmp_path / "ft"))
    skipped = {k: v for k, v in result.metrics.items() if "skipped" in k}
    assert sum(skipped.values()) == 2, skipped


def _falcon_folder(folder: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.FalconConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=300)
    transformers.FalconForCausalLM(cfg).save_pretrained(folder)


def test_a_hugging_face_folder_of_another_architecture_says_what_it_found(tmp_path):
    from lm.pipeline.stage import StageContext, execute, stage_by_name

    _falcon_folder(tmp_path / "falcon")
    cfg = load_config("tiny", [f"model.init_from={tmp_path / 'falcon'}"])
    with pytest.raises(LmforgeError, match="FalconForCausalLM.*supported: LlamaForCausalLM.*Qwen2ForCausalLM"):
        execute(stage_by_name(STAGES, "base_model"), StageContext(cfg, {}, tmp_path / "base"))
    assert not (tmp_path / "base").exists()  # nothing half-made published

