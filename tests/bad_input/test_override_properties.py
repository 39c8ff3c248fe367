"""Property tests (hypothesis) of the ``section.key=value`` override parser: any command-line word
gives a config or one ConfigError, never another exception; a value written as YAML comes back."""

from __future__ import annotations

import math

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from lm.config import REGISTRY_NAME, Config, load_config
from lm.errors import ConfigError

KEYS = sorted(
    {
        "pretrain.max_steps",
        "pretrain.lr",
        "data.sources",
        "model.n_layer",
        "name",
        "tokenizer.kind",
        "deploy.alias",
        "finetune.task",
        "trainer.devices",
        "data.clean.min_chars",
        "nope",
        "pretrain.betas",
        "model",
    }
)
words = st.one_of(
    st.text(max_size=40),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), st.text(max_size=30)),
    st.builds(lambda k, v: f"{k}.{v}", st.sampled_from(KEYS), st.text(max_size=10)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(words, max_size=3))
def test_any_command_line_words_give_a_config_or_one_config_error(overrides):
    try:
        cfg = load_config("tiny", overrides)
    except ConfigError as e:
        assert str(e).strip()
        return
    assert isinstance(cfg, Config)


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.tuples(st.just("pretrain.max_steps"), st.integers(1, 2**40)),
        st.tuples(st.just("data.seed"), st.integers(-(2**40), 2**40)),
        st.tuples(st.just("pretrain.lr"), st.floats(1e-12, 1e3, allow_nan=False)),
        st.tuples(st.just("name"), st.text(min_size=1, max_size=30)),
        st.tuples(st.just("deploy.model_name"), st.from_regex(REGISTRY_NAME, fullmatch=True)),
        st.tuples(
            st.just("data.sources"), st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=4)
        ),
    )
)
def test_a_value_written_as_yaml_comes_back(key_value):
    key, value = key_value
    cfg = load_config("tiny", [f"{key}={yaml.safe_dump(value, default_flow_style=True)}"])
    got = cfg.value(key)
    if isinstance(value, float):
        assert math.isclose(got, value)
    else:
        assert got == value


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=40))
def test_a_registry_name_outside_letters_digits_and_dot_dash_underscore_is_refused(name):
    import re

    try:
        cfg = load_config("tiny", [f"deploy.model_name={yaml.safe_dump(name, default_flow_style=True)}"])
    except ConfigError:
        assert not re.fullmatch(REGISTRY_NAME, name)  # quotes could reach the registry's queries
        return
    assert re.fullmatch(REGISTRY_NAME, cfg.deploy.model_name)
