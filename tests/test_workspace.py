from pathlib import Path

import pytest

from lm.config import load_config
from lm.errors import DataError
from lm.workspace import stage_dirs


def dirs(tmp_path, *overrides):
    return stage_dirs(load_config("tiny", [f"workdir={tmp_path}", *overrides]))


def test_same_config_same_folders(tmp_path):
    assert dirs(tmp_path) == dirs(tmp_path)


def test_a_change_moves_only_the_stages_that_depend_on_it(tmp_path):
    base = dirs(tmp_path)
    lr = dirs(tmp_path, "pretrain.lr=0.1")
    assert (lr.ingest, lr.clean, lr.tokenize, lr.finetune_data) == (base.ingest, base.clean, base.tokenize,
                                                                     base.finetune_data)
    assert lr.pretrain != base.pretrain and lr.finetune != base.finetune and lr.export != base.export
    vocab = dirs(tmp_path, "tokenizer.vocab_size=600")
    assert vocab.clean == base.clean and vocab.tokenize != base.tokenize and vocab.pretrain != base.pretrain
    workers = dirs(tmp_path, "data.workers=1")
    assert workers == base


def test_an_edited_source_file_changes_the_ingest_key(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    f = corpus / "a.txt"
    f.write_text("hello")
    before = dirs(tmp_path, f"data.sources=[{corpus}]")
    f.write_text("hello, world")
    after = dirs(tmp_path, f"data.sources=[{corpus}]")
    assert before.ingest != after.ingest


def test_missing_source_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        dirs(tmp_path, f"data.sources=[{tmp_path / 'missing'}]")
    with pytest.raises(DataError, match="matches no file"):
        dirs(tmp_path, f"data.sources=[{tmp_path / '*.nothing'}]")


def test_stage_output_is_atomic(tmp_path):
    from lm.stage import StageResult, is_complete, run_stage

    def broken(*, out_dir: Path) -> StageResult:
        (out_dir / "half.bin").write_bytes(b"x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        run_stage(broken, tmp_path / "s")
    assert not (tmp_path / "s").exists() and not any(tmp_path.glob(".s.tmp-*"))

    def good(*, out_dir: Path) -> StageResult:
        (out_dir / "data.bin").write_bytes(b"ok")
        return StageResult(metrics={"m": 1.0}, outputs={"data": "data.bin"})

    run_stage(good, tmp_path / "s")
    assert is_complete(tmp_path / "s") and StageResult.load(tmp_path / "s").metrics == {"m": 1.0}


def test_failed_stage_keeps_its_partial_outputs_for_diagnosis(tmp_path):
    from lm.errors import DataError
    from lm.stage import is_complete, run_stage

    def rejects(*, out_dir: Path):
        (out_dir / "dropped_samples.jsonl").write_text('{"reason": "too_short"}\n')
        raise DataError("the filters removed every document; see dropped_samples.jsonl")

    with pytest.raises(DataError) as e:
        run_stage(rejects, tmp_path / "clean")
    kept = tmp_path / "clean.failed" / "dropped_samples.jsonl"
    assert kept.is_file() and str(kept.parent) in str(e.value)
    assert not is_complete(tmp_path / "clean")
