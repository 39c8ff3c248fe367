"""The table of model families lmforge imports from and exports to Hugging Face.

A family is data, not a copy of a network: how its ``config.json`` becomes our ``ModelArgs``
(the switches of ``lm.models.transformer``'s decoder, or an encoder's), how its weight names map onto ours
and back, which of our linear layers LoRA targets, and which module is the block FSDP wraps.
Decoders live in :mod:`lm.models.decoders`, encoders in :mod:`lm.models.encoders`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lm.errors import ConfigError
from lm.models.family import Family


def all_families() -> list[Family]:
    from lm.models.decoders import FAMILIES as DECODERS
    from lm.models.encoders import FAMILIES as ENCODERS

    return [*DECODERS, *ENCODERS]


def block_classes() -> set[type[torch.nn.Module]]:
    """The transformer block of every network a family runs on: the unit FSDP wraps."""
    from lm.models.bert import BertLayer
    from lm.models.modernbert import ModernBertLayer
    from lm.models.transformer import Block

    return {Block, BertLayer, ModernBertLayer}


def family_of(folder: Path, config: dict[str, Any]) -> tuple[Family, str]:
    """The family config.json names and the architecture it was found by; else a ConfigError that
    lists every architecture lmforge reads."""
    families = all_families()
    found = config.get("architectures") or []
    for name in found:
        for fam in families:
            if name in fam.architectures:
                return fam, name
    if not found:
        for fam in families:
            if config.get("model_type") in fam.model_types:
                return fam, fam.architectures[0]
    supported = ", ".join(a for fam in families for a in fam.architectures)
    raise ConfigError(
        f"{folder}: a Hugging Face model with architectures={found} (model_type={config.get('model_type')!r}), "
        f"which lmforge does not load; supported: {supported}"
    )


def family_named(name: str) -> Family:
    for fam in all_families():
        if fam.name == name:
            return fam
    raise KeyError(f"no model family {name!r}")


