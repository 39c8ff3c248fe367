from pathlib import Path

import pytest

from lm.config import CONF_DIR, Config, list_presets, load_config
from lm.errors import ConfigError


@pytest.mark.parametrize("preset", sorted(p.name for p in CONF_DIR.glob("*.yaml")))
def test_every_shipped_preset_loads_and_survives_its_own_dump(preset, tmp_path):
    cfg = load_config(CONF_DIR / preset)
    # The training process reads the config.yaml its stage wrote: it must load to the same config.
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    assert load_config(tmp_path / "config.yaml") == cfg
    # Its promotion metric is one that its evaluation reports, in the right direction.
    from lm.stages import _check_promote_metric

    _check_promote_metric(cfg)


def test_required_presets_exist_and_every_shipped_preset_loads_valid():
    presets = set(list_presets())
    assert {"tiny", "default", "gpt2-124m", "classify"} <= presets
    for name in sorted(presets):
        cfg = load_config(name)  # parsed against the schema: unknown keys and bad values refused
        assert cfg.name and cfg.model.seq_len > 0 and cfg.finetune.task in ("sft", "classify"), name
        assert Config.model_validate(cfg.model_dump()) == cfg  # what it resolved to is valid as it stands
    assert load_config("tiny").trainer.accelerator == "cpu" and load_config("classify").finetune.task == "classify"


def test_overrides_set_nested_keys_and_lists():
    cfg = load_config("tiny", ["pretrain.max_steps=7", "data.sources=[a.txt,b/]", "trainer.devices=2",
                               "tracking.uri=sqlite:///x.db"])
    assert cfg.pretrain.max_steps == 7
    assert cfg.data.sources == ["a.txt", "b/"]
    assert cfg.trainer.devices == 2
    assert cfg.tracking_uri() == "sqlite:///x.db"


def test_unknown_key_in_file_names_key_and_file(tmp_path: Path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  n_layers: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert "model.n_layers" in str(e.value) and str(f) in str(e.value)


def test_unknown_override_names_key():
    with pytest.raises(ConfigError, match="pretrain.maxsteps"):
        load_config("tiny", ["pretrain.maxsteps=3"])


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ["pretrain.max_steps=many"])
    assert "pretrain.max_steps" in str(e.value) and "many" in str(e.value)


def test_bad_enum_and_malformed_override():
    with pytest.raises(ConfigError, match="tokenizer.kind"):
        load_config("tiny", ["tokenizer.kind=wordpiece"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("tiny", ["pretrain.max_steps"])


def test_missing_config_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_tracking_uri_falls_back_to_env_then_sqlite(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert load_config("tiny").tracking_uri() == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert load_config("tiny").tracking_uri() == "http://127.0.0.1:5999"


def test_the_loaded_config_cannot_be_changed_on_the_way():
    from pydantic import ValidationError

    cfg = load_config("tiny")
    with pytest.raises(ValidationError, match="frozen"):
        cfg.pretrain.lr = 0.5


def test_clean_thresholds_come_from_the_preset_unless_set():
    code = load_config("tiny", ["data.clean.max_line_len=500"]).data.clean
    assert code.preset == "code" and code.max_line_len == 500 and code.min_alnum_ratio == 0.25
    prose = load_config("tiny", ["data.clean.preset=prose"]).data.clean
    assert prose.max_line_len is None and prose.min_mean_word_len == 3.0
    off = load_config("tiny", ["data.clean.max_dup_line_fraction=null"]).data.clean
    assert off.max_dup_line_fraction is None  # None switches a rule off, also against the preset


def test_tokenizer_vocab_size_is_the_one_in_force():
    assert load_config("tiny", ["tokenizer.kind=byte"]).tokenizer.vocab_size == 256 + 5
    assert load_config("tiny", ["tokenizer.kind=file", "tokenizer.path=t.json"]).tokenizer.vocab_size is None
    assert load_config("tiny").tokenizer.vocab_size == 512


@pytest.mark.parametrize(
    "override,message",
    [
        ("finetune.task=kto", "finetune.task='kto' is not available: choose one of classify, sft, dpo"),
        ("trainer.strategy=fsdp", "fsdp needs GPUs"),
        ("data.val_fraction=1.5", "data.val_fraction"),
        ("tokenizer.vocab_size=10", "too small for byte-level BPE"),
        ("pretrain.batch_size=0", "pretrain.batch_size"),
        ("finetune.test_fraction=0.9", "leaves nothing to train on"),
        ("deploy.promote_mode=best", "deploy.promote_mode"),
        ("data.sources=[]", "data.sources"),
    ],
)
def test_constraints_that_the_config_alone_decides_are_checked_when_it_loads(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config("tiny", [override])


def test_a_binary_config_file_is_named(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError, match="model.bin is not a text file"):
        load_config(path)


# Each fine-tuning method's settings moved from finetune.* into the method's own block (issue #19).
MOVED_KEYS = {
    "finetune.text_column": "finetune.classify.text_column",
    "finetune.label_column": "finetune.classify.label_column",
    "finetune.num_classes": "finetune.classify.num_classes",
    "finetune.freeze_backbone": "finetune.classify.freeze_backbone",
    "finetune.prompt_column": "finetune.sft.prompt_column",
    "finetune.response_column": "finetune.sft.response_column",
    "finetune.messages_column": "finetune.sft.messages_column",
    "finetune.system_prompt": "finetune.sft.system_prompt",
    "finetune.packing": "finetune.sft.packing",
}


VALUES = {"text_column": "review", "label_column": "stars", "num_classes": 5, "freeze_backbone": True,
          "prompt_column": "q", "response_column": "a", "messages_column": "chat", "system_prompt": "Be brief.",
          "packing": True}


@pytest.mark.parametrize("old,new", MOVED_KEYS.items())
def test_a_method_setting_in_its_old_place_names_its_new_one(old, new, tmp_path):
    name = old.split(".")[1]
    value = str(VALUES[name]).lower() if isinstance(VALUES[name], bool) else VALUES[name]
    f = tmp_path / "old.yaml"
    f.write_text(f"finetune:\n  task: sft\n  {name}: {value}\n")
    with pytest.raises(ConfigError) as in_file:
        load_config(f)
    assert str(in_file.value) == f"{old} in {f} moved: use {new}"
    with pytest.raises(ConfigError) as on_command_line:
        load_config("tiny", [f"{old}={value}"])
    assert str(on_command_line.value).splitlines() == [
        f"{old} in {CONF_DIR / 'tiny.yaml'} (with command-line overrides) moved: use {new}"
    ]
    assert load_config("tiny", [f"{new}={value}"]).value(new) == VALUES[name]


def test_the_command_line_says_where_a_moved_key_lives(capsys):
    from flows.cli import main

    assert main(["config", "--config", "tiny", "finetune.text_column=review"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"lmforge: error: finetune.text_column in {CONF_DIR / 'tiny.yaml'} (with command-line overrides) "
        "moved: use finetune.classify.text_column"
    ]
    assert main(["config", "--config", "tiny", "finetune.classify.text_column=review", "finetune.sft.packing=true"]) == 0
    printed = capsys.readouterr().out
    assert "  classify:\n    text_column: review\n" in printed and "  sft:\n" in printed


def test_each_method_reads_its_own_block_and_the_defaults_stay():
    cfg = load_config("tiny", ["finetune.classify.label_column=stars", "finetune.sft.system_prompt=Be brief."])
    assert cfg.finetune.classify.label_column == "stars" and cfg.finetune.sft.system_prompt == "Be brief."
    assert cfg.finetune.classify.num_classes == 4  # the preset's, in its new place
    default = Config().finetune
    assert (default.classify.text_column, default.classify.label_column, default.classify.num_classes) == ("text", "label", 8)
    assert not default.classify.freeze_backbone and not default.sft.packing and default.sft.system_prompt is None
    assert (default.sft.prompt_column, default.sft.response_column, default.sft.messages_column) == (
        "prompt", "response", "messages")


def test_reading_a_config_imports_neither_torch_nor_the_methods():
    import subprocess
    import sys

    code = ("import sys, lm.config as c; c.load_config('classify'); "
            "print(sorted(m for m in ('torch', 'lightning', 'lm.finetune') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
