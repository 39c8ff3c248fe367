from pathlib import Path

import pytest

from lm.config import CONF_DIR, Config, list_presets, load_config
from lm.errors import ConfigError


@pytest.mark.parametrize("preset", sorted(p.name for p in CONF_DIR.glob("*.yaml")))
def test_every_shipped_preset_loads(preset):
    cfg = load_config(CONF_DIR / preset)
    assert isinstance(cfg, Config)
    assert cfg.tokenizer.vocab_size > 0


def test_required_presets_exist():
    assert {"tiny", "default", "gpt2-124m"} <= set(list_presets())


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


def test_digest_changes_with_relevant_section_only():
    a = load_config("tiny")
    b = load_config("tiny", ["pretrain.lr=0.5"])
    assert a.digest("data") == b.digest("data")
    assert a.digest("pretrain") != b.digest("pretrain")
