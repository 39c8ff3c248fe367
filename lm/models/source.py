"""Where a base model came from (``source.json``, written by the base_model stage) and whether a
tokenizer fits a model: what the tokenize stage and the training child read of a model brought
from elsewhere, without importing the stage that brought it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lm.errors import ConfigError

SOURCE = "source.json"


def read_source(base_dir: str | Path) -> dict[str, Any] | None:
    """What the base_model stage found: None when the network is pretrained from scratch."""
    source = json.loads((Path(base_dir) / SOURCE).read_text())
    return None if source["kind"] == "scratch" else source


def check_tokenizer_fits(tokenizer_vocab: int, model_vocab: int, spec: str) -> None:
    """Every token id the tokenizer can give must have a row in the model's embedding."""
    if tokenizer_vocab > model_vocab:
        raise ConfigError(
            f"the tokenizer has {tokenizer_vocab} tokens but the model {spec} only {model_vocab}: "
            "a tokenizer whose vocabulary does not match the model; use the tokenizer that came with it"
        )
