"""Fine-tuning methods are modules behind one interface: a method that exists only in the tests
(tests/toy_method.py) is registered by one line and goes through the real stages."""

from __future__ import annotations

import pandas as pd
import pytest
import toy_method
import yaml
from pydantic import Field
from train_fixtures import make_token_dir, tiny_config_yaml

from lm import finetune
from lm.config import Config, FinetuneConfig, MethodConfig, load_config
from lm.errors import ConfigError
from lm.pipeline.stage import StageContext, execute, stage_by_name
from lm.stages import STAGES, preflight
from lm.training.child import run_finetune, run_pretrain

pytestmark = pytest.mark.usefixtures("one_thread")


def test_an_unknown_method_is_a_config_error():
    with pytest.raises(ConfigError, match="finetune.task='length' is not available: choose one of classify"):
        load_config("tiny", ["finetune.task=length"])


def test_the_methods_are_the_config_blocks_each_with_its_module_and_data():
    # finetune.task is checked against the config's method blocks, which know nothing of lm.finetune.
    assert set(FinetuneConfig.methods()) == set(finetune.METHODS) == set(finetune.DATA)
    for task in FinetuneConfig.methods():
        cfg = load_config("tiny", [f"finetune.task={task}"])
        assert cfg.finetune.task == task and callable(finetune.method(task).build)


class LengthFinetune(FinetuneConfig):
    length: MethodConfig = Field(default_factory=MethodConfig)  # the toy method's block: no settings of its own


class LengthConfig(Config):
    finetune: LengthFinetune = Field(default_factory=LengthFinetune)


def test_a_method_registered_in_a_test_trains_evaluates_and_exports(tmp_path, monkeypatch):
    monkeypatch.setitem(finetune.METHODS, "length", "toy_method")
    monkeypatch.setitem(finetune.DATA, "length", "toy_method:prepare_data")
    path = tiny_config_yaml(
        tmp_path / "cfg.yaml",
        finetune={"task": "length", "max_steps": 60, "lr": 3e-3, "val_every": 20},
        deploy={"promote_metric": "eval/mae", "promote_mode": "min"},
    )
    cfg = LengthConfig.model_validate(yaml.safe_load(path.read_text()))
    preflight(cfg, STAGES)  # its metric, and that lower is better, are known to the deploy stage's check
    tokens = make_token_dir(tmp_path / "tokens")
    run_pretrain(cfg, tokens, tmp_path / "pretrain")
    inputs = {
        "pretrain": tmp_path / "pretrain",
        "tokenize": tokens,
        "finetune_data": tmp_path / "finetune_data",
        "finetune": tmp_path / "finetune",
        "evaluate": tmp_path / "evaluate",
    }

    def stage(name: str):
        return execute(stage_by_name(STAGES, name), StageContext(cfg, inputs, tmp_path / name))

    stage("finetune_data")
    metrics = run_finetune(cfg, inputs["finetune_data"], tokens, inputs["pretrain"], inputs["finetune"])
    assert metrics["val/mae"] < 0.3, metrics
    evaluated = stage("evaluate")
    assert evaluated.metrics["eval/mae"] < evaluated.metrics["eval/baseline_mae"], evaluated.metrics
    assert "eval/bpb" in evaluated.metrics  # the language model is still evaluated as a decoder
    exported = stage("export")
    assert "target.json" in exported.artifacts and (tmp_path / "export" / "lm" / "model.json").is_file()
    predicted = toy_method.Predictor(tmp_path / "export").predict(
        pd.DataFrame({"text": ["x = 1", "raise ValueError('the separator must be a non-empty string here')"]})
    )["log10_chars"]
    assert predicted[1] > predicted[0]
