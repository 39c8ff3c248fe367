"""Fine-tuning data: the stdlib docstring -> package task, and user files with named columns."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from lm.config import ClassifyConfig, Config, FinetuneConfig
from lm.data.labelled import build_finetune_data, stdlib_definitions
from lm.errors import DataError


def test_stdlib_task_is_real_deterministic_and_beatable(tmp_path):
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        out.mkdir()
        result = build_finetune_data(Config(finetune=FinetuneConfig(classify=ClassifyConfig(num_classes=6))), out_dir=out)
        outs.append(out)
    m = result.metrics
    labels = json.loads((outs[0] / "labels.json").read_text())
    assert len(labels) == m["finetune_data/num_classes"] == 6
    assert {"tkinter", "asyncio", "email"} <= set(labels)
    assert m["finetune_data/train"] > 1000 and m["finetune_data/val"] > 100 and m["finetune_data/test"] > 100
    assert m["finetune_data/majority_fraction"] < 0.4  # a model must learn something to beat it
    frames = {s: pd.read_parquet(outs[0] / f"{s}.parquet") for s in ("train", "val", "test")}
    assert list(frames["train"].columns) == ["text", "label"]
    assert set(frames["train"].label) == set(range(6))
    assert set(frames["train"].text).isdisjoint(frames["test"].text)
    for s, df in frames.items():
        pd.testing.assert_frame_equal(df, pd.read_parquet(outs[1] / f"{s}.parquet"))


def test_definitions_carry_signatures_for_instruction_data():
    d = next(x for x in stdlib_definitions({"json"}) if x.module == "json" and x.name == "dumps")
    assert d.signature.startswith("def dumps(obj, *, skipkeys=False")
    assert d.docstring.startswith("Serialize ``obj`` to a JSON formatted ``str``")


def test_user_file_with_named_columns(tmp_path):
    rows = [
        {"review": f"text number {i} is {'good' if i % 2 else 'bad'}", "stars": "pos" if i % 2 else "neg"}
        for i in range(200)
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    out.mkdir()
    cfg = Config(finetune=FinetuneConfig(data=str(path), classify=ClassifyConfig(text_column="review", label_column="stars")))
    result = build_finetune_data(cfg, out_dir=out)
    assert json.loads((out / "labels.json").read_text()) == ["neg", "pos"]
    total = sum(result.metrics[f"finetune_data/{s}"] for s in ("train", "val", "test"))
    assert total == 200
    bad = Config(finetune=FinetuneConfig(data=str(path), classify=ClassifyConfig(text_column="body", label_column="stars")))
    with pytest.raises(DataError, match=r"no column 'body'.*review, stars"):
        build_finetune_data(bad, out_dir=out)
