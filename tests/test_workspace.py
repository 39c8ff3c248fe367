"""Stage folders and cache keys, derived from the stage table: what moves a key and what does not."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lm.config import load_config
from lm.errors import DataError, StageError
from lm.pipeline.stage import Stage, StageContext, StageResult, execute, is_complete
from lm.pipeline.workspace import stage_dirs
from lm.stages import STAGES

ROOT = Path(__file__).resolve().parent.parent


def dirs(tmp_path, *overrides):
    return stage_dirs(load_config("tiny", [f"workdir={tmp_path}", *overrides]), STAGES)


def test_every_stage_has_a_folder_named_after_it(tmp_path):
    d = dirs(tmp_path)
    assert list(d) == [s.name for s in STAGES if s.when is None]  # align's rows: only when align.task is set
    assert all(path.parent == tmp_path / name for name, path in d.items())
    assert d == dirs(tmp_path)


def test_a_change_moves_only_the_stages_that_depend_on_it(tmp_path):
    base = dirs(tmp_path)

    def moved(*overrides):
        other = dirs(tmp_path, *overrides)
        return {name for name in base if base[name] != other[name]}

    after_pretrain = {"pretrain", "finetune", "evaluate", "export", "deploy"}
    assert moved("pretrain.lr=0.1") == after_pretrain
    assert moved("tokenizer.vocab_size=600") == {"tokenize"} | after_pretrain
    assert moved("data.clean.min_chars=50") == {"clean", "tokenize"} | after_pretrain
    assert moved("finetune.lr=0.1") == {"finetune", "evaluate", "export", "deploy"}
    assert moved("finetune.classify.num_classes=5") == {"finetune_data", "finetune", "evaluate", "export", "deploy"}
    assert moved("evaluate.max_batches=9") == {"evaluate", "export", "deploy"}  # the model card carries the metrics
    # Where and how a stage runs changes nothing it produces.
    assert moved("data.workers=1", "trainer.log_every=3", "pretrain.resume=never") == set()


def test_every_config_key_is_some_stages_input_or_declared_run_only():
    from lm.pipeline.workspace import RUN_KEYS, RUN_ONLY_KEYS, _flatten, config_values

    every: dict = {}
    for section, value in load_config("tiny").model_dump(mode="json").items():
        _flatten(value, section, every)
    used = {k for stage in STAGES for k in config_values(load_config("tiny"), stage)}
    forgotten = {k for k in every if k not in used and not k.startswith(RUN_ONLY_KEYS + RUN_KEYS)}
    assert not forgotten, (
        f"no stage's key includes {sorted(forgotten)}: add them to a stage's config or RUN_ONLY_KEYS"
    )


def test_an_edited_source_file_changes_the_ingest_key(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    f = corpus / "a.txt"
    f.write_text("hello")
    before = dirs(tmp_path, f"data.sources=[{corpus}]")
    f.write_text("hello, world")
    after = dirs(tmp_path, f"data.sources=[{corpus}]")
    assert before["ingest"] != after["ingest"] and before["finetune_data"] == after["finetune_data"]


def test_missing_inputs_are_data_errors_naming_their_key(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        dirs(tmp_path, f"data.sources=[{tmp_path / 'missing'}]")
    with pytest.raises(DataError, match="matches no file"):
        dirs(tmp_path, f"data.sources=[{tmp_path / '*.nothing'}]")
    with pytest.raises(DataError, match=r"^finetune.data='.*labels.csv' does not exist$"):
        dirs(tmp_path, f"finetune.data={tmp_path / 'labels.csv'}")


KEYS = (
    "import json\n"
    "from lm.config import load_config\n"
    "from lm.stages import STAGES\n"
    "from lm.pipeline.workspace import stage_keys\n"
    f"print(json.dumps(stage_keys(load_config({str(ROOT / 'conf' / 'tiny.yaml')!r}), STAGES)))\n"
)


def _keys_with(tmp_path: Path, edit) -> dict[str, str]:
    """The stage keys computed in a fresh process by a copy of the lm package that ``edit`` changed."""
    copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
    shutil.copytree(ROOT / "lm", copy / "lm", ignore=shutil.ignore_patterns("__pycache__"))
    edit(copy / "lm")
    env = {**os.environ, "PYTHONPATH": str(copy)}
    check = subprocess.run(
        [sys.executable, "-c", "import lm; print(lm.__file__)"],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert check.stdout.startswith(str(copy))  # the copy is what runs
    proc = subprocess.run(
        [sys.executable, "-c", KEYS], cwd=copy, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


@pytest.mark.slow  # ~10 s: three fresh interpreters
def test_a_code_change_recomputes_what_it_affects_and_nothing_else(tmp_path):
    base = _keys_with(tmp_path, lambda lm: None)
    # A filter's code changes: clean and everything after it recompute; ingest (and the fine-tuning
    # data, which no filter touches) is reused.
    filtered = _keys_with(
        tmp_path, lambda lm: _append(lm / "data" / "filters.py", "\n\ndef stricter(doc):\n    return None\n")
    )
    changed = {name for name in base if base[name] != filtered[name]}
    assert changed == {"clean", "tokenize", "pretrain", "finetune", "evaluate", "export", "deploy"}
    # The sampler changes: no data stage is recomputed (their keys do not hash generation code).
    sampled = _keys_with(
        tmp_path, lambda lm: _append(lm / "generation" / "sampling.py", "\n\ndef greedier(logits):\n    return logits.argmax(-1)\n")
    )
    changed = {name for name in base if base[name] != sampled[name]}
    assert not changed & {"ingest", "clean", "base_model", "tokenize", "finetune_data"}, changed
    assert {"pretrain", "finetune", "evaluate"} <= changed  # training and evaluation sample text
    # A comment or a reformatted line is not a change of code.
    commented = _keys_with(
        tmp_path, lambda lm: _append(lm / "data" / "filters.py", "\n# a note for readers\n")
    )
    assert commented == base


def test_stage_output_appears_only_complete(tmp_path):
    cfg = load_config("tiny")

    def broken(ctx: StageContext) -> StageResult:
        (ctx.out_dir / "half.bin").write_bytes(b"x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        execute(Stage("s", broken, "x"), StageContext(cfg, {}, tmp_path / "s"))
    assert not (tmp_path / "s").exists() and not any(tmp_path.glob(".s.tmp-*"))

    def good(ctx: StageContext) -> StageResult:
        (ctx.out_dir / "data.bin").write_bytes(b"ok")
        return StageResult(metrics={"m": 1.0}, outputs={"data": "data.bin"})

    execute(Stage("s", good, "x", outputs=("data.bin",)), StageContext(cfg, {}, tmp_path / "s"))
    assert is_complete(tmp_path / "s") and StageResult.load(tmp_path / "s").metrics == {"m": 1.0}


def test_a_stage_without_its_declared_outputs_is_not_complete(tmp_path):
    cfg = load_config("tiny")
    for resumable in (False, True):
        out = tmp_path / f"r{resumable}"
        stage = Stage("train", lambda ctx: StageResult(), "x", outputs=("result.json",), resumable=resumable)
        with pytest.raises(StageError, match="without writing result.json"):
            execute(stage, StageContext(cfg, {}, out))
        assert not is_complete(out)


def test_failed_stage_keeps_its_partial_outputs_for_diagnosis(tmp_path):
    cfg = load_config("tiny")

    def rejects(ctx: StageContext) -> StageResult:
        (ctx.out_dir / "dropped_samples.jsonl").write_text('{"reason": "too_short"}\n')
        raise DataError("the filters removed every document; see dropped_samples.jsonl")

    with pytest.raises(DataError) as e:
        execute(Stage("clean", rejects, "x"), StageContext(cfg, {}, tmp_path / "clean"))
    kept = tmp_path / "clean.failed" / "dropped_samples.jsonl"
    assert kept.is_file() and str(kept.parent) in str(e.value)
    assert not is_complete(tmp_path / "clean")
